"""Access tokens on the data plane (DESIGN §3 "Tokens" and "Errors").

Every token here goes through the real gateway: a real port, a real upstream,
the real database and Redis. Bad tokens are forged in the test with
``cryptography`` (and pyjwt where it helps), each one a single defect away from
a token the gateway accepts, and a positive control proves the forger makes
tokens the gateway would accept when nothing is wrong with them.

Every refusal must be 401 ``invalid-token`` problem JSON with a ``Bearer``
``WWW-Authenticate`` challenge, and nothing may reach the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from core.errors import InvalidTokenError
from gateway.state import TOKENS
from licensing.keys import load_or_create_signing_key
from licensing.tokens import TokenService
from tests.conftest import World

PROBLEM = "application/problem+json"
DROP = object()  # a header or claim to leave out


# -- forging ----------------------------------------------------------------------


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64u_json(value: Any) -> str:
    return b64u(json.dumps(value, separators=(",", ":")).encode())


def es_signature(key: ec.EllipticCurvePrivateKey, data: bytes, digest: hashes.HashAlgorithm) -> bytes:
    """A JWS ECDSA signature (raw ``r || s``, RFC 7518 §3.4)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def compact(header: Any, claims: Any, sign: Callable[[bytes], bytes] | None = None) -> str:
    """A compact JWS built by hand, so every header and claim is exactly as given."""
    signing_input = f"{b64u_json(header)}.{b64u_json(claims)}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64u(signature)}"


def edited(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for name, value in changes.items():
        if value is DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def hs(secret: bytes, digest: Callable[..., Any] = hashlib.sha256) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, digest).digest()


@dataclass
class Forger:
    """Makes tokens one defect away from the gateway's own."""

    key: ec.EllipticCurvePrivateKey
    header: dict[str, Any]
    claims: dict[str, Any]
    public_jwk: dict[str, Any]
    other_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def es256(self, key: ec.EllipticCurvePrivateKey | None = None) -> Callable[[bytes], bytes]:
        return lambda data: es_signature(key or self.key, data, hashes.SHA256())

    def token(
        self,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        *,
        unsigned: bool = False,
    ) -> str:
        return compact(
            edited(self.header, **(header or {})),
            edited(self.claims, **(claims or {})),
            None if unsigned else (sign or self.es256()),
        )


def public_jwk_of(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return jwk


def load_signing_key(world: World) -> ec.EllipticCurvePrivateKey:
    """The gateway's own active signing key (what a thief of it would hold)."""
    key = world.app[TOKENS].signing_key.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def forger_for(world: World, token: str) -> Forger:
    header, claims = unverified(token)
    return Forger(
        key=load_signing_key(world),
        header=header,
        claims=claims,
        public_jwk=world.app[TOKENS].signing_key.public_jwk,
    )


# -- checking ---------------------------------------------------------------------


async def refusal(
    world: World, path: str, headers: dict[str, str], code: str, status: int = 401
) -> str | None:
    """``None`` if the call was refused as the contract says, else what was wrong."""
    seen = len(world.upstream.seen)
    async with world.client.get(path, headers=headers, allow_redirects=False) as resp:
        raw = await resp.read()
        problems = []
        if resp.status != status:
            problems.append(f"status {resp.status}")
        if resp.content_type != PROBLEM:
            problems.append(f"content type {resp.content_type}")
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
            problems.append(f"body is not JSON: {raw[:200]!r}")
        if body.get("code") != code or body.get("status") != status:
            problems.append(f"code/status {body.get('code')}/{body.get('status')}")
        if not body.get("instance") or body.get("instance") != resp.headers.get("X-Call-Id"):
            problems.append("instance is not the call id")
        if not all(body.get(k) for k in ("type", "title", "detail")):
            problems.append("problem lacks type/title/detail")
        if status == 401 and not resp.headers.get("WWW-Authenticate", "").startswith("Bearer"):
            problems.append(f"WWW-Authenticate {resp.headers.get('WWW-Authenticate')!r}")
        if len(world.upstream.seen) != seen:
            problems.append("the call reached the upstream")
    return "; ".join(problems) or None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def assert_served(world: World, path: str, token: str) -> None:
    status, body, _ = await world.call(path, token)
    assert status == 200, body


# -- tests ------------------------------------------------------------------------


async def test_tokens_on_the_data_plane(world: World) -> None:
    """One licensed app; its genuine token is served, the forger's faithful
    copies are served (so the forger is sound), and every forged or defective
    token and every malformed ``Authorization`` header is refused."""
    ds, _lic, app, token = await world.licensed()
    await check_valid_token_and_forger_controls(world, ds, app, token)
    await check_forged_tokens(world, ds, token)
    await check_authorization_header_shapes(world, ds, app, token)


async def check_valid_token_and_forger_controls(
    world: World, ds: dict[str, Any], app: dict[str, Any], token: str
) -> None:
    path = f"/data/{ds['id']}/hello"
    status, body, resp = await world.call(path, token)
    assert status == 200, body
    assert resp.headers["X-Call-Id"]
    assert body["raw_path"] == "/svc/hello"
    assert "authorization" not in body["header_names"]

    f = forger_for(world, token)
    assert f.header == {"alg": "ES256", "typ": "at+jwt", "kid": f.public_jwk["kid"]}
    assert f.claims["client_id"] == app["client_id"]
    now = int(time.time())
    leeway = world.settings.tokens.leeway_seconds
    # Positive controls: the forger's tokens are accepted when nothing is wrong,
    # so each refusal below is caused by its one defect.
    accepted = {
        "re-signed as issued": f.token(claims={"jti": "tok-control-1"}),
        "typ application/at+jwt": f.token({"typ": "application/at+jwt"}, {"jti": "tok-control-2"}),
        "aud list holding ours": f.token(
            claims={"jti": "tok-control-3", "aud": ["https://other.example", world.settings.audience]}
        ),
        "expired but within leeway": f.token(
            claims={"jti": "tok-control-4", "iat": now - 300, "nbf": now - 300, "exp": now - leeway // 2}
        ),
        "without nbf": f.token(claims={"jti": "tok-control-5", "nbf": DROP}),
    }
    for name, forged in accepted.items():
        status, body, _ = await world.call(path, forged)
        assert status == 200, (name, body)


async def check_forged_tokens(world: World, ds: dict[str, Any], token: str) -> None:
    path = f"/data/{ds['id']}/x"
    f = forger_for(world, token)
    settings = world.settings
    iss, aud = settings.issuer, settings.audience
    leeway = settings.tokens.leeway_seconds
    now = int(time.time())
    kid = f.public_jwk["kid"]
    public_pem = f.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_json = json.dumps(f.public_jwk).encode()
    jwk_compact = json.dumps(f.public_jwk, separators=(",", ":"), sort_keys=True).encode()
    other_jwk = public_jwk_of(f.other_key)
    head, payload, signature = token.split(".")
    tampered_claims = b64u_json({**f.claims, "datasets": [*f.claims["datasets"], "other-provider/*"]})
    tampered_header = b64u_json({**f.header, "typ": "at+jwt", "x": 1})
    other_signature = f.token(claims={"jti": "tok-other"}).split(".")[2]
    huge_header = b'{"typ":"at+jwt","alg":"ES256","kid":' + b"9" * 5000 + b"}"

    cases: dict[str, str] = {
        # alg none, in every spelling, with and without a signature
        "alg none": f.token({"alg": "none"}, unsigned=True),
        "alg None": f.token({"alg": "None"}, unsigned=True),
        "alg NONE, no kid": f.token({"alg": "NONE", "kid": DROP}, unsigned=True),
        "alg none with our signature": f.token({"alg": "none"}),
        "alg none, no typ": f.token({"alg": "none", "typ": DROP}, unsigned=True),
        # HMAC keyed with our public key (algorithm confusion)
        "HS256 with public PEM": f.token({"alg": "HS256"}, sign=hs(public_pem)),
        "HS256 with public PEM, no kid": f.token({"alg": "HS256", "kid": DROP}, sign=hs(public_pem)),
        "HS256 with public JWK JSON": f.token({"alg": "HS256"}, sign=hs(jwk_json)),
        "HS256 with canonical JWK JSON": f.token({"alg": "HS256"}, sign=hs(jwk_compact)),
        "HS384 with public PEM": f.token({"alg": "HS384"}, sign=hs(public_pem, hashlib.sha384)),
        "HS512 with public JWK JSON": f.token({"alg": "HS512"}, sign=hs(jwk_json, hashlib.sha512)),
        # our key, but an algorithm other than the one it was made for
        "alg ES384 signed with our key": f.token(
            {"alg": "ES384"}, sign=lambda d: es_signature(f.key, d, hashes.SHA384())
        ),
        "alg RS256 label": f.token({"alg": "RS256"}),
        "alg EdDSA label": f.token({"alg": "EdDSA"}),
        "alg missing": f.token({"alg": DROP}),
        "alg not a string": f.token({"alg": ["ES256"]}),
        # typ
        "typ missing": f.token({"typ": DROP}),
        "typ JWT": f.token({"typ": "JWT"}),
        "typ dpop+jwt": f.token({"typ": "dpop+jwt"}),
        "typ not a string": f.token({"typ": 1}),
        # iss
        "iss with trailing slash": f.token(claims={"iss": iss + "/"}),
        "iss upper case": f.token(claims={"iss": iss.upper()}),
        "iss https": f.token(claims={"iss": iss.replace("http://", "https://", 1)}),
        "iss missing": f.token(claims={"iss": DROP}),
        "iss as a list": f.token(claims={"iss": [iss]}),
        "iss foreign": f.token(claims={"iss": "https://idp.example"}),
        # aud
        "aud foreign": f.token(claims={"aud": "https://other.example/data"}),
        "aud missing": f.token(claims={"aud": DROP}),
        "aud is the issuer": f.token(claims={"aud": iss}),
        "aud with trailing slash": f.token(claims={"aud": aud + "/"}),
        "aud empty list": f.token(claims={"aud": []}),
        # time
        "exp missing": f.token(claims={"exp": DROP}),
        "expired beyond leeway": f.token(
            claims={"iat": now - 600, "nbf": now - 600, "exp": now - leeway - 30}
        ),
        "exp as a string": f.token(claims={"exp": str(now + 300)}),
        "exp not a number": f.token(claims={"exp": "soon"}),
        "nbf in the future": f.token(claims={"nbf": now + leeway + 60}),
        "iat in the future": f.token(claims={"iat": now + leeway + 60, "nbf": DROP}),
        "iat missing": f.token(claims={"iat": DROP}),
        "iat as a string": f.token(claims={"iat": str(now)}),
        # header extensions the gateway does not understand or follow
        "crit exp": f.token({"crit": ["exp"], "exp": now + 60}),
        "crit unknown": f.token({"crit": ["urn:example:ext"], "urn:example:ext": True}),
        "crit empty list": f.token({"crit": []}),
        "jku elsewhere": f.token({"jku": "https://attacker.example/jwks.json"}),
        "x5u elsewhere": f.token({"x5u": "https://attacker.example/cert.pem"}),
        "x5c chain": f.token({"x5c": ["MIIB"]}),
        "jwk of our own key": f.token({"jwk": f.public_jwk}),
        "jwk of another key": f.token({"jwk": {**other_jwk, "kid": kid}}, sign=f.es256(f.other_key)),
        # keys
        "kid unknown": f.token({"kid": "unknown-key-id"}),
        "kid missing": f.token({"kid": DROP}),
        "kid not a string": f.token({"kid": 7}),
        "another EC key with our kid": f.token(sign=f.es256(f.other_key)),
        "another EC key with its own kid": f.token(
            {"kid": jwt.PyJWK(other_jwk).key_id or "other"}, sign=f.es256(f.other_key)
        ),
        # tampering
        "payload tampered": f"{head}.{tampered_claims}.{signature}",
        "header tampered": f"{tampered_header}.{payload}.{signature}",
        "signature of another token": f"{head}.{payload}.{other_signature}",
        "signature truncated": f"{head}.{payload}.{signature[:-4]}",
        "signature empty": f"{head}.{payload}.",
        # the pdg claims
        "licence missing": f.token(claims={"licence": DROP}),
        "purpose missing": f.token(claims={"purpose": DROP}),
        "datasets missing": f.token(claims={"datasets": DROP}),
        "licensee missing": f.token(claims={"licensee": DROP}),
        "client_id missing": f.token(claims={"client_id": DROP}),
        "sub missing": f.token(claims={"sub": DROP}),
        "jti missing": f.token(claims={"jti": DROP}),
        "datasets as a string": f.token(claims={"datasets": ds["id"]}),
        "datasets holding a number": f.token(claims={"datasets": [ds["id"], 1]}),
        "licence empty": f.token(claims={"licence": ""}),
        "client_id differs from sub": f.token(claims={"client_id": "someone-else"}),
        # garbage
        "one word": "garbage",
        "three dots": "a.b.c",
        "two parts": f"{head}.{payload}",
        "five parts (JWE shape)": f"{head}.{payload}.{signature}.a.b",
        "empty parts": "..",
        "empty JSON objects": "e30.e30.",
        "header is a JSON array": f"{b64u_json([f.header])}.{payload}.{signature}",
        "header is not JSON": f"{b64u(b'not json')}.{payload}.{signature}",
        "header is not UTF-8": f"{b64u(bytes([0xFF, 0xFE, 0x7B]))}.{payload}.{signature}",
        "payload is a JSON array": f"{head}.{b64u_json([1])}.{signature}",
        "huge number in header": f"{b64u(huge_header)}.{payload}.{signature}",
        "not base64": "!!!.@@@.###",
        "token repeated": f"{token}.{token}",
    }
    failures = []
    for name, forged in cases.items():
        problem = await refusal(world, path, bearer(forged), "invalid-token")
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)
    # And the genuine token still works after all that.
    await assert_served(world, path, token)


async def check_authorization_header_shapes(
    world: World, ds: dict[str, Any], app: dict[str, Any], token: str
) -> None:
    path = f"/data/{ds['id']}/x"
    basic = base64.b64encode(f"{app['client_id']}:{app['client_secret']}".encode()).decode()

    async with world.client.get(path) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 401
        assert resp.content_type == PROBLEM
        assert body["code"] == "token-required"
        assert body["status"] == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    cases = {
        "Basic with the app's own secret": f"Basic {basic}",
        "bare Bearer": "Bearer",
        "Bearer and spaces": "Bearer    ",
        "Bearer with a comma list": f"Bearer {token}, Bearer {token}",
        "two tokens": f"Bearer {token} {token}",
        "token without scheme": token,
        "unknown scheme": f"Token {token}",
        "DPoP scheme with a token not bound to a key": f"DPoP {token}",
    }
    failures = []
    for name, value in cases.items():
        problem = await refusal(world, path, {"Authorization": value}, "invalid-token")
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)
    # Two Authorization headers, in either order: refused, never "first wins".
    for pair in ((f"Bearer {token}", "Bearer garbage"), ("Bearer garbage", f"Bearer {token}")):
        async with world.client.get(path, headers=[("Authorization", v) for v in pair]) as resp:
            body = await resp.json(content_type=None)
            assert (resp.status, body["code"]) == (401, "invalid-token"), body
    # The scheme name is case-insensitive (RFC 9110 §11.1).
    status, body, _ = await world.call(path, headers={"Authorization": f"bearer {token}"})
    assert status == 200, body


async def test_token_for_another_licensees_licence_is_refused(world: World) -> None:
    ds, lic_a, app_a, token_a = await world.licensed()
    other = await world.licensee()
    lic_b = await world.licence(other["id"], [ds["id"]])
    app_b = await world.app_client(
        other["id"], jwks={"keys": [public_jwk_of(ec.generate_private_key(ec.SECP256R1()))]}
    )
    path = f"/data/{ds['id']}/x"
    await assert_served(world, path, token_a)

    f = forger_for(world, token_a)
    assert f.claims["licence"] == lic_a["id"]
    cases = {
        # A's app, B's licence (and B's licensee), minted with the gateway's own key
        "B's licence": f.token(claims={"licence": lic_b["id"], "licensee": other["id"]}),
        "B's licence, A's licensee": f.token(claims={"licence": lic_b["id"]}),
        "B's app on A's licence": f.token(
            claims={"client_id": app_b["client_id"], "sub": app_b["client_id"]}
        ),
        "unknown licence": f.token(claims={"licence": "lic-does-not-exist"}),
        "unknown app": f.token(claims={"client_id": "app-nobody", "sub": "app-nobody"}),
        "A's app and licence, B's licensee": f.token(claims={"licensee": other["id"]}),
    }
    failures = []
    for name, forged in cases.items():
        problem = await refusal(world, path, bearer(forged), "invalid-token")
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)
    assert app_a["client_id"] != app_b["client_id"]


async def test_token_is_rechecked_against_live_licence_and_app(world: World) -> None:
    """A verified token is cached, but the licence's live status and the app
    are checked on every call."""
    ds = await world.dataset()
    ds2 = await world.dataset()
    licensee = await world.licensee()
    lic = await world.licence(licensee["id"], [ds["id"], ds2["id"]])
    app = await world.app_client(licensee["id"])
    token = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
    path = f"/data/{ds['id']}/x"
    await assert_served(world, path, token)  # now cached
    # The token's datasets claim limits it even where the licence is wider.
    assert await refusal(world, f"/data/{ds2['id']}/x", bearer(token), "dataset-not-licensed", 403) is None
    assert await refusal(world, "/data/no-such-dataset/x", bearer(token), "unknown-dataset", 404) is None

    await world.admin_post(f"/licences/{lic['id']}/suspend", expect=200)
    assert await refusal(world, path, bearer(token), "licence-inactive", 403) is None
    await world.admin_post(f"/licences/{lic['id']}/resume", expect=200)
    await assert_served(world, path, token)

    await world.admin_post(f"/apps/{app['client_id']}/disable", expect=200)
    assert await refusal(world, path, bearer(token), "invalid-token") is None

    await world.admin_post(f"/apps/{app['client_id']}/enable", expect=200)
    await world.admin_post(f"/licences/{lic['id']}/revoke", expect=200)
    assert await refusal(world, path, bearer(token), "licence-inactive", 403) is None


async def test_tokens_of_another_replica_verify_at_once(
    world_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """Replicas share public keys through the database: a token signed by a
    replica that started a moment ago verifies everywhere (DESIGN §3, keys
    rotate without downtime), and the JWKS lists both keys."""
    world_a: World = await world_factory()
    ds, _lic, app, token_a = await world_a.licensed()
    world_b: World = await world_factory(tokens__signing_key_file=str(tmp_path / "replica-b.pem"))
    kid_a = world_a.app[TOKENS].signing_key.kid
    kid_b = world_b.app[TOKENS].signing_key.kid
    assert kid_a != kid_b

    deadline = time.monotonic() + 3
    while True:  # replica B sees the app once its catalogue refreshes (0.2 s)
        status, body = await world_b.token_response(app, f"purpose:public-interest dataset:{ds['id']}")
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert status == 200, body
    token_b = body["access_token"]
    assert jwt.get_unverified_header(token_b)["kid"] == kid_b

    status, body, _ = await world_a.call(f"/data/{ds['id']}/x", token_b)
    assert status == 200, body
    status, body, _ = await world_b.call(f"/data/{ds['id']}/x", token_a)
    assert status == 200, body
    async with world_a.client.get("/.well-known/jwks.json") as resp:
        kids = {k["kid"] for k in (await resp.json())["keys"]}
    assert {kid_a, kid_b} <= kids


# -- the service itself -----------------------------------------------------------


async def test_unknown_kid_is_refused_when_the_key_store_fails(tmp_path: Path) -> None:
    """If the key store cannot be read, a token naming an unknown key is refused
    as invalid (fail closed) rather than crashing the call; known keys still work."""
    own = load_or_create_signing_key(tmp_path / "key.pem", "ES256")
    loads = []

    async def broken() -> list[dict[str, Any]]:
        loads.append(time.monotonic())
        raise OSError("database unreachable")

    service = TokenService(
        signing_key=own, issuer="http://gw", audience="http://gw/data", load_public_keys=broken
    )
    token, ttl = service.issue(
        app_id="app-1", licensee_id="le-1", licence_id="lic-1", purpose="industrial", datasets=["d"]
    )
    claims = await service.verify(token)
    assert (claims.app_id, claims.licence_id, claims.datasets, ttl) == (
        "app-1",
        "lic-1",
        frozenset({"d"}),
        300,
    )
    header, payload = unverified(token)
    assert isinstance(own.private_key, ec.EllipticCurvePrivateKey)
    key = own.private_key
    forged = [
        compact(
            {**header, "kid": f"rotated-away-{i}"}, payload, lambda d: es_signature(key, d, hashes.SHA256())
        )
        for i in range(3)
    ]
    results = await asyncio.gather(*(service.verify(t) for t in forged), return_exceptions=True)
    for result in results:
        assert isinstance(result, InvalidTokenError), result
        assert result.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(loads) == 1  # concurrent unknown kids share one refresh
