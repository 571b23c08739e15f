"""The OAuth 2.0 endpoints (DESIGN §3): ``POST /oauth/token`` (client
credentials; client_secret_basic, client_secret_post and private_key_jwt),
``GET /.well-known/jwks.json`` and the RFC 8414 metadata.

All through the real gateway. Refusals are RFC 9457 problem JSON that also
carry RFC 6749's ``error``. Most scope and licence cases authenticate with
``private_key_jwt`` (signing an assertion costs microseconds; an Argon2 secret
check costs far more), the secret methods have their own test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from core.errors import BadRequestError
from gateway import oauth
from tests.conftest import World

PROBLEM = "application/problem+json"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DROP = object()


# -- helpers ----------------------------------------------------------------------


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    def part(value: Any) -> str:
        return b64u(json.dumps(value, separators=(",", ":")).encode())

    signing_input = f"{part(header)}.{part(claims)}"
    return f"{signing_input}.{b64u(sign(signing_input.encode()) if sign else b'')}"


def es(
    key: ec.EllipticCurvePrivateKey, digest: hashes.HashAlgorithm | None = None
) -> Callable[[bytes], bytes]:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest or hashes.SHA256())))
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def signer(key: Any, alg: str) -> Callable[[bytes], bytes]:
    """The JWS signature of ``key`` for ``alg`` (its own algorithm)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return es(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign
    assert isinstance(key, rsa.RSAPrivateKey)
    if alg == "PS256":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        return lambda data: key.sign(data, pss, hashes.SHA256())
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def public_jwk(key: Any, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    elif isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
    jwk.update(extra)
    assert isinstance(jwk, dict)
    return jwk


@dataclass
class KeyClient:
    """An app registered with a public key (private_key_jwt, RFC 7523)."""

    app: dict[str, Any]
    key: Any
    kid: str
    alg: str
    token_endpoint: str

    @property
    def client_id(self) -> str:
        return str(self.app["client_id"])

    def assertion(
        self,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
    ) -> str:
        now = int(time.time())
        base_claims: dict[str, Any] = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_endpoint,
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_hex(12),
        }
        base_header: dict[str, Any] = {"alg": self.alg, "typ": "JWT", "kid": self.kid}
        for base, changes in ((base_header, header), (base_claims, claims)):
            for name, value in (changes or {}).items():
                if value is DROP:
                    base.pop(name, None)
                else:
                    base[name] = value
        return compact(base_header, base_claims, sign or signer(self.key, self.alg))

    def form(self, scope: str, assertion: str | None = None, **extra: str) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion if assertion is not None else self.assertion(),
            **extra,
        }


async def key_client(world: World, licensee_id: str, key: Any = None, alg: str = "ES256") -> KeyClient:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    kid = f"k-{secrets.token_hex(4)}"
    app = await world.app_client(licensee_id, jwks={"keys": [public_jwk(key, kid=kid, use="sig")]})
    return KeyClient(app, key, kid, alg, f"{world.settings.public_url}/oauth/token")


async def post_token(
    world: World,
    form: Any = None,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> tuple[int, dict[str, Any], Any]:
    async with world.client.post("/oauth/token", data=form, headers=headers or {}, **kw) as resp:
        raw = await resp.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"unparsed": raw.decode("utf-8", "replace")}
        return resp.status, body, resp


def problem(
    result: tuple[int, dict[str, Any], Any], status: int, code: str, error: str | None = None
) -> str | None:
    """``None`` if ``result`` is the expected refusal, else what differs."""
    got, body, resp = result
    wrong = []
    if got != status:
        wrong.append(f"status {got}")
    if resp.content_type != PROBLEM:
        wrong.append(f"content type {resp.content_type}")
    if body.get("code") != code or body.get("status") != status:
        wrong.append(f"code/status {body.get('code')}/{body.get('status')}")
    if error is not None and body.get("error") != error:
        wrong.append(f"error {body.get('error')!r}")
    if not body.get("instance") or body.get("instance") != resp.headers.get("X-Call-Id"):
        wrong.append("instance is not the call id")
    if status == 401 and "WWW-Authenticate" not in resp.headers:
        wrong.append("no WWW-Authenticate")
    if "access_token" in body:
        wrong.append("a token was issued")
    return f"{wrong} {body.get('detail', body)}" if wrong else None


def check_all(results: dict[str, str | None]) -> None:
    failures = [f"{name}: {why}" for name, why in results.items() if why]
    assert not failures, "\n".join(failures)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def issued(world: World, form: dict[str, str], headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, body, resp = await post_token(world, form, headers)
    assert status == 200, body
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    return body


def claims_of(body: dict[str, Any]) -> dict[str, Any]:
    return jwt.decode(body["access_token"], options={"verify_signature": False})


# -- discovery --------------------------------------------------------------------


async def test_metadata_and_jwks(world: World) -> None:
    """RFC 8414 metadata and the JWKS; then the shape of token requests."""
    base = world.settings.public_url
    async with world.client.get("/.well-known/oauth-authorization-server") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        meta = await resp.json()
    assert meta["issuer"] == world.settings.issuer
    assert meta["token_endpoint"] == f"{base}/oauth/token"
    assert meta["jwks_uri"] == f"{base}/.well-known/jwks.json"
    assert set(meta["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    }
    assert meta["grant_types_supported"] == ["client_credentials"]
    algs = set(meta["token_endpoint_auth_signing_alg_values_supported"])
    assert {"ES256", "EdDSA", "RS256", "PS256"} <= algs
    assert not any(a.startswith("HS") or a.lower() == "none" for a in algs)

    async with world.client.get("/.well-known/jwks.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        keys = (await resp.json())["keys"]
    assert keys
    for key in keys:
        assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & set(key), "private key material in the JWKS"
        assert key["kid"]
        assert key["use"] == "sig"
        assert key["alg"] in ("ES256", "EdDSA")
    # The JWKS endpoint only answers GET; the token endpoint only POST.
    async with world.client.post("/.well-known/jwks.json") as resp:
        assert resp.status == 405
    async with world.client.get("/oauth/token") as resp:
        assert resp.status == 405
        assert resp.content_type == PROBLEM
    await check_token_request_format(world)


# -- client secrets ---------------------------------------------------------------


async def test_client_secret_methods_issue_rfc9068_tokens(world: World) -> None:
    ds = await world.dataset()
    licensee = await world.licensee()
    lic = await world.licence(licensee["id"], [ds["id"]])
    app = await world.app_client(licensee["id"])
    assert app["auth_method"] == "client_secret"
    assert app["client_secret"]
    client_id, secret = app["client_id"], app["client_secret"]
    scope = f"purpose:public-interest dataset:{ds['id']}"

    by_basic = await issued(
        world, {"grant_type": "client_credentials", "scope": scope}, basic(client_id, secret)
    )
    by_post = await issued(
        world,
        {"grant_type": "client_credentials", "scope": scope, "client_id": client_id, "client_secret": secret},
    )
    ttl = world.settings.tokens.access_token_ttl_seconds
    for body in (by_basic, by_post):
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == ttl
        assert body["scope"] == scope

    # RFC 9068: header typ at+jwt and kid; the claims; verifies against the JWKS.
    async with world.client.get("/.well-known/jwks.json") as resp:
        jwks = jwt.PyJWKSet.from_dict(await resp.json())
    jtis = set()
    for body in (by_basic, by_post):
        header = jwt.get_unverified_header(body["access_token"])
        assert header["typ"] == "at+jwt"
        assert header["alg"] == "ES256"
        key = jwks[header["kid"]]
        claims = jwt.decode(
            body["access_token"],
            key.key,
            algorithms=["ES256"],
            audience=world.settings.audience,
            issuer=world.settings.issuer,
            options={"require": ["iss", "aud", "exp", "iat", "jti", "sub", "client_id"]},
        )
        assert claims["client_id"] == claims["sub"] == client_id
        assert claims["licensee"] == licensee["id"]
        assert claims["licence"] == lic["id"]
        assert claims["purpose"] == "public-interest"
        assert claims["datasets"] == [ds["id"]]
        assert claims["exp"] - claims["iat"] == ttl
        assert abs(claims["iat"] - time.time()) < 30
        jtis.add(claims["jti"])
    assert len(jtis) == 2
    # Both tokens work on the data plane.
    for body in (by_basic, by_post):
        status, answer, _ = await world.call(f"/data/{ds['id']}/x", body["access_token"])
        assert status == 200, answer

    # Form-urlencoded Basic credentials (RFC 6749 §2.3.1) are decoded.
    encoded = {
        "Authorization": "Basic "
        + base64.b64encode(f"{client_id}:{secret}".replace("-", "%2D").encode()).decode()
    }
    await issued(world, {"grant_type": "client_credentials", "scope": scope}, encoded)

    # Refusals of client authentication.
    form = {"grant_type": "client_credentials", "scope": scope}
    wrong = secret[:-2] + ("AA" if not secret.endswith("AA") else "BB")
    check_all(
        {
            "wrong secret, basic": problem(
                await post_token(world, form, basic(client_id, wrong)),
                401,
                "invalid-client",
                "invalid_client",
            ),
            "wrong secret, post": problem(
                await post_token(world, {**form, "client_id": client_id, "client_secret": wrong}),
                401,
                "invalid-client",
                "invalid_client",
            ),
            "unknown client": problem(
                await post_token(world, form, basic("app-nobody", secret)),
                401,
                "invalid-client",
                "invalid_client",
            ),
            "post without client_id": problem(
                await post_token(world, {**form, "client_secret": secret}), 401, "invalid-client"
            ),
            "no client authentication": problem(await post_token(world, form), 401, "invalid-client"),
            "both basic and post": problem(
                await post_token(
                    world, {**form, "client_id": client_id, "client_secret": secret}, basic(client_id, secret)
                ),
                400,
                "bad-request",
                "invalid_request",
            ),
            "basic and a client assertion": problem(
                await post_token(
                    world,
                    {**form, "client_assertion_type": JWT_BEARER, "client_assertion": "x.y.z"},
                    basic(client_id, secret),
                ),
                400,
                "bad-request",
                "invalid_request",
            ),
            "basic not base64": problem(
                await post_token(world, form, {"Authorization": "Basic !!!"}), 401, "invalid-client"
            ),
            "basic without colon": problem(
                await post_token(world, form, {"Authorization": "Basic " + base64.b64encode(b"x").decode()}),
                401,
                "invalid-client",
            ),
            "form client_id differs from basic": problem(
                await post_token(world, {**form, "client_id": "app-other"}, basic(client_id, secret)),
                400,
                "bad-request",
                "invalid_request",
            ),
            "bearer at the token endpoint": problem(
                await post_token(world, form, {"Authorization": f"Bearer {by_basic['access_token']}"}),
                400,
                "bad-request",
                "invalid_request",
            ),
        }
    )
    # A disabled app gets no token, however it authenticates.
    await world.admin_post(f"/apps/{client_id}/disable", expect=200)
    status, body, resp = await post_token(world, form, basic(client_id, secret))
    assert status == 401, body
    assert resp.content_type == PROBLEM
    assert "access_token" not in body
    assert (body["code"], body.get("error")) == ("invalid-client", "invalid_client"), body


async def check_token_request_format(world: World) -> None:
    ds = await world.dataset()
    licensee = await world.licensee()
    await world.licence(licensee["id"], [ds["id"]])
    client = await key_client(world, licensee["id"])
    scope = f"purpose:public-interest dataset:{ds['id']}"
    await issued(world, client.form(scope))  # the control: a proper request works

    def without(name: str) -> dict[str, str]:
        return {k: v for k, v in client.form(scope).items() if k != name}

    check_all(
        {
            "JSON body": problem(
                await post_token(world, json=client.form(scope)), 400, "bad-request", "invalid_request"
            ),
            "multipart body": problem(
                await post_token(world, _multipart(client.form(scope))),
                400,
                "bad-request",
                "invalid_request",
            ),
            "no body": problem(await post_token(world), 400, "bad-request", "invalid_request"),
            "grant_type password": problem(
                await post_token(world, {**client.form(scope), "grant_type": "password"}),
                400,
                "bad-request",
                "unsupported_grant_type",
            ),
            "grant_type authorization_code": problem(
                await post_token(world, {**client.form(scope), "grant_type": "authorization_code"}),
                400,
                "bad-request",
                "unsupported_grant_type",
            ),
            "grant_type jwt-bearer": problem(
                await post_token(
                    world,
                    {**client.form(scope), "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"},
                ),
                400,
                "bad-request",
                "unsupported_grant_type",
            ),
            "grant_type missing": problem(await post_token(world, without("grant_type")), 400, "bad-request"),
            "scope repeated": problem(
                await post_token(world, [*client.form(scope).items(), ("scope", "purpose:industrial")]),
                400,
                "bad-request",
                "invalid_request",
            ),
        }
    )


def _multipart(fields: dict[str, str]) -> Any:
    import aiohttp

    return aiohttp.FormData(fields, default_to_multipart=True)


# -- scope and licence rules ------------------------------------------------------


async def test_scope_and_licence_rules(world: World) -> None:
    ds1 = await world.dataset(provider="prov-a")
    ds2 = await world.dataset(provider="prov-a")
    ds3 = await world.dataset(provider="prov-b")
    high = await world.dataset(provider="prov-b", classification=3)
    closed = await world.dataset(provider="prov-c", open_class="closed")
    licensee = await world.licensee()
    lic = await world.licence(
        licensee["id"],
        [ds1["id"], "prov-b/*", closed["id"]],
        purposes=["public-interest"],
        max_classification=2,
    )
    client = await key_client(world, licensee["id"])

    async def grant(scope: str) -> dict[str, Any]:
        return await issued(world, client.form(scope))

    async def refuse(scope: str, status: int, code: str, error: str | None = "invalid_scope") -> str | None:
        return problem(await post_token(world, client.form(scope)), status, code, error)

    # Granted: named datasets, provider wildcards the licence grants, and all.
    body = await grant(f"purpose:public-interest dataset:{ds1['id']}")
    assert claims_of(body)["datasets"] == [ds1["id"]]
    assert claims_of(body)["licence"] == lic["id"]
    body = await grant("purpose:public-interest dataset:prov-b/*")
    assert claims_of(body)["datasets"] == ["prov-b/*"]
    assert body["scope"] == "purpose:public-interest dataset:prov-b/*"
    status, answer, _ = await world.call(f"/data/{ds3['id']}/x", body["access_token"])
    assert status == 200, answer
    body = await grant(
        f"dataset:{ds3['id']}   purpose:public-interest dataset:{ds1['id']} dataset:{ds1['id']}"
    )
    assert claims_of(body)["datasets"] == [ds3["id"], ds1["id"]]
    body = await grant("purpose:public-interest")  # no datasets: what the licence grants
    assert sorted(claims_of(body)["datasets"]) == sorted([ds1["id"], "prov-b/*", closed["id"]])
    assert claims_of(body)["purpose"] == "public-interest"
    body = await grant(f"purpose:public-interest licence:{lic['id']}")
    assert claims_of(body)["licence"] == lic["id"]

    check_all(
        {
            "purpose not granted": await refuse(
                f"purpose:industrial dataset:{ds1['id']}", 403, "purpose-not-allowed"
            ),
            "dataset not granted": await refuse(
                f"purpose:public-interest dataset:{ds2['id']}", 403, "dataset-not-licensed"
            ),
            "one of two datasets not granted": await refuse(
                f"purpose:public-interest dataset:{ds1['id']} dataset:{ds2['id']}",
                403,
                "dataset-not-licensed",
            ),
            "provider wildcard wider than the licence": await refuse(
                "purpose:public-interest dataset:prov-a/*", 403, "dataset-not-licensed"
            ),
            "unlicensed provider wildcard": await refuse(
                "purpose:public-interest dataset:prov-z/*", 403, "dataset-not-licensed"
            ),
            "above max_classification": await refuse(
                f"purpose:public-interest dataset:{high['id']}", 403, "dataset-not-licensed"
            ),
            "closed dataset": await refuse(
                f"purpose:public-interest dataset:{closed['id']}", 403, "dataset-closed"
            ),
            "unknown dataset": await refuse("purpose:public-interest dataset:no-such-ds", 400, "bad-request"),
            "no scope": await refuse("", 400, "bad-request"),
            "no purpose": await refuse(f"dataset:{ds1['id']}", 400, "bad-request"),
            "two purposes": await refuse("purpose:public-interest purpose:industrial", 400, "bad-request"),
            "unknown purpose": await refuse("purpose:commercial", 400, "bad-request"),
            "purpose upper case": await refuse("purpose:PUBLIC-INTEREST", 400, "bad-request"),
            "empty purpose": await refuse("purpose:", 400, "bad-request"),
            "unknown scope kind": await refuse("purpose:public-interest read", 400, "bad-request"),
            "admin scope": await refuse("purpose:public-interest admin:all", 400, "bad-request"),
            "openid scope": await refuse("openid purpose:public-interest", 400, "bad-request"),
            "empty dataset": await refuse("purpose:public-interest dataset:", 400, "bad-request"),
            "dataset with a path": await refuse(
                f"purpose:public-interest dataset:{ds1['id']}/x", 400, "bad-request"
            ),
            "bare wildcard": await refuse("purpose:public-interest dataset:*", 400, "bad-request"),
            "tab separated": await refuse(
                f"purpose:public-interest\tdataset:{ds1['id']}", 400, "bad-request"
            ),
            "quote in scope": await refuse('purpose:public-interest dataset:"x"', 400, "bad-request"),
            "two licences": await refuse(
                f"purpose:public-interest licence:{lic['id']} licence:lic-other", 400, "bad-request"
            ),
            "unknown licence": await refuse("purpose:public-interest licence:lic-nope", 400, "bad-request"),
        }
    )

    # Licence status, and the choice among several licences of one licensee.
    lic2 = await world.licence(licensee["id"], [ds2["id"]], purposes=["industrial"])
    body = await grant(f"purpose:industrial dataset:{ds2['id']}")
    assert claims_of(body)["licence"] == lic2["id"]
    assert claims_of(await grant("purpose:industrial"))["datasets"] == [ds2["id"]]
    other = await world.licensee()
    other_lic = await world.licence(other["id"], [ds1["id"]])
    old = await world.licence(
        licensee["id"], [ds3["id"]], valid_from="2020-01-01T00:00:00Z", valid_until="2021-01-01T00:00:00Z"
    )
    future = await world.licence(
        licensee["id"], [ds3["id"]], valid_from="2090-01-01T00:00:00Z", valid_until="2099-01-01T00:00:00Z"
    )
    results = {
        "licence picked that lacks the dataset": await refuse(
            f"purpose:industrial licence:{lic2['id']} dataset:{ds1['id']}", 403, "dataset-not-licensed"
        ),
        "licence picked that lacks the purpose": await refuse(
            f"purpose:industrial licence:{lic['id']}", 403, "purpose-not-allowed"
        ),
        "another licensee's licence": await refuse(
            f"purpose:public-interest licence:{other_lic['id']}", 400, "bad-request"
        ),
        "expired licence": await refuse(
            f"purpose:public-interest licence:{old['id']}", 403, "licence-inactive"
        ),
        "not yet valid licence": await refuse(
            f"purpose:public-interest licence:{future['id']}", 403, "licence-inactive"
        ),
    }
    await world.admin_post(f"/licences/{lic2['id']}/suspend", expect=200)
    results["suspended licence"] = await refuse(
        f"purpose:industrial dataset:{ds2['id']}", 403, "licence-inactive"
    )
    await world.admin_post(f"/licences/{lic2['id']}/resume", expect=200)
    await grant(f"purpose:industrial dataset:{ds2['id']}")
    await world.admin_post(f"/licences/{lic2['id']}/revoke", expect=200)
    results["revoked licence"] = await refuse(
        f"purpose:industrial dataset:{ds2['id']}", 403, "licence-inactive"
    )
    check_all(results)

    # A licensee without any licence, and a disabled app.
    bare = await key_client(world, (await world.licensee())["id"])
    assert (
        problem(await post_token(world, bare.form("purpose:public-interest")), 403, "licence-inactive")
        is None
    )
    await world.admin_post(f"/apps/{client.client_id}/disable", expect=200)
    status, body, resp = await post_token(world, client.form(f"purpose:public-interest dataset:{ds1['id']}"))
    assert status == 401, body
    assert resp.content_type == PROBLEM
    assert (body["code"], body.get("error")) == ("invalid-client", "invalid_client"), body


# -- private_key_jwt --------------------------------------------------------------


async def test_private_key_jwt(world: World) -> None:
    ds = await world.dataset()
    licensee = await world.licensee()
    await world.licence(licensee["id"], [ds["id"]])
    client = await key_client(world, licensee["id"])
    assert client.app["auth_method"] == "private_key_jwt"
    assert client.app.get("client_secret") is None
    scope = f"purpose:public-interest dataset:{ds['id']}"
    await check_private_key_jwt(world, client, scope)
    await check_other_key_types(world, licensee["id"], scope)


async def check_private_key_jwt(world: World, client: KeyClient, scope: str) -> None:
    ds_id = scope.rsplit(":", 1)[1]

    assertion = client.assertion()
    body = await issued(world, client.form(scope, assertion))
    claims = claims_of(body)
    assert claims["client_id"] == claims["sub"] == client.client_id
    status, answer, _ = await world.call(f"/data/{ds_id}/x", body["access_token"])
    assert status == 200, answer
    # Accepted variants: aud = the issuer (RFC 7523 §3), client_id in the form,
    # an assertion without kid (the only key is used), a 290 s lifetime.
    now = int(time.time())
    await issued(world, client.form(scope, client.assertion(claims={"aud": world.settings.issuer})))
    await issued(world, client.form(scope, client_id=client.client_id))
    await issued(world, client.form(scope, client.assertion({"kid": DROP})))
    await issued(world, client.form(scope, client.assertion(claims={"exp": now + 290})))

    other_key = ec.generate_private_key(ec.SECP256R1())
    jwk_json = json.dumps(public_jwk(client.key, kid=client.kid, use="sig")).encode()
    refused = {
        "replayed assertion": client.form(scope, assertion),
        "wrong aud": client.form(
            scope, client.assertion(claims={"aud": "https://other.example/oauth/token"})
        ),
        "aud is the data audience": client.form(
            scope, client.assertion(claims={"aud": world.settings.audience})
        ),
        "aud missing": client.form(scope, client.assertion(claims={"aud": DROP})),
        "expired": client.form(scope, client.assertion(claims={"iat": now - 600, "exp": now - 120})),
        "too long-lived": client.form(scope, client.assertion(claims={"exp": now + 400})),
        "exp missing": client.form(scope, client.assertion(claims={"exp": DROP})),
        "exp as a string": client.form(scope, client.assertion(claims={"exp": str(now + 60)})),
        "iat in the future": client.form(scope, client.assertion(claims={"iat": now + 120})),
        "nbf in the future": client.form(scope, client.assertion(claims={"nbf": now + 120})),
        "jti missing": client.form(scope, client.assertion(claims={"jti": DROP})),
        "jti empty": client.form(scope, client.assertion(claims={"jti": ""})),
        "jti not a string": client.form(scope, client.assertion(claims={"jti": 12345})),
        "iss differs from sub": client.form(scope, client.assertion(claims={"sub": "app-other"})),
        "iss missing": client.form(scope, client.assertion(claims={"iss": DROP})),
        "unknown client": client.form(
            scope, client.assertion(claims={"iss": "app-nobody", "sub": "app-nobody"})
        ),
        "form client_id differs": client.form(scope, client_id="app-other"),
        "signed by another key": client.form(scope, client.assertion(sign=es(other_key))),
        "signed by another key without kid": client.form(
            scope, client.assertion({"kid": DROP}, sign=es(other_key))
        ),
        "alg ES384 with the P-256 key": client.form(
            scope, client.assertion({"alg": "ES384"}, sign=es(client.key, hashes.SHA384()))
        ),
        "alg RS256 label": client.form(scope, client.assertion({"alg": "RS256"})),
        "alg HS256 keyed with the public JWK": client.form(
            scope,
            client.assertion({"alg": "HS256"}, sign=lambda d: hmac.new(jwk_json, d, hashlib.sha256).digest()),
        ),
        "alg none": client.form(scope, client.assertion({"alg": "none"}, sign=lambda d: b"")),
        "unknown kid": client.form(scope, client.assertion({"kid": "k-unknown"})),
        "jwk header": client.form(
            scope, client.assertion({"jwk": public_jwk(other_key)}, sign=es(other_key))
        ),
        "jku header": client.form(scope, client.assertion({"jku": "https://attacker.example/jwks"})),
        "crit header": client.form(scope, client.assertion({"crit": ["exp"]})),
        "payload tampered": client.form(scope, _tampered(client.assertion(), {"sub": "x", "iss": "x"})),
        "garbage assertion": client.form(scope, "not-a-jwt"),
        "an access token as assertion": client.form(scope, body["access_token"]),
    }
    check_all(
        {
            name: problem(await post_token(world, form), 401, "invalid-client", "invalid_client")
            for name, form in refused.items()
        }
    )
    check_all(
        {
            "wrong assertion type": problem(
                await post_token(world, client.form(scope, client_assertion_type="urn:example:saml")),
                400,
                "bad-request",
                "invalid_request",
            ),
            "assertion and a client secret": problem(
                await post_token(world, client.form(scope, client_id=client.client_id, client_secret="x")),
                400,
                "bad-request",
                "invalid_request",
            ),
            "a key app trying a secret": problem(
                await post_token(
                    world,
                    {
                        "grant_type": "client_credentials",
                        "scope": scope,
                        "client_id": client.client_id,
                        "client_secret": "guess",
                    },
                ),
                401,
                "invalid-client",
                "invalid_client",
            ),
        }
    )


async def check_other_key_types(world: World, licensee_id: str, scope: str) -> None:
    """EdDSA and RSA (PS256) keys work; short RSA keys and unusable keys are refused."""
    ed = await key_client(world, licensee_id, ed25519.Ed25519PrivateKey.generate(), "EdDSA")
    await issued(world, ed.form(scope))
    assert (
        problem(
            await post_token(world, ed.form(scope, ed.assertion({"alg": "ES256"}))), 401, "invalid-client"
        )
        is None
    )
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    strong = await key_client(world, licensee_id, rsa_key, "PS256")
    await issued(world, strong.form(scope))
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    weak = await key_client(world, licensee_id, weak_key, "RS256")
    refused = await post_token(world, weak.form(scope))
    assert problem(refused, 401, "invalid-client") is None
    assert "2048" in refused[1]["detail"]
    # A key that cannot be used (its point is not on its curve) is refused
    # when it is registered, naming the field.
    broken_jwk = {"kty": "EC", "crv": "P-256", "x": b64u(b"\x01" * 32), "y": b64u(b"\x02" * 32), "kid": "bad"}
    async with world.client.post(
        "/admin/v1/apps",
        json={"licensee_id": licensee_id, "name": "broken", "jwks": {"keys": [broken_jwk]}},
        headers=world.admin,
    ) as resp:
        body = await resp.json()
        assert (resp.status, body["code"], body["field"]) == (400, "bad-request", "jwks"), body


def _tampered(token: str, changes: dict[str, Any]) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{head}.{b64u(json.dumps(claims).encode())}.{signature}"


# -- parse_scope ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "purpose", "datasets", "licence"),
    [
        ("purpose:public-interest", "public-interest", (), None),
        ("purpose:industrial dataset:a dataset:b", "industrial", ("a", "b"), None),
        ("  dataset:b   purpose:industrial  dataset:a ", "industrial", ("b", "a"), None),
        ("purpose:industrial dataset:a dataset:a", "industrial", ("a",), None),
        ("purpose:industrial purpose:industrial", "industrial", (), None),
        ("purpose:industrial dataset:prov-x/*", "industrial", ("prov-x/*",), None),
        ("purpose:industrial dataset:a.b_c-1 licence:lic-1", "industrial", ("a.b_c-1",), "lic-1"),
        ("licence:lic-1 licence:lic-1 purpose:public-interest", "public-interest", (), "lic-1"),
        ("purpose:industrial dataset:" + "a" * 64, "industrial", ("a" * 64,), None),
    ],
)
def test_parse_scope_accepts(
    scope: str, purpose: str, datasets: tuple[str, ...], licence: str | None
) -> None:
    parsed = oauth.parse_scope(scope)
    assert (parsed.purpose, parsed.datasets, parsed.licence_id) == (purpose, datasets, licence)


@pytest.mark.parametrize(
    "scope",
    [
        "",
        "   ",
        "dataset:a",
        "purpose:public-interest purpose:industrial",
        "purpose:other",
        "purpose:",
        "purpose",
        ":public-interest",
        "Purpose:industrial",
        "purpose:industrial dataset:",
        "purpose:industrial dataset:A",
        "purpose:industrial dataset:-a",
        "purpose:industrial dataset:a/b",
        "purpose:industrial dataset:a/*/*",
        "purpose:industrial dataset:*",
        "purpose:industrial dataset:../a",
        "purpose:industrial dataset:" + "a" * 65,
        "purpose:industrial scope:all",
        "purpose:industrial licence:a licence:b",
        "purpose:industrial\tdataset:a",
        "purpose:industrial\ndataset:a",
        'purpose:industrial dataset:"a"',
        "purpose:industrial dataset:a\\b",
        "purpose:industrial dataset:数据",
        "purpose:industrial\x00",
    ],
)
def test_parse_scope_refuses(scope: str) -> None:
    with pytest.raises(BadRequestError) as refused:
        oauth.parse_scope(scope)
    assert refused.value.extra.get("error") == "invalid_scope"
    assert refused.value.status == 400
