"""Access tokens: RFC 9068 JWTs signed by the gateway (pyjwt + cryptography).

Verification is strict and fails closed (any defect is ``invalid-token``):

- the header must be a JSON object with ``typ`` ``at+jwt``, a ``kid`` naming
  one of our own keys, and the algorithm that key was made for — so
  ``alg: none`` and HS256 "signed" with our public key are refused before any
  signature check; headers that carry ``jku``, ``jwk``, ``x5u`` or ``x5c`` are
  refused (our tokens never carry them, and they are never followed);
- a ``crit`` header is refused: we understand no JWS extensions (RFC 7515 §4.1.11);
- ``iss`` must equal our issuer exactly; ``aud`` must contain our audience;
  ``exp`` and ``iat`` are required, ``nbf`` honoured, with a small leeway;
- ``exp``, ``iat`` and ``nbf`` must be JSON numbers (RFC 7519 NumericDate);
- the pdg claims (``client_id``, ``licensee``, ``licence``, ``purpose``,
  ``datasets``) must be present and well-typed.

Every refusal carries the RFC 6750 challenge
``WWW-Authenticate: Bearer realm="pdg", error="invalid_token"``.

A token naming a key this replica does not know yet (another replica that
started a moment ago) waits for the next key refresh from the database instead
of being refused; refreshes are shared by all waiting calls and happen at most
once per ``_REFRESH_MIN_SECONDS``, so unknown ``kid`` values cannot flood the
database. If the key store cannot be read, the keys already known stay in use.

A verified token is cached (by SHA-256 digest) until it expires, so the
signature is checked once per token, not once per call; the licence rules are
still applied to every call.

Tokens of a trusted external issuer (``[[tokens.issuers]]``, keys kept by
``licensing.issuers``) pass the same header rules (``typ`` among the issuer's
``token_types``), a ``kid`` the issuer publishes, an ``alg`` among its
``algorithms`` that fits that key, its exact ``iss``, its ``aud`` (else
ours), ``exp`` and ``iat``. Its configured claims name the app and purpose
(and, optionally, the licensee, licence and datasets): an
:class:`ExternalIdentity` that the gateway maps to the app's licensee and
licence, chosen as the token endpoint chooses it, when the token is first
seen. A ``cnf.jkt`` binds it to a DPoP key as for our own tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt

from core import sm2
from core.errors import InvalidTokenError
from licensing.ids import new_id
from licensing.issuers import IssuerKeys, KeysUnavailableError, TrustedIssuers
from licensing.keys import SigningKey, algorithm_for, verifying_key

log = logging.getLogger(__name__)

_FORBIDDEN_HEADERS = ("jku", "jwk", "x5u", "x5c")
_CACHE_LIMIT = 200_000
_REFRESH_MIN_SECONDS = 0.5
CHALLENGE = 'Bearer realm="pdg", error="invalid_token"'


def _invalid(detail: str) -> InvalidTokenError:
    return InvalidTokenError(detail, headers={"WWW-Authenticate": CHALLENGE})


@dataclass(frozen=True, slots=True)
class AccessClaims:
    token_id: str
    app_id: str
    licensee_id: str
    licence_id: str
    purpose: str
    datasets: frozenset[str]
    expires_at: float
    raw: dict[str, Any]
    #: The thumbprint of the key a DPoP-bound token is bound to (``cnf.jkt``).
    jkt: str | None = None


@dataclass(frozen=True, slots=True)
class ExternalIdentity:
    """What a verified token of an external issuer says, by its configured claims."""

    issuer: str
    token_id: str
    app_id: str
    purpose: str
    licensee_id: str | None
    licence_id: str | None
    #: ``None``: every dataset the licence grants.
    datasets: tuple[str, ...] | None
    expires_at: float
    jkt: str | None
    raw: dict[str, Any]


#: Maps an external identity to the claims the licence rules read (the
#: gateway's catalogue decides the licensee and licence); raises the problem
#: that refuses it.
ResolveExternal = Callable[[ExternalIdentity], AccessClaims]


class TokenService:
    """Issues tokens with this replica's key; verifies tokens of any replica."""

    def __init__(
        self,
        *,
        signing_key: SigningKey,
        issuer: str,
        audience: str,
        ttl_seconds: int = 300,
        leeway_seconds: int = 10,
        load_public_keys: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
        load_active_key: Callable[[], Awaitable[SigningKey]] | None = None,
        external: TrustedIssuers | None = None,
        resolve_external: ResolveExternal | None = None,
    ) -> None:
        self.signing_key = signing_key
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds
        self.leeway_seconds = leeway_seconds
        self._load_public_keys = load_public_keys
        self._load_active_key = load_active_key
        self._unreachable = False
        self._keys: dict[str, tuple[str, Any]] = {}
        self._jwks: list[dict[str, Any]] = []
        self._last_refresh = -_REFRESH_MIN_SECONDS
        self._pending_refresh: asyncio.Future[None] | None = None
        self._cache: dict[bytes, AccessClaims] = {}
        #: Revoked token ids (RFC 7009) and when each expires.
        self._revoked: dict[str, float] = {}
        self.external = external
        self._resolve_external = resolve_external
        self.set_public_keys([signing_key.public_jwk])

    # -- keys ---------------------------------------------------------------
    def set_public_keys(self, jwks: list[dict[str, Any]]) -> None:
        keys: dict[str, tuple[str, Any]] = {}
        for jwk in jwks:
            alg = algorithm_for(jwk)
            if alg is None or jwk.get("alg", alg) != alg or "kid" not in jwk:
                continue
            try:
                keys[jwk["kid"]] = (alg, verifying_key(jwk, alg))
            except (ValueError, TypeError, sm2.SMUnavailableError):
                log.warning("skipping unusable public signing key %r", jwk.get("kid"))
        own = self.signing_key
        keys.setdefault(own.kid, (own.alg, own.private_key.public_key()))
        self._keys = keys
        self._jwks = [j for j in jwks if j.get("kid") in keys] or [own.public_jwk]

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": list(self._jwks)}

    async def refresh_keys(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._load_public_keys is None or (not force and now - self._last_refresh < _REFRESH_MIN_SECONDS):
            return
        self._last_refresh = now
        try:
            if self._load_active_key is not None:
                active = await self._load_active_key()
                if active.kid != self.signing_key.kid:
                    log.warning("signing with key %s from now on (it was rotated)", active.kid)
                    self.signing_key = active
            jwks = await self._load_public_keys()
        except Exception:  # the keys already known stay in use
            if not self._unreachable:  # once per outage, not once per poll
                log.warning(
                    "cannot load the signing keys; keeping the %d known", len(self._keys), exc_info=True
                )
            self._unreachable = True
            return
        if self._unreachable:
            log.warning("the signing keys load again")
        self._unreachable = False
        self.set_public_keys(jwks)

    async def watch(self, interval: float) -> None:
        """Poll the shared keys until cancelled: a rotation made elsewhere is
        taken up within ``interval``, a retired key leaves after its grace."""
        while True:
            await asyncio.sleep(interval)
            await self.refresh_keys(force=True)

    async def _await_next_refresh(self) -> None:
        """Wait for the next key refresh (one shared by every caller that waits)."""
        if self._load_public_keys is None:
            return
        if self._pending_refresh is None or self._pending_refresh.done():
            self._pending_refresh = asyncio.ensure_future(self._refresh_when_allowed())
        await asyncio.shield(self._pending_refresh)

    async def _refresh_when_allowed(self) -> None:
        wait = self._last_refresh + _REFRESH_MIN_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self.refresh_keys(force=True)

    # -- issue --------------------------------------------------------------
    def issue(
        self,
        *,
        app_id: str,
        licensee_id: str,
        licence_id: str,
        purpose: str,
        datasets: list[str],
        jkt: str | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds; with ``jkt``,
        bound to that key (RFC 9449 ``cnf.jkt``)."""
        iat = int(now if now is not None else time.time())
        claims = {
            "iss": self.issuer,
            "sub": app_id,
            "aud": self.audience,
            "client_id": app_id,
            "iat": iat,
            "nbf": iat,
            "exp": iat + self.ttl_seconds,
            "jti": new_id("tok"),
            "scope": " ".join([f"purpose:{purpose}", *(f"dataset:{d}" for d in datasets)]),
            "licensee": licensee_id,
            "licence": licence_id,
            "purpose": purpose,
            "datasets": datasets,
        }
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}
        key = self.signing_key
        token = jwt.encode(
            claims, key.private_key, algorithm=key.alg, headers={"typ": "at+jwt", "kid": key.kid}
        )
        return token, self.ttl_seconds

    # -- verify -------------------------------------------------------------
    def revoked(self, token_id: str, expires_at: float) -> None:
        """Refuse the token ``token_id`` from now on (until it expires anyway)."""
        self._revoked[token_id] = expires_at
        if len(self._revoked) > _CACHE_LIMIT:
            now = time.time()
            self._revoked = {t: e for t, e in self._revoked.items() if e + self.leeway_seconds > now}

    def is_revoked(self, token_id: str) -> bool:
        return token_id in self._revoked

    async def verify(self, token: str) -> AccessClaims:
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        now = time.time()
        if cached is not None:
            if now < cached.expires_at + self.leeway_seconds:
                if cached.token_id in self._revoked:
                    raise _invalid("the token has been revoked")
                return cached
            del self._cache[digest]
        header = _header(token)
        issuer = self._external_issuer(token)
        _check_type(header, _OWN_TYPES if issuer is None else issuer.config.token_types)
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _invalid("the token header names no key (kid)")
        if issuer is not None:
            claims = await self._verify_external(token, header, kid, issuer)
        else:
            if kid not in self._keys:
                await self._await_next_refresh()
            claims = self._verify(token, header, kid)
        if claims.token_id in self._revoked:
            raise _invalid("the token has been revoked")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {k: v for k, v in self._cache.items() if v.expires_at + self.leeway_seconds > now}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
        self._cache[digest] = claims
        return claims

    def _verify(self, token: str, header: dict[str, Any], kid: str) -> AccessClaims:
        entry = self._keys.get(kid)
        if entry is None:
            raise _invalid("the token is signed with a key this gateway does not know")
        alg, key = entry
        if header.get("alg") != alg:
            raise _invalid(f"the token's algorithm is not allowed; this key signs with {alg} only")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"], "strict_aud": False},
            )
        except jwt.InvalidTokenError as exc:
            raise _invalid(_reason(exc)) from exc
        return _claims(payload)

    # -- external issuers ---------------------------------------------------
    def _external_issuer(self, token: str) -> IssuerKeys | None:
        """The trusted external issuer the token claims to be from, if any
        (only chooses the keys to check it with)."""
        if self.external is None or not self.external.by_name:
            return None
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise _invalid("the token is not a well-formed JWT") from exc
        iss = unverified.get("iss")
        return self.external.get(iss) if isinstance(iss, str) and iss != self.issuer else None

    async def _verify_external(
        self, token: str, header: dict[str, Any], kid: str, issuer: IssuerKeys
    ) -> AccessClaims:
        config = issuer.config
        try:
            key = await issuer.key(kid)
        except KeysUnavailableError as exc:
            raise _invalid(str(exc)) from exc
        if key is None:
            raise _invalid("the token is signed with a key its issuer does not publish")
        alg = header.get("alg")
        if alg not in key.algorithms:
            raise _invalid(
                f"the token's algorithm is not allowed; this key verifies {', '.join(sorted(key.algorithms))}"
            )
        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[str(alg)],
                audience=config.audience or self.audience,
                issuer=config.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud"], "strict_aud": False},
            )
        except jwt.InvalidTokenError as exc:
            raise _invalid(_reason(exc)) from exc
        for name in ("exp", "iat", "nbf"):
            if name in payload and not _numeric_date(payload[name]):
                raise _invalid(f"the token's {name!r} claim is not a number")
        if self._resolve_external is None:
            raise _invalid("tokens of external issuers are not accepted here")
        return self._resolve_external(_identity(config, token, payload))


#: The ``typ`` of the gateway's own tokens (RFC 9068).
_OWN_TYPES = ("at+jwt",)


def _check_type(header: dict[str, Any], accepted: tuple[str, ...]) -> None:
    typ = header.get("typ")
    wanted = {t.lower() for t in accepted}
    wanted |= {f"application/{t}" for t in wanted}
    if not isinstance(typ, str) or typ.lower() not in wanted:
        raise _invalid(f"the token is not an access token (typ must be {' or '.join(accepted)})")


def _text_claim(payload: dict[str, Any], name: str, what: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise _invalid(f"the token's {name!r} claim must name the {what}")
    return value


def _scope_items(payload: dict[str, Any], kind: str) -> list[str]:
    scope = payload.get("scope")
    if not isinstance(scope, str):
        raise _invalid("the token has no scope to read")
    prefix = f"{kind}:"
    return [
        item[len(prefix) :]
        for item in scope.split(" ")
        if item.startswith(prefix) and len(item) > len(prefix)
    ]


def _identity(config: Any, token: str, payload: dict[str, Any]) -> ExternalIdentity:
    """What an external token says, read through its issuer's claim mapping."""
    app_id = _text_claim(payload, config.app_claim, "app")
    if config.purpose_claim == "scope":
        purposes = set(_scope_items(payload, "purpose"))
        if len(purposes) != 1:
            raise _invalid("the token's scope must hold exactly one purpose:<purpose>")
        purpose = purposes.pop()
    else:
        purpose = _text_claim(payload, config.purpose_claim, "purpose")
    datasets: tuple[str, ...] | None = None
    if config.datasets_claim == "scope":
        datasets = tuple(_scope_items(payload, "dataset"))
    elif config.datasets_claim:
        listed = payload.get(config.datasets_claim)
        if not isinstance(listed, list) or not all(isinstance(d, str) and d for d in listed):
            raise _invalid(f"the token's {config.datasets_claim!r} claim must list dataset ids")
        datasets = tuple(listed)
    jti = payload.get("jti")
    token_id = (
        jti if isinstance(jti, str) and jti else "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    )
    return ExternalIdentity(
        issuer=config.issuer,
        token_id=token_id,
        app_id=app_id,
        purpose=purpose,
        licensee_id=_text_claim(payload, config.licensee_claim, "licensee")
        if config.licensee_claim
        else None,
        licence_id=_text_claim(payload, config.licence_claim, "licence") if config.licence_claim else None,
        datasets=datasets,
        expires_at=float(payload["exp"]),
        jkt=_bound_key(payload),
        raw=payload,
    )


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise _invalid("the token is not a well-formed JWT") from exc
    if "crit" in header:
        raise _invalid("the token header has critical extensions this gateway does not understand")
    for name in _FORBIDDEN_HEADERS:
        if name in header:
            raise _invalid(f"the token header must not carry {name!r}")
    return header


def _reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not yet valid"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token is for another audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token is from another issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token lacks the {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token signature does not verify"
    return "the token is invalid"


def _numeric_date(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _claims(payload: dict[str, Any]) -> AccessClaims:
    for name in ("exp", "iat", "nbf"):
        if name in payload and not _numeric_date(payload[name]):
            raise _invalid(f"the token's {name!r} claim is not a number")
    names = ("client_id", "licensee", "licence", "purpose")
    values = [payload.get(n) for n in names]
    datasets = payload.get("datasets")
    if (
        not all(isinstance(v, str) and v for v in values)
        or not isinstance(datasets, list)
        or not all(isinstance(d, str) for d in datasets)
        or payload.get("client_id") != payload.get("sub")
    ):
        raise _invalid("the token lacks the pdg claims (client_id, licensee, licence, purpose, datasets)")
    return AccessClaims(
        token_id=str(payload["jti"]),
        app_id=str(payload["client_id"]),
        licensee_id=str(payload["licensee"]),
        licence_id=str(payload["licence"]),
        purpose=str(payload["purpose"]),
        datasets=frozenset(datasets),
        expires_at=float(payload["exp"]),
        raw=payload,
        jkt=_bound_key(payload),
    )


def _bound_key(payload: dict[str, Any]) -> str | None:
    """The DPoP key thumbprint a token is bound to (``cnf.jkt``), if any."""
    if "cnf" not in payload:
        return None
    cnf = payload["cnf"]
    if not isinstance(cnf, dict) or set(cnf) != {"jkt"} or not isinstance(cnf["jkt"], str) or not cnf["jkt"]:
        raise _invalid("the token's cnf claim must hold exactly a jkt (a DPoP key thumbprint)")
    return str(cnf["jkt"])
