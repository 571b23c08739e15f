"""Trusted external issuers: an identity platform outside the gateway (here a
real HTTP server on loopback that publishes its keys and signs tokens, the
way Keycloak or a city's unified identity platform does) mints access
tokens that the data plane accepts through the issuer's JWKS. Its keys
rotate; its JWKS server goes down; made-up kids try to flood it; forged
tokens try every door. The licence rules apply as to the gateway's own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import select

from config.settings import ConfigurationError, load_settings
from gateway.state import ENGINE
from ledger.models import CallRow
from licensing.issuers import metadata_url
from tests.conftest import World, free_port
from tests.test_data_plane import check_problem, eventually, refused
from tests.test_tokens import compact, hs

WorldFactory = Callable[..., Awaitable[World]]


class IdentityPlatform:
    """An external authorisation server: RFC 8414 metadata, a JWKS, and
    tokens signed with its current key."""

    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}/realms/city"
        self.keys: dict[str, Any] = {}
        self.published: list[str] = []
        self.current = ""
        self.fetches = 0
        self.metadata_issuer: str | None = None
        self._runner: web.AppRunner | None = None
        self.rotate()

    def rotate(self, *, keep_old: bool = True) -> str:
        kid = f"idp-{uuid.uuid4().hex[:8]}"
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        self.published = [*(self.published if keep_old else []), kid]
        self.current = kid
        return kid

    def jwk(self, kid: str) -> dict[str, Any]:
        jwk = ECAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
        return {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}

    def token(
        self,
        audience: str,
        *,
        kid: str | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        key: Any = None,
        alg: str = "ES256",
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "sub": "service-account",
            **(claims or {}),
        }
        for name in drop:
            payload.pop(name, None)
        kid = kid or self.current
        headers = {"typ": "at+jwt", "kid": kid, **(header or {})}
        return jwt.encode(payload, key if key is not None else self.keys[kid], algorithm=alg, headers=headers)

    async def _metadata(self, request: web.Request) -> web.Response:
        base = f"http://127.0.0.1:{self.port}"
        return web.json_response(
            {"issuer": self.metadata_issuer or self.issuer, "jwks_uri": f"{base}/realms/city/certs"}
        )

    async def _certs(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": [self.jwk(kid) for kid in self.published]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server/realms/city", self._metadata)
        app.router.add_get("/realms/city/certs", self._certs)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def idp() -> AsyncIterator[IdentityPlatform]:
    platform = IdentityPlatform()
    await platform.start()
    yield platform
    await platform.stop()


def hs256_of(token: str, secret: bytes) -> str:
    """The same header and claims, "signed" HS256 with ``secret``."""
    header = {**jwt.get_unverified_header(token), "alg": "HS256"}
    return compact(header, jwt.decode(token, options={"verify_signature": False}), hs(secret))


def issuer_config(idp: IdentityPlatform, **fields: Any) -> dict[str, Any]:
    return {"issuer": idp.issuer, "cache_seconds": 60, "refetch_min_seconds": 1, **fields}


async def licensed_app(
    world: World, **licence_fields: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    ds = await world.dataset()
    licensee = await world.licensee()
    licence = await world.licence(licensee["id"], [ds["id"]], **licence_fields)
    app = await world.app_client(licensee["id"])
    return ds, licence, app


async def test_an_external_token_is_served_under_the_licence_rules(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    world = await world_factory(tokens__issuers=[issuer_config(idp)])
    ds, licence, app = await licensed_app(world, purposes=["public-interest"])
    aud = world.settings.audience
    good = idp.token(aud, claims={"client_id": app["client_id"], "purpose": "public-interest"})
    status, body, resp = await world.call(f"/data/{ds['id']}/items", good)
    assert status == 200, body
    call_id = resp.headers["X-Call-Id"]

    async def recorded() -> bool:
        async with world.app[ENGINE].connect() as conn:
            row = (await conn.execute(select(CallRow).where(CallRow.call_id == call_id))).first()
        return row is not None and row.licence_id == licence["id"] and row.app_id == app["client_id"]

    await eventually(recorded, within=15)

    # The licence rules still decide: a purpose it does not grant, an app
    # that is not registered, a licence suspended after the token was seen.
    industrial = idp.token(aud, claims={"client_id": app["client_id"], "purpose": "industrial"})
    await refused(world, f"/data/{ds['id']}/items", industrial, 403, "purpose-not-allowed")
    stranger = idp.token(aud, claims={"client_id": "app-nobody", "purpose": "public-interest"})
    await refused(world, f"/data/{ds['id']}/items", stranger, 401, "invalid-token")
    no_app = idp.token(aud, claims={"purpose": "public-interest"})
    await refused(world, f"/data/{ds['id']}/items", no_app, 401, "invalid-token")
    await world.admin_post(f"/licences/{licence['id']}/suspend", expect=200)

    async def suspended() -> bool:
        status, _body, _resp = await world.call(f"/data/{ds['id']}/items", good)
        return status == 403

    await eventually(suspended, within=5)
    await refused(world, f"/data/{ds['id']}/items", good, 403, "licence-inactive")


async def test_claims_map_by_configuration_scope_licensee_and_datasets(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    config = issuer_config(
        idp, app_claim="azp", purpose_claim="scope", datasets_claim="scope", licensee_claim="org"
    )
    world = await world_factory(tokens__issuers=[config])
    ds, _licence, app = await licensed_app(world)
    other = await world.dataset()
    aud = world.settings.audience
    claims = {
        "azp": app["client_id"],
        "org": app["licensee_id"],
        "scope": f"purpose:industrial dataset:{ds['id']}",
    }
    status, body, _ = await world.call(f"/data/{ds['id']}/x", idp.token(aud, claims=claims))
    assert status == 200, body
    # A dataset the token does not name, though registered.
    await refused(world, f"/data/{other['id']}/x", idp.token(aud, claims=claims), 403, "dataset-not-licensed")
    # The licensee claim must be the app's own.
    wrong_org = {**claims, "org": "lic-someone-else"}
    await refused(world, f"/data/{ds['id']}/x", idp.token(aud, claims=wrong_org), 401, "invalid-token")
    # Two purposes in the scope are refused.
    two = {**claims, "scope": f"purpose:industrial purpose:public-interest dataset:{ds['id']}"}
    await refused(world, f"/data/{ds['id']}/x", idp.token(aud, claims=two), 401, "invalid-token")


async def test_discovery_and_rotation_refetch_an_unknown_kid_at_most_once_per_interval(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    # No jwks_url: the keys are found through RFC 8414 metadata.
    world = await world_factory(tokens__issuers=[issuer_config(idp, refetch_min_seconds=2)])
    ds, _licence, app = await licensed_app(world)
    aud = world.settings.audience
    claims = {"client_id": app["client_id"], "purpose": "public-interest"}
    first = idp.token(aud, claims=claims)
    status, body, _ = await world.call(f"/data/{ds['id']}/a", first)
    assert status == 200, body

    # Made-up kids: one refetch at most per interval, however many calls.
    await asyncio.sleep(2.1)
    before = idp.fetches
    forged_kids = [
        idp.token(aud, claims=claims, header={"kid": f"made-up-{n}"}, kid=idp.current) for n in range(25)
    ]
    started = time.monotonic()
    for forged in forged_kids:
        await refused(world, f"/data/{ds['id']}/a", forged, 401, "invalid-token")
    # One fetch per 2-second interval the 25 calls spanned, however many kids.
    allowed = 1 + int((time.monotonic() - started) // 2)
    assert idp.fetches - before <= allowed < 25, (idp.fetches - before, allowed)

    # The issuer rotates: a token of the new key is taken at once (its kid
    # refetches), and a token of the old key still verifies while published.
    await asyncio.sleep(2.1)
    old_kid = idp.current
    new_kid = idp.rotate()
    rotated = idp.token(aud, claims=claims)
    assert jwt.get_unverified_header(rotated)["kid"] == new_kid
    status, body, _ = await world.call(f"/data/{ds['id']}/b", rotated)
    assert status == 200, body
    status, body, _ = await world.call(f"/data/{ds['id']}/c", idp.token(aud, claims=claims, kid=old_kid))
    assert status == 200, body


async def test_with_the_issuer_down_known_keys_serve_until_their_cache_time_then_fail_closed(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    world = await world_factory(tokens__issuers=[issuer_config(idp, cache_seconds=3, refetch_min_seconds=1)])
    ds, _licence, app = await licensed_app(world)
    aud = world.settings.audience
    claims = {"client_id": app["client_id"], "purpose": "public-interest"}
    status, body, _ = await world.call(f"/data/{ds['id']}/a", idp.token(aud, claims=claims))
    assert status == 200, body
    await idp.stop()
    # Fresh tokens of a known key: served while the cache is in time.
    status, body, _ = await world.call(f"/data/{ds['id']}/b", idp.token(aud, claims=claims))
    assert status == 200, body

    async def closed() -> bool:
        status, _body, _resp = await world.call(f"/data/{ds['id']}/c", idp.token(aud, claims=claims))
        return status == 401

    await eventually(closed, within=10)
    body = await refused(world, f"/data/{ds['id']}/d", idp.token(aud, claims=claims), 401, "invalid-token")
    assert "cannot be fetched" in body["detail"], body
    # Back up: its tokens are accepted again.
    await idp.start()

    async def reopened() -> bool:
        status, _body, _resp = await world.call(f"/data/{ds['id']}/e", idp.token(aud, claims=claims))
        return status == 200

    await eventually(reopened, within=10)


async def test_forged_external_tokens_are_refused(world_factory: WorldFactory, idp: IdentityPlatform) -> None:
    world = await world_factory(
        tokens__issuers=[issuer_config(idp, jwks_url=f"http://127.0.0.1:{idp.port}/realms/city/certs")]
    )
    ds, _licence, app = await licensed_app(world)
    aud = world.settings.audience
    claims = {"client_id": app["client_id"], "purpose": "public-interest"}
    path = f"/data/{ds['id']}/x"
    status, body, _ = await world.call(path, idp.token(aud, claims=claims))
    assert status == 200, body
    public_pem = (
        idp.keys[idp.current]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = {
        "HS256 with the issuer's public key": hs256_of(idp.token(aud, claims=claims), public_pem),
        "another key under the issuer's kid": idp.token(aud, claims=claims, key=attacker),
        "another audience": idp.token("https://elsewhere.example/data", claims=claims),
        "expired": idp.token(aud, claims={**claims, "iat": 1_600_000_000, "exp": 1_600_000_300}),
        "no exp": idp.token(aud, claims=claims, drop=("exp",)),
        "a jku header": idp.token(aud, claims=claims, header={"jku": "http://127.0.0.1:1/keys"}),
        "a crit header": idp.token(aud, claims=claims, header={"crit": ["exp"]}),
        "typ JWT": idp.token(aud, claims=claims, header={"typ": "JWT"}),
        "an issuer not trusted": idp.token(aud, claims={**claims, "iss": "http://127.0.0.1:1/other"}),
        # The issuer's key cannot sign the gateway's own tokens.
        "the gateway's own issuer": idp.token(aud, claims={**claims, "iss": world.settings.issuer}),
        "a string exp": idp.token(aud, claims={**claims, "exp": str(int(time.time()) + 300)}),
        "an unknown purpose": idp.token(aud, claims={**claims, "purpose": "anything"}),
    }
    for why, token in forged.items():
        before = len(world.upstream.arrived)
        status, body, resp = await world.call(path, token)
        check_problem(status, body, resp, 401, "invalid-token")
        assert "WWW-Authenticate" in resp.headers, why
        assert len(world.upstream.arrived) == before, why


async def test_a_bound_external_token_and_level_three_data(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    world = await world_factory(tokens__issuers=[issuer_config(idp)])
    ds = await world.dataset(classification=3)
    licensee = await world.licensee()
    await world.licence(licensee["id"], [ds["id"]], max_classification=3)
    app = await world.app_client(licensee["id"])
    aud = world.settings.audience
    bearer = idp.token(aud, claims={"client_id": app["client_id"], "purpose": "public-interest"})
    await refused(world, f"/data/{ds['id']}/x", bearer, 401, "sender-constraint-failed")
    bound = idp.token(
        aud, claims={"client_id": app["client_id"], "purpose": "public-interest", "cnf": {"jkt": "x" * 43}}
    )
    # A DPoP-bound token under the Bearer scheme is refused.
    await refused(world, f"/data/{ds['id']}/x", bound, 401, "sender-constraint-failed")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_keys_the_issuer_must_not_publish_are_skipped(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    """A JWKS entry with private members, a symmetric key or a short RSA key
    is never used, even under a kid a token names."""
    world = await world_factory(tokens__issuers=[issuer_config(idp)])
    ds, _licence, app = await licensed_app(world)
    aud = world.settings.audience
    claims = {"client_id": app["client_id"], "purpose": "public-interest"}
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (to be refused)
    private_ec = ec.generate_private_key(ec.SECP256R1())
    served = idp.jwk

    def jwk(kid: str) -> dict[str, Any]:
        if kid == "short-rsa":
            return {**RSAAlgorithm.to_jwk(short.public_key(), as_dict=True), "kid": kid}
        if kid == "with-private":
            return {**ECAlgorithm.to_jwk(private_ec, as_dict=True), "kid": kid}
        if kid == "symmetric":
            return {"kty": "oct", "k": "c2VjcmV0", "kid": kid, "alg": "HS256"}
        return served(kid)

    idp.jwk = jwk  # type: ignore[method-assign]
    idp.published += ["short-rsa", "with-private", "symmetric"]
    for kid, key, alg in (
        ("short-rsa", short, "RS256"),
        ("with-private", private_ec, "ES256"),
        ("symmetric", b"secret", "HS256"),
    ):
        token = idp.token(aud, claims=claims, header={"kid": kid}, key=key, alg=alg)
        await refused(world, f"/data/{ds['id']}/x", token, 401, "invalid-token")
    status, body, _ = await world.call(f"/data/{ds['id']}/x", idp.token(aud, claims=claims))
    assert status == 200, body


async def test_metadata_naming_another_issuer_is_not_followed(
    world_factory: WorldFactory, idp: IdentityPlatform
) -> None:
    """RFC 8414 §3.3: metadata must name the issuer it was fetched for, or an
    attacker who controls one document could vouch for keys of another."""
    idp.metadata_issuer = "http://127.0.0.1:1/realms/impostor"
    world = await world_factory(tokens__issuers=[issuer_config(idp)])
    ds, _licence, app = await licensed_app(world)
    token = idp.token(
        world.settings.audience, claims={"client_id": app["client_id"], "purpose": "public-interest"}
    )
    await refused(world, f"/data/{ds['id']}/x", token, 401, "invalid-token")
    assert idp.fetches == 0


def test_issuer_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="own issuer"):
        load_settings(
            env={},
            overrides={
                "server.public_url": "https://gw.example",
                "tokens.issuers": [{"issuer": "https://gw.example"}],
            },
        )
    with pytest.raises(ConfigurationError, match="https"):
        load_settings(env={}, overrides={"tokens.issuers": [{"issuer": "http://id.example"}]})
    with pytest.raises(ConfigurationError, match="once"):
        load_settings(
            env={},
            overrides={
                "tokens.issuers": [{"issuer": "https://id.example"}, {"issuer": "https://id.example"}]
            },
        )
    with pytest.raises(ConfigurationError):
        load_settings(
            env={}, overrides={"tokens.issuers": [{"issuer": "https://id.example", "algorithms": ["HS256"]}]}
        )


def test_metadata_url_inserts_the_well_known_suffix_before_the_path() -> None:
    """RFC 8414 §3.1's example."""
    assert metadata_url("https://example.com/issuer1") == (
        "https://example.com/.well-known/oauth-authorization-server/issuer1"
    )
    assert metadata_url("https://example.com") == "https://example.com/.well-known/oauth-authorization-server"
