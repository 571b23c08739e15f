"""OAuth 2.0 endpoints: the token endpoint (client credentials grant), the
JWKS and the RFC 8414 authorization server metadata.

``scope`` is a space-separated list of ``purpose:<purpose>`` (exactly one),
``dataset:<id>`` or ``dataset:<provider>/*`` (none = everything the licence
grants) and, optionally, ``licence:<id>`` to choose among several licences of
the licensee (otherwise: the active licence that grants all of it, the most
recently valid first). A token is only issued for a purpose and datasets the
licence grants. Refusals are problem JSON that also carry RFC 6749's ``error``.

A request with a ``DPoP`` proof (RFC 9449) gets a token bound to the proof's
key (``cnf.jkt``, ``token_type`` ``DPoP``); a refused proof is 400 with
``error`` ``invalid_dpop_proof`` (or ``use_dpop_nonce`` and a ``DPoP-Nonce``).

``POST /oauth/revoke`` (RFC 7009) and ``POST /oauth/introspect`` (RFC 7662)
authenticate the client the same way; both act only on tokens of the
client's own licensee. They are written here, not on authlib's server
classes: those call the client store and the secret check synchronously,
and an Argon2 check (tens of milliseconds) would stall every call on the
event loop; the token formats and the client rules are this module's anyway.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import orjson
from aiohttp import web

from core.errors import (
    BadRequestError,
    DatasetClosedError,
    DatasetNotLicensedError,
    GatewayError,
    InvalidClientError,
    InvalidTokenError,
    LicenceError,
    LicenceInactiveError,
    PurposeNotAllowedError,
)
from gateway.state import CATALOGUE, CLIENTS, CLOCK, DPOP, METRICS, REVOCATIONS, SETTINGS, THROTTLE, TOKENS
from gateway.throttle import client_address
from licensing.catalogue import AppView, Catalogue, LicenceView
from licensing.clients import SIGNING_ALGORITHMS, claimed_client_id
from licensing.dpop import ALGORITHMS as DPOP_ALGORITHMS
from licensing.dpop import ProofError
from licensing.schemas import PURPOSES
from licensing.tokens import AccessClaims, ExternalIdentity

_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 NQCHAR
_DATASET = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(/\*)?$")


@dataclass(frozen=True)
class ScopeRequest:
    purpose: str
    datasets: tuple[str, ...]
    licence_id: str | None


def _scope_error(detail: str) -> BadRequestError:
    return BadRequestError(detail, error="invalid_scope")


def parse_scope(scope: str) -> ScopeRequest:
    purposes: list[str] = []
    datasets: list[str] = []
    licence: list[str] = []
    for item in scope.split(" "):
        if not item:
            continue
        if not _SCOPE_TOKEN.match(item):
            raise _scope_error("scope holds characters RFC 6749 does not allow")
        kind, sep, value = item.partition(":")
        if not sep or not value:
            raise _scope_error(f"unknown scope {item!r}: use purpose:<purpose>, dataset:<id>, licence:<id>")
        if kind == "purpose":
            if value not in PURPOSES:
                raise _scope_error(f"unknown purpose {value!r}: one of {', '.join(PURPOSES)}")
            purposes.append(value)
        elif kind == "dataset":
            if not _DATASET.match(value):
                raise _scope_error(f"malformed dataset scope {value!r}")
            datasets.append(value)
        elif kind == "licence":
            licence.append(value)
        else:
            raise _scope_error(f"unknown scope {item!r}: use purpose:<purpose>, dataset:<id>, licence:<id>")
    if len(set(purposes)) != 1:
        raise _scope_error(
            "scope must name exactly one purpose (purpose:public-interest or purpose:industrial)"
        )
    if len(set(licence)) > 1:
        raise _scope_error("scope may name at most one licence")
    return ScopeRequest(purposes[0], tuple(dict.fromkeys(datasets)), licence[0] if licence else None)


def _grants(
    catalogue: Catalogue,
    licence: LicenceView,
    request: ScopeRequest,
    now: datetime,
    *,
    check_status: bool = True,
) -> None:
    """Raise the licence problem if ``licence`` does not grant all of ``request`` at ``now``."""
    state = licence.effective_status(now)
    if check_status and state != "active":
        raise LicenceInactiveError(f"licence {licence.id} is {state}")
    if request.purpose not in licence.purposes:
        raise PurposeNotAllowedError(f"licence {licence.id} does not grant purpose {request.purpose}")
    for wanted in request.datasets:
        if wanted.endswith("/*"):
            if wanted[:-2] not in licence.providers:
                raise DatasetNotLicensedError(f"licence {licence.id} does not grant {wanted}")
            continue
        dataset = catalogue.datasets.get(wanted)
        if dataset is None:
            raise _scope_error(f"no dataset {wanted!r} in the catalogue")
        if dataset.open_class == "closed":
            raise DatasetClosedError(f"dataset {wanted} is on the negative list and is never served")
        if not licence.covers(dataset) or dataset.classification > licence.max_classification:
            raise DatasetNotLicensedError(f"licence {licence.id} does not grant dataset {wanted}")


def choose_licence(catalogue: Catalogue, app: AppView, request: ScopeRequest, now: datetime) -> LicenceView:
    candidates = [lic for lic in catalogue.licences.values() if lic.licensee_id == app.licensee_id]
    if request.licence_id is not None:
        candidates = [lic for lic in candidates if lic.id == request.licence_id]
        if not candidates:
            raise _scope_error(f"licence {request.licence_id} is not a licence of this client's licensee")
    if not candidates:
        raise LicenceInactiveError("the client's licensee holds no licence")
    candidates.sort(key=lambda lic: (lic.valid_from, lic.id), reverse=True)
    refusals: list[tuple[LicenceView, LicenceError]] = []
    for licence in candidates:
        try:
            _grants(catalogue, licence, request, now)
        except LicenceError as refusal:
            refusals.append((licence, refusal))
            continue
        return licence
    # Report the most specific refusal: an inactive licence that would grant
    # the request says the most (it is why the request fails); otherwise a
    # licence that was active but lacked the purpose or dataset says more than
    # an inactive one that lacks them too.
    for refused, reason in refusals:
        if isinstance(reason, LicenceInactiveError) and _would_grant(catalogue, refused, request, now):
            raise reason
    refusals.sort(key=lambda pair: isinstance(pair[1], LicenceInactiveError))
    raise refusals[0][1]


def external_claims(catalogue: Catalogue, identity: ExternalIdentity, now: datetime) -> AccessClaims:
    """The claims a token of a trusted external issuer stands for: its app
    (which must be registered here and enabled), the app's licensee (which a
    configured licensee claim must name) and the licence the token endpoint
    would choose for its purpose and datasets (the licence claim's, if
    configured). Chosen once per token; the licence rules still run on every
    call."""
    app = catalogue.apps.get(identity.app_id)
    if app is None or not app.enabled:
        raise InvalidTokenError(f"the app {identity.app_id!r} of this token is unknown or disabled")
    if identity.licensee_id is not None and identity.licensee_id != app.licensee_id:
        raise InvalidTokenError("the licensee of this token is not its app's")
    if identity.purpose not in PURPOSES:
        raise InvalidTokenError(
            f"the token's purpose {identity.purpose!r} is not one of {', '.join(PURPOSES)}"
        )
    request = ScopeRequest(identity.purpose, identity.datasets or (), identity.licence_id)
    try:
        licence = choose_licence(catalogue, app, request, now)
    except BadRequestError as exc:  # a scope defect here is the token's
        raise InvalidTokenError(exc.detail) from exc
    datasets = frozenset(identity.datasets or (*licence.dataset_ids, *(f"{p}/*" for p in licence.providers)))
    return AccessClaims(
        token_id=identity.token_id,
        app_id=app.id,
        licensee_id=app.licensee_id,
        licence_id=licence.id,
        purpose=identity.purpose,
        datasets=datasets,
        expires_at=identity.expires_at,
        raw=identity.raw,
        jkt=identity.jkt,
    )


def _would_grant(catalogue: Catalogue, licence: LicenceView, request: ScopeRequest, now: datetime) -> bool:
    try:
        _grants(catalogue, licence, request, now, check_status=False)
    except LicenceError:
        return False
    return True


async def _proof_key(request: web.Request) -> str | None:
    """With a ``DPoP`` header: the thumbprint of the proven key the token is
    bound to (RFC 9449 §5); without one: ``None`` (a Bearer token)."""
    values = request.headers.getall("DPoP", [])
    if not values:
        return None
    try:
        proof = await request.app[DPOP].check(values, method=request.method, path=request.path)
    except ProofError as refused:
        headers = {"DPoP-Nonce": refused.nonce} if refused.nonce else {}
        raise BadRequestError(refused.detail, error=refused.error, headers=headers) from refused
    return proof.jkt


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequestError(
            "the request must be application/x-www-form-urlencoded", error="invalid_request"
        )
    posted = await request.post()
    if len(set(posted)) != len(posted):
        # RFC 6749 §3.2: parameters must not be included more than once.
        raise BadRequestError("a request parameter is repeated", error="invalid_request")
    return {k: v for k, v in posted.items() if isinstance(v, str)}


async def _client(request: web.Request, form: dict[str, str]) -> tuple[AppView, str, Catalogue]:
    """The authenticated client (RFC 6749 §2.3), its method, and the view it
    was found in; failures are throttled per client id and per address. A
    client id the view lacks (an app made a moment ago through another
    replica or worker) reloads the view first, bounded in rate
    (``CatalogueCache.reload_for_unknown``)."""
    app = request.app
    authorization = request.headers.get("Authorization")
    claimed = claimed_client_id(authorization, form)
    address = client_address(request, app[SETTINGS].server.trusted_proxies)
    await app[THROTTLE].check("token", claimed, address)
    catalogue = await app[CATALOGUE].confirm()
    if claimed is not None and claimed not in catalogue.apps and await app[CATALOGUE].reload_for_unknown():
        catalogue = app[CATALOGUE].fresh()
    try:
        client, method = await app[CLIENTS].authenticate(catalogue, authorization, form)
    except InvalidClientError:
        if authorization or "client_secret" in form or "client_assertion" in form:
            await app[THROTTLE].failed("token", claimed, address)
        raise
    if not client.enabled:
        raise InvalidClientError(
            "this app is disabled", headers={"WWW-Authenticate": 'Basic realm="pdg"'}, error="invalid_client"
        )
    return client, method, catalogue


async def _own_token(request: web.Request, form: dict[str, str], client: AppView) -> AccessClaims | None:
    """The claims of the form's ``token`` if it is a valid access token of
    ``client``'s licensee (else ``None``: RFC 7009 and 7662 answer as if
    there were no such token)."""
    token = form.get("token")
    if not token:
        raise BadRequestError("token is missing", error="invalid_request")
    try:
        claims = await request.app[TOKENS].verify(token)
    except GatewayError:
        return None
    return claims if claims.licensee_id == client.licensee_id else None


async def revocation_endpoint(request: web.Request) -> web.Response:
    """RFC 7009: a client revokes an access token of its own licensee; it is
    refused on every replica from the next refresh on (at once here). The
    answer is 200 whether or not there was such a token."""
    form = await _form(request)
    client, _, _ = await _client(request, form)
    claims = await _own_token(request, form, client)
    if claims is not None:
        await request.app[REVOCATIONS].revoke(claims.token_id, claims.expires_at)
    return web.Response(status=200, headers={"Cache-Control": "no-store"})


async def introspection_endpoint(request: web.Request) -> web.Response:
    """RFC 7662: for resource servers that cannot verify our JWTs. A client
    may introspect the tokens of its own licensee; any other token, an
    expired, revoked or forged one, is ``{"active": false}``."""
    form = await _form(request)
    client, _, _ = await _client(request, form)
    claims = await _own_token(request, form, client)
    body: dict[str, object] = {"active": False}
    if claims is not None:
        raw = claims.raw
        body = {
            "active": True,
            "token_type": "DPoP" if claims.jkt else "Bearer",
            **{
                k: raw[k]
                for k in ("scope", "client_id", "sub", "aud", "iss", "exp", "iat", "nbf", "jti")
                if k in raw
            },
            **{k: raw[k] for k in ("licensee", "licence", "purpose", "datasets", "cnf") if k in raw},
        }
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def token_endpoint(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    try:
        form = await _form(request)
        client, method, catalogue = await _client(request, form)
        if "grant_type" not in form:
            raise BadRequestError("grant_type is missing", error="invalid_request")
        if form.get("grant_type") != "client_credentials":
            raise BadRequestError("grant_type must be client_credentials", error="unsupported_grant_type")
        scope = parse_scope(form.get("scope", ""))
        jkt = await _proof_key(request)
        try:
            licence = choose_licence(catalogue, client, scope, app[CLOCK].now())
        except (LicenceError, BadRequestError):
            # A licence or dataset made a moment ago elsewhere (a licence the
            # scope names is a bad request until known): reload, then the
            # rules again.
            if not await app[CATALOGUE].reload_for_unknown():
                raise
            catalogue = app[CATALOGUE].fresh()
            licence = choose_licence(catalogue, client, scope, app[CLOCK].now())
        datasets = list(scope.datasets) or sorted(
            [*licence.dataset_ids, *(f"{p}/*" for p in licence.providers)]
        )
        token, ttl = app[TOKENS].issue(
            app_id=client.id,
            licensee_id=client.licensee_id,
            licence_id=licence.id,
            purpose=scope.purpose,
            datasets=datasets,
            jkt=jkt,
        )
    except GatewayError as error:
        if isinstance(error, LicenceError):
            error.extra.setdefault("error", "invalid_scope")
        metrics.token_refusals.labels(error.code).inc()
        raise
    metrics.tokens_issued.labels(method).inc()
    body = {
        "access_token": token,
        "token_type": "DPoP" if jkt is not None else "Bearer",
        "expires_in": ttl,
        "scope": " ".join([f"purpose:{scope.purpose}", *(f"dataset:{d}" for d in datasets)]),
    }
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def jwks(request: web.Request) -> web.Response:
    await request.app[TOKENS].refresh_keys()
    return web.Response(
        body=orjson.dumps(request.app[TOKENS].jwks),
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=60"},
    )


async def metadata(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    base = settings.public_url
    body = {
        "issuer": settings.issuer,
        "token_endpoint": f"{base}/oauth/token",
        "revocation_endpoint": f"{base}/oauth/revoke",
        "introspection_endpoint": f"{base}/oauth/introspect",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
        ],
        "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
        "scopes_supported": [f"purpose:{p}" for p in PURPOSES],
        "dpop_signing_alg_values_supported": list(DPOP_ALGORITHMS),
        "service_documentation": f"{base}/admin/v1/openapi.json",
    }
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )


def setup(app: web.Application) -> None:
    app.router.add_post("/oauth/token", token_endpoint)
    app.router.add_post("/oauth/revoke", revocation_endpoint)
    app.router.add_post("/oauth/introspect", introspection_endpoint)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/oauth-authorization-server", metadata)
