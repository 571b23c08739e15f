"""DPoP (RFC 9449): tokens bound to a key the client holds, and the proofs
that show it holds the key, request by request.

A client that sends a ``DPoP`` proof to the token endpoint gets a token bound
to the proof's key (``cnf.jkt``, its RFC 7638 thumbprint; ``token_type``
``DPoP``). It then sends the token as ``Authorization: DPoP <token>`` with a
fresh proof on every call. :meth:`ProofChecker.check` performs every check of
RFC 9449 §4.3, in this order, and refuses the proof at the first that fails:

1. exactly one ``DPoP`` header, holding one well-formed JWS (compact form);
2. header ``typ`` exactly ``dpop+jwt``, ``alg`` an asymmetric algorithm of
   :data:`ALGORITHMS` that fits the key (``none`` and HMAC never), ``jwk`` a
   public key (a key with private members is refused), no ``crit``;
3. the signature verifies with that key;
4. claims ``jti`` (a non-empty string), ``htm``, ``htu`` and ``iat`` (a
   number) are present;
5. ``htm`` is the request's method; ``htu`` is the request's URL as the
   gateway's public URL names it (``server.public_url`` + the path), scheme and
   host compared without case, default ports dropped, query and fragment
   ignored on both sides;
6. ``iat`` is within :attr:`ProofChecker.max_age` seconds in the past (and at
   most ``leeway`` in the future);
7. with an access token, ``ath`` is the base64url SHA-256 of it;
8. with server nonces on (``tokens.dpop_nonce``), ``nonce`` is one this
   deployment issued in the current or previous window (``use_dpop_nonce``
   otherwise, with a fresh nonce in ``DPoP-Nonce``);
9. the ``jti`` has not been seen with this key within the freshness window,
   on any replica (a set-if-absent in Redis that outlives the window); when
   the store cannot be reached the proof is refused (fail closed).

The caller checks that the thumbprint (:attr:`Proof.jkt`) is the token's
``cnf.jkt``. Keys are imported with joserfc (the JOSE half of authlib), which
also computes the thumbprint; the signature is verified with pyjwt, like the
access tokens on the hot path (pyjwt's algorithm objects, on the exact
signed bytes). The checked header of each client key is kept, so a call
pays for the signature, not for importing the key again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry
from yarl import URL

from licensing.clients import MIN_RSA_BITS, PRIVATE_JWK_MEMBERS, SIGNING_ALGORITHMS, FirstUse, algorithms_for

#: Asymmetric algorithms a proof may be signed with (never ``none`` or HS*).
ALGORITHMS: tuple[str, ...] = SIGNING_ALGORITHMS
#: The proof's media type (RFC 9449 §4.2).
PROOF_TYPE = "dpop+jwt"
_MAX_JTI = 256
#: Three base64url segments (RFC 7515 compact serialisation); the signature
#: may be empty here (``alg: none``) to be refused by its algorithm.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
#: Distinct proof headers (one per client key) kept checked and imported.
_KEY_CACHE_LIMIT = 10_000


class ProofError(Exception):
    """The proof is refused. ``error`` is the RFC 9449 error code
    (``invalid_dpop_proof`` or ``use_dpop_nonce``); with a nonce refusal,
    ``nonce`` is the one to use."""

    def __init__(self, detail: str, *, error: str = "invalid_dpop_proof", nonce: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.error = error
        self.nonce = nonce


@dataclass(frozen=True, slots=True)
class _ProofKey:
    algorithm: Any
    key: Any
    jkt: str


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(segment: str, refusal: str) -> dict[str, Any]:
    """The JSON object a base64url segment holds; ``ProofError(refusal)`` if none."""
    try:
        value = orjson.loads(_b64decode(segment))
    except (ValueError, TypeError) as exc:
        raise ProofError(refusal) from exc
    if not isinstance(value, dict):
        raise ProofError(refusal)
    return value


@dataclass(frozen=True, slots=True)
class Proof:
    jkt: str
    jti: str


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK."""
    return JWKRegistry.import_key(dict(jwk)).thumbprint()


def token_hash(access_token: str) -> str:
    """``ath``: the base64url SHA-256 of the access token (RFC 9449 §4.2)."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _origin_and_path(url: URL) -> tuple[str, str, int | None, str]:
    return (url.scheme.lower(), (url.host or "").lower(), url.port, url.path or "/")


class Nonces:
    """Server nonces shared by every replica through Redis: one random value
    per window of ``window_seconds``, made by the first replica that needs it;
    the current and the previous window's are accepted."""

    KEY = "pdg:dpop:nonce:{}"

    def __init__(self, redis: Any, window_seconds: int = 300, command_timeout: float = 2.0) -> None:
        self._redis = redis
        self.window_seconds = window_seconds
        self._timeout = command_timeout
        self._known: dict[int, str] = {}

    def _window(self) -> int:
        return int(time.time() // self.window_seconds)

    async def _of(self, window: int, *, create: bool) -> str | None:
        known = self._known.get(window)
        if known is not None:
            return known
        key = self.KEY.format(window)
        async with asyncio.timeout(self._timeout):
            if create:
                await self._redis.set(key, secrets.token_urlsafe(24), nx=True, ex=3 * self.window_seconds)
            value = await self._redis.get(key)
        if value is None:
            return None
        nonce = value.decode() if isinstance(value, bytes) else str(value)
        self._known = {w: n for w, n in self._known.items() if w >= window - 1}
        self._known[window] = nonce
        return nonce

    async def current(self) -> str:
        nonce = await self._of(self._window(), create=True)
        if nonce is None:  # set a moment ago; it lives three windows
            raise ProofError("the server nonce could not be made", error="use_dpop_nonce")
        return nonce

    async def accepts(self, nonce: str) -> bool:
        window = self._window()
        if nonce == await self._of(window, create=True):
            return True
        return nonce == await self._of(window - 1, create=False)


class ProofChecker:
    def __init__(
        self,
        *,
        public_url: str,
        first_use: FirstUse,
        nonces: Nonces | None = None,
        max_age_seconds: int = 60,
        leeway_seconds: int = 5,
    ) -> None:
        self.public_url = public_url.rstrip("/")
        self._first_use = first_use
        self.nonces = nonces
        self.max_age = max_age_seconds
        self.leeway = leeway_seconds
        self._keys: dict[str, _ProofKey] = {}

    @property
    def challenge_algorithms(self) -> str:
        return " ".join(ALGORITHMS)

    def _key_of(self, encoded_header: str) -> _ProofKey:
        """The checked header of a proof: its algorithm, the verifying key and
        the key's thumbprint. Clients send the same header with every proof,
        so each distinct one is checked and imported once."""
        known = self._keys.get(encoded_header)
        if known is not None:
            return known
        header = _json_object(encoded_header, "the DPoP proof is not a well-formed JWT")
        if header.get("typ") != PROOF_TYPE:
            raise ProofError(f"the DPoP proof's typ must be {PROOF_TYPE}")
        if "crit" in header:
            raise ProofError("the DPoP proof header has critical extensions this gateway does not understand")
        alg, jwk = header.get("alg"), header.get("jwk")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise ProofError(f"the DPoP proof's alg must be one of {', '.join(ALGORITHMS)}")
        if not isinstance(jwk, dict):
            raise ProofError("the DPoP proof header must carry the public key (jwk)")
        if PRIVATE_JWK_MEMBERS & jwk.keys():
            raise ProofError("the DPoP proof's jwk holds private key material")
        if alg not in algorithms_for(jwk) or jwk.get("alg", alg) != alg:
            raise ProofError(f"the DPoP proof's key cannot sign with {alg}")
        try:
            imported = JWKRegistry.import_key(jwk)
            key = jwt.PyJWK(jwk, algorithm=alg).key
        except (JoseError, jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ProofError("the DPoP proof's jwk is not a usable public key") from exc
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise ProofError(f"the DPoP proof's RSA key is shorter than {MIN_RSA_BITS} bits")
        checked = _ProofKey(jwt.get_algorithm_by_name(alg), key, imported.thumbprint())
        if len(self._keys) >= _KEY_CACHE_LIMIT:
            self._keys.clear()
        self._keys[encoded_header] = checked
        return checked

    async def check(
        self, values: list[str], *, method: str, path: str, access_token: str | None = None
    ) -> Proof:
        """Check the ``DPoP`` header values of a request for ``method`` on
        ``path`` (the raw target; its query is ignored)."""
        if len(values) != 1:
            raise ProofError("send exactly one DPoP proof header" if values else "a DPoP proof is required")
        proof = values[0].strip()
        if not _COMPACT_JWS.fullmatch(proof):
            raise ProofError("the DPoP proof is not a well-formed JWT")
        encoded_header, encoded_claims, signature = proof.split(".")
        checked = self._key_of(encoded_header)
        try:
            verified = checked.algorithm.verify(
                f"{encoded_header}.{encoded_claims}".encode("ascii"), checked.key, _b64decode(signature)
            )
        except (ValueError, TypeError, jwt.PyJWTError):
            verified = False
        if not verified:
            raise ProofError("the DPoP proof's signature does not verify")
        claims = _json_object(encoded_claims, "the DPoP proof's claims are not a JSON object")
        jti, htm, htu, iat = (claims.get(n) for n in ("jti", "htm", "htu", "iat"))
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI:
            raise ProofError("the DPoP proof needs a jti (a string of at most 256 characters)")
        if not isinstance(htm, str) or not isinstance(htu, str):
            raise ProofError("the DPoP proof needs htm and htu")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise ProofError("the DPoP proof needs iat, a number")
        if htm != method:
            raise ProofError(f"the DPoP proof is for {htm[:16]!r}, not for this request's method")
        if not self._same_target(htu, path):
            raise ProofError("the DPoP proof's htu is not this request's URL")
        now = time.time()
        if iat > now + self.leeway:
            raise ProofError("the DPoP proof is issued in the future")
        if iat < now - self.max_age - self.leeway:
            raise ProofError(f"the DPoP proof is older than {self.max_age} s")
        if access_token is not None and claims.get("ath") != token_hash(access_token):
            raise ProofError("the DPoP proof's ath is not the hash of this access token")
        if self.nonces is not None:
            nonce = claims.get("nonce")
            if not isinstance(nonce, str) or not await self.nonces.accepts(nonce):
                raise ProofError(
                    "the DPoP proof must carry the server's current nonce",
                    error="use_dpop_nonce",
                    nonce=await self.nonces.current(),
                )
        jkt = checked.jkt
        # Outlives the window in which the proof could pass the iat check.
        ttl = self.max_age + 2 * self.leeway + 1
        if not await self._first_use(f"{jkt}:{hashlib.sha256(jti.encode()).hexdigest()}", jkt, ttl):
            raise ProofError("the DPoP proof has been used before")
        return Proof(jkt=jkt, jti=jti)

    def _same_target(self, htu: str, path: str) -> bool:
        try:
            claimed = URL(htu)
            expected = URL(self.public_url + path.partition("?")[0])
        except (ValueError, TypeError):
            return False
        if not claimed.is_absolute() or claimed.scheme.lower() not in ("http", "https"):
            return False
        return _origin_and_path(claimed) == _origin_and_path(expected)
