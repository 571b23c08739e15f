"""OAuth 2.0 client authentication at the token endpoint.

Three methods (RFC 6749 §2.3, OpenID Connect Core §9, RFC 7523):

- ``client_secret_basic``: HTTP Basic with the form-urlencoded id and secret;
- ``client_secret_post``: ``client_id`` and ``client_secret`` in the form;
- ``private_key_jwt``: a JWT signed by a key in the app's registered JWKS,
  ``iss`` = ``sub`` = the client id, ``aud`` = our token endpoint or issuer,
  a short ``exp`` and a ``jti`` that is accepted once (replays are refused).

A request that uses more than one method, or none, is refused. Secrets are
compared against their Argon2id hashes only. An assertion's ``exp`` / ``iat``
/ ``nbf`` must be JSON numbers and its ``jti`` a non-empty string; RSA client
keys must have at least 2048 bits; a registered key that cannot be used
refuses the client (401), it never fails the endpoint.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from core.errors import BadRequestError, InvalidClientError
from licensing.catalogue import AppView, Catalogue
from licensing.secrets import verify_secret_async
from storage.db import utcnow

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Algorithms a client's key may sign assertions with, by key type / curve.
_ALGORITHMS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-384"): ("ES384",),
    ("EC", "P-521"): ("ES512",),
    ("RSA", None): ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    ("OKP", "Ed25519"): ("EdDSA",),
}

#: All of them, for the RFC 8414 metadata.
SIGNING_ALGORITHMS: tuple[str, ...] = tuple(dict.fromkeys(a for algs in _ALGORITHMS.values() for a in algs))
MIN_RSA_BITS = 2048
#: JWK members that only a private (or symmetric) key has: a public key
#: handed to us (a DPoP proof's, an issuer's JWKS) holds none of them.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def algorithms_for(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The signature algorithms a public JWK may be used with (none for a
    symmetric or unknown key)."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if not isinstance(kty, str) or not (crv is None or isinstance(crv, str)):
        return ()
    return _ALGORITHMS.get((kty, crv if kty != "RSA" else None), ())


#: ``first_use(key, hash_tag, ttl)``: True the first time ``key`` is offered
#: within ``ttl`` seconds, on any replica.
FirstUse = Callable[[str, str, int], Awaitable[bool]]


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _invalid(detail: str) -> InvalidClientError:
    return InvalidClientError(
        detail, headers={"WWW-Authenticate": 'Basic realm="pdg"'}, error="invalid_client"
    )


def _basic_credentials(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise BadRequestError(
            "only Basic authorization is accepted at the token endpoint", error="invalid_request"
        )
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise _invalid("malformed Basic credentials") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise _invalid("malformed Basic credentials")
    return unquote_plus(client_id), unquote_plus(secret)


def claimed_client_id(authorization: str | None, form: Mapping[str, str]) -> str | None:
    """The client id a token request names, before anything is checked (for
    throttling failures): the Basic user, the form's ``client_id``, or the
    assertion's ``iss``. None when it names none or cannot be read."""
    if authorization:
        try:
            return _basic_credentials(authorization)[0]
        except (BadRequestError, InvalidClientError):
            return None
    if form.get("client_id"):
        return form["client_id"]
    assertion = form.get("client_assertion")
    if assertion:
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError:
            return None
        return issuer if isinstance(issuer, str) else None
    return None


class ClientAuthenticator:
    def __init__(self, *, audiences: list[str], max_assertion_age: int, first_use: FirstUse) -> None:
        self._audiences = audiences
        self._max_age = max_assertion_age
        self._first_use = first_use

    async def authenticate(
        self, catalogue: Catalogue, authorization: str | None, form: Mapping[str, str]
    ) -> tuple[AppView, str]:
        """The authenticated app and the method it used."""
        methods = []
        if authorization:
            methods.append("client_secret_basic")
        if "client_secret" in form:
            methods.append("client_secret_post")
        if "client_assertion" in form or "client_assertion_type" in form:
            methods.append("private_key_jwt")
        if len(methods) != 1:
            if not methods:
                raise _invalid(
                    "no client authentication (use client_secret_basic, client_secret_post "
                    "or private_key_jwt)"
                )
            raise BadRequestError("use exactly one client authentication method", error="invalid_request")
        method = methods[0]
        if method == "private_key_jwt":
            return await self._private_key_jwt(catalogue, form), method
        if method == "client_secret_basic":
            client_id, secret = _basic_credentials(authorization or "")
            if form.get("client_id") not in (None, client_id):
                raise BadRequestError(
                    "client_id in the form differs from the Basic credentials", error="invalid_request"
                )
        else:
            client_id, secret = form.get("client_id", ""), form["client_secret"]
        app = catalogue.apps.get(client_id)
        stored = app.secret_hash if app is not None else None
        # An unknown id is checked against a stand-in hash, and a failure
        # always against a second (the secret before a rotation, while it is
        # accepted, or a stand-in): every refusal takes as long.
        if await verify_secret_async(stored, secret) and app is not None:
            return app, method
        previous = None
        if app is not None and app.previous_secret_until is not None and app.previous_secret_until > utcnow():
            previous = app.previous_secret_hash
        if not await verify_secret_async(previous, secret) or app is None:
            raise _invalid("unknown client or wrong secret")
        return app, method

    async def _private_key_jwt(self, catalogue: Catalogue, form: Mapping[str, str]) -> AppView:
        if form.get("client_assertion_type") != JWT_BEARER:
            raise BadRequestError(f"client_assertion_type must be {JWT_BEARER}", error="invalid_request")
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise _invalid("client_assertion is not a well-formed JWT") from exc
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or unverified.get("sub") != client_id:
            raise _invalid("client_assertion must have iss = sub = client_id")
        if form.get("client_id") not in (None, client_id):
            raise _invalid("client_id differs from the assertion's issuer")
        if "crit" in header or any(h in header for h in ("jku", "jwk", "x5u", "x5c")):
            raise _invalid("client_assertion header carries fields this gateway does not accept")
        app = catalogue.apps.get(client_id)
        if app is None or app.jwks is None:
            raise _invalid("unknown client, or it has no registered keys")
        key, alg = _pick_key(app.jwks, header)
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=self._audiences,
                issuer=client_id,
                leeway=10,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"client_assertion rejected: {type(exc).__name__}") from exc
        if not all(_numeric(claims[n]) for n in ("exp", "iat", "nbf") if n in claims):
            raise _invalid("client_assertion exp, iat and nbf must be numbers")
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise _invalid("client_assertion needs a non-empty jti")
        lifetime = int(claims["exp"] - time.time())
        if lifetime > self._max_age:
            raise _invalid(f"client_assertion lives too long (at most {self._max_age} s)")
        if not await self._first_use(f"{client_id}:{claims['jti']}", client_id, max(lifetime, 1) + 10):
            raise _invalid("client_assertion has been used before")
        return app


def _pick_key(jwks: Mapping[str, Any], header: Mapping[str, Any]) -> tuple[Any, str]:
    alg = header.get("alg")
    kid = header.get("kid")
    candidates = [k for k in jwks.get("keys", []) if kid is None or k.get("kid") == kid]
    for jwk in candidates:
        if alg in algorithms_for(jwk) and jwk.get("alg", alg) == alg:
            try:
                key = jwt.PyJWK(dict(jwk), algorithm=alg).key
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                raise _invalid("the registered key cannot be used") from exc
            if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
                raise _invalid(f"the registered RSA key is shorter than {MIN_RSA_BITS} bits")
            return key, alg
    raise _invalid("no registered key matches the assertion's kid and alg")
