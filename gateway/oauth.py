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
    LicenceError,
    LicenceInactiveError,
    PurposeNotAllowedError,
)
from gateway.state import CATALOGUE, CLIENTS, CLOCK, DPOP, METRICS, SETTINGS, THROTTLE, TOKENS
from gateway.throttle import client_address
from licensing.catalogue import AppView, Catalogue, LicenceView
from licensing.clients import SIGNING_ALGORITHMS, claimed_client_id
from licensing.dpop import ALGORITHMS as DPOP_ALGORITHMS
from licensing.dpop import ProofError
from licensing.schemas import PURPOSES

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


async def token_endpoint(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    try:
        if request.content_type != "application/x-www-form-urlencoded":
            raise BadRequestError(
                "the token request must be application/x-www-form-urlencoded", error="invalid_request"
            )
        posted = await request.post()
        if len(set(posted)) != len(posted):
            # RFC 6749 §3.2: parameters must not be included more than once.
            raise BadRequestError("a token request parameter is repeated", error="invalid_request")
        form = {k: v for k, v in posted.items() if isinstance(v, str)}
        catalogue = app[CATALOGUE].fresh()
        authorization = request.headers.get("Authorization")
        claimed = claimed_client_id(authorization, form)
        address = client_address(request, app[SETTINGS].server.trusted_proxies)
        await app[THROTTLE].check("token", claimed, address)
        try:
            client, method = await app[CLIENTS].authenticate(catalogue, authorization, form)
        except InvalidClientError:
            if authorization or "client_secret" in form or "client_assertion" in form:
                await app[THROTTLE].failed("token", claimed, address)
            raise
        if "grant_type" not in form:
            raise BadRequestError("grant_type is missing", error="invalid_request")
        if form.get("grant_type") != "client_credentials":
            raise BadRequestError("grant_type must be client_credentials", error="unsupported_grant_type")
        if not client.enabled:
            raise InvalidClientError(
                "this app is disabled",
                headers={"WWW-Authenticate": 'Basic realm="pdg"'},
                error="invalid_client",
            )
        scope = parse_scope(form.get("scope", ""))
        jkt = await _proof_key(request)
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
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/oauth-authorization-server", metadata)
