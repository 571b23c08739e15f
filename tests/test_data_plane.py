"""The data plane, end to end: the real gateway in front of a real upstream.

Part 1 drives every licence rule of DESIGN §3 through the admin API and the
token endpoint, the way an operator and an app developer would, and checks
that a change takes effect on the very next call (and on another gateway
sharing the database within two seconds, DESIGN §7). Part 2 checks what
crosses the gateway towards the upstream and back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.state import CATALOGUE, REDIS, TOKENS
from tests.conftest import PG_URL, Backend, World, free_port
from tests.test_path_escape import raw_request

WorldFactory = Callable[..., Awaitable[World]]
#: A dataset that serves every method a dataset may declare (the default is GET, HEAD).
EVERY_METHOD = {"methods": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]}


def check_problem(status: int, body: Any, resp: aiohttp.ClientResponse, expected: int, code: str) -> None:
    """An RFC 9457 problem of the gateway, with the stable code of DESIGN §3."""
    assert status == expected, (status, body)
    assert resp.headers["Content-Type"].startswith("application/problem+json"), resp.headers
    assert isinstance(body, dict), body
    assert body["code"] == code, body
    assert body["status"] == expected, body
    assert body["type"].endswith("/" + code), body
    assert body["title"], body
    assert body["detail"], body
    assert body["instance"] == resp.headers["X-Call-Id"], (body, resp.headers)


async def ok(world: World, path: str, token: str, **kw: Any) -> Any:
    status, body, resp = await world.call(path, token, **kw)
    assert status == 200, body
    assert resp.headers["X-Call-Id"]
    return body


async def refused(world: World, path: str, token: str | None, expected: int, code: str) -> dict[str, Any]:
    """The call is refused with ``code`` and the upstream hears nothing of it."""
    before = len(world.upstream.arrived)
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, expected, code)
    assert len(world.upstream.arrived) == before, world.upstream.arrived[before:]
    return dict(body)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 2.0) -> float:
    """Seconds until ``check()`` holds; fails if it does not within ``within``."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.05)


def mint(
    world: World, app: dict[str, Any], licence: dict[str, Any], purpose: str, datasets: list[str]
) -> str:
    """A token signed by the gateway's own key for a grant the token endpoint
    would refuse today (the state a licence can reach after issuing)."""
    token, _ttl = world.app[TOKENS].issue(
        app_id=app["client_id"],
        licensee_id=licence["licensee_id"],
        licence_id=licence["id"],
        purpose=purpose,
        datasets=datasets,
    )
    return token


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def patch_dataset(world: World, dataset_id: str, **fields: Any) -> None:
    headers = world.admin
    async with world.client.patch(f"/admin/v1/datasets/{dataset_id}", json=fields, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


# == part 1: the licence rules ==================================================


async def test_suspend_resume_and_revoke_act_on_the_next_call(world: World) -> None:
    ds, lic, _app, token = await world.licensed()
    path = f"/data/{ds['id']}/rows"
    await ok(world, path, token)

    suspended = await world.admin_post(f"/licences/{lic['id']}/suspend", expect=200)
    assert suspended["status"] == "suspended"
    body = await refused(world, path, token, 403, "licence-inactive")
    assert "suspended" in body["detail"]

    resumed = await world.admin_post(f"/licences/{lic['id']}/resume", expect=200)
    assert resumed["status"] == "active"
    await ok(world, path, token)

    await world.admin_post(f"/licences/{lic['id']}/revoke", expect=200)
    body = await refused(world, path, token, 403, "licence-inactive")
    assert "revoked" in body["detail"]
    # Revocation is final: resuming is refused and calls stay refused.
    await world.admin_post(f"/licences/{lic['id']}/resume", expect=409)
    await refused(world, path, token, 403, "licence-inactive")


async def test_validity_window_expired_and_not_yet_valid(world: World) -> None:
    ds = await world.dataset()
    licensee = await world.licensee()
    app = await world.app_client(licensee["id"])
    path = f"/data/{ds['id']}/rows"

    # Expired: a licence valid now, a token issued now, then the window ends.
    now = datetime.now(UTC)
    ends = now + timedelta(seconds=1.2)
    lic = await world.licence(
        licensee["id"], [ds["id"]], valid_from=iso(now - timedelta(days=1)), valid_until=iso(ends)
    )
    token = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
    await ok(world, path, token)
    await asyncio.sleep(max(0.0, (ends - datetime.now(UTC)).total_seconds()) + 0.1)
    body = await refused(world, path, token, 403, "licence-inactive")
    assert "expired" in body["detail"]
    async with world.client.get(f"/admin/v1/licences/{lic['id']}", headers=world.admin) as resp:
        assert (await resp.json())["status"] == "expired"
    status, body = await world.token_response(app, f"purpose:public-interest dataset:{ds['id']}")
    assert status == 403, body
    assert body["code"] == "licence-inactive", body

    # Not yet valid: the token endpoint refuses; a token signed for it anyway
    # (as one issued before valid_from moved) is refused on the data plane.
    later = await world.licence(
        licensee["id"],
        [ds["id"]],
        valid_from=iso(now + timedelta(days=1)),
        valid_until=iso(now + timedelta(days=30)),
    )
    status, body = await world.token_response(
        app, f"purpose:public-interest dataset:{ds['id']} licence:{later['id']}"
    )
    assert status == 403, body
    assert body["code"] == "licence-inactive", body
    early = mint(world, app, later, "public-interest", [ds["id"]])
    body = await refused(world, path, early, 403, "licence-inactive")
    assert "not-yet-valid" in body["detail"]


async def test_dataset_outside_the_token_or_the_licence(world: World) -> None:
    a = await world.dataset(provider="city-a")
    b = await world.dataset(provider="city-a")
    licensee = await world.licensee()
    await world.licence(licensee["id"], [a["id"], b["id"]])
    app = await world.app_client(licensee["id"])
    only_a = await world.token(app, f"purpose:public-interest dataset:{a['id']}")

    await ok(world, f"/data/{a['id']}/x", only_a)
    # Licensed, but the token was not issued for it.
    body = await refused(world, f"/data/{b['id']}/x", only_a, 403, "dataset-not-licensed")
    assert "token" in body["detail"]
    # Another licensee's dataset: neither token nor licence covers it.
    other = await world.dataset(provider="city-b")
    await refused(world, f"/data/{other['id']}/x", only_a, 403, "dataset-not-licensed")

    # In the token, but no longer in the licence: a licence of "city-x/*" and a
    # token naming the dataset; the dataset moves to another provider.
    c = await world.dataset(provider="city-x")
    lic_x = await world.licence(licensee["id"], ["city-x/*"])
    token_c = await world.token(app, f"purpose:public-interest dataset:{c['id']} licence:{lic_x['id']}")
    await ok(world, f"/data/{c['id']}/x", token_c)
    await patch_dataset(world, c["id"], provider="city-y")
    body = await refused(world, f"/data/{c['id']}/x", token_c, 403, "dataset-not-licensed")
    assert f"licence {lic_x['id']}" in body["detail"]


async def test_classification_and_purpose_limits(world: World) -> None:
    ds, lic, app, token = await world.licensed(
        dataset_fields={"classification": 2},
        licence_fields={"max_classification": 2, "purposes": ["public-interest"]},
    )
    path = f"/data/{ds['id']}/x"
    await ok(world, path, token)

    # Classification above the licence maximum.
    await patch_dataset(world, ds["id"], classification=3)
    body = await refused(world, path, token, 403, "dataset-not-licensed")
    assert "classification 3" in body["detail"]
    await patch_dataset(world, ds["id"], classification=1)
    await ok(world, path, token)

    # Purpose not granted: refused at the token endpoint, and on the data plane
    # for a token signed for it anyway.
    status, body = await world.token_response(app, f"purpose:industrial dataset:{ds['id']}")
    assert status == 403, body
    assert body["code"] == "purpose-not-allowed", body
    industrial = mint(world, app, lic, "industrial", [ds["id"]])
    body = await refused(world, path, industrial, 403, "purpose-not-allowed")
    assert "industrial" in body["detail"]

    # DESIGN §3: classification 3+ needs a sender-constrained (DPoP) token; a
    # bearer token is refused even when the licence reaches that level.
    level3 = await world.dataset(classification=3)
    high = await world.licence(lic["licensee_id"], [level3["id"]], max_classification=4)
    bearer = await world.token(app, f"purpose:public-interest dataset:{level3['id']} licence:{high['id']}")
    status, body, resp = await world.call(f"/data/{level3['id']}/x", bearer)
    check_problem(status, body, resp, 401, "sender-constraint-failed")
    assert "DPoP" in resp.headers["WWW-Authenticate"]
    assert len(world.upstream.seen) == 2


async def test_provider_grants_cover_the_provider_and_no_other(world: World) -> None:
    a1 = await world.dataset(provider="prov-a")
    a2 = await world.dataset(provider="prov-a")
    b1 = await world.dataset(provider="prov-b")
    licensee = await world.licensee()
    lic = await world.licence(licensee["id"], ["prov-a/*"])
    app = await world.app_client(licensee["id"])
    # A licence of another licensee grants prov-b: it must not leak across.
    neighbour = await world.licensee()
    await world.licence(neighbour["id"], ["prov-b/*"])

    by_provider = await world.token(app, "purpose:industrial dataset:prov-a/*")
    by_default = await world.token(app, "purpose:public-interest")  # all the licence grants
    for token in (by_provider, by_default):
        await ok(world, f"/data/{a1['id']}/x", token)
        await ok(world, f"/data/{a2['id']}/x", token)
        await refused(world, f"/data/{b1['id']}/x", token, 403, "dataset-not-licensed")
    status, body = await world.token_response(app, "purpose:public-interest dataset:prov-b/*")
    assert status == 403, body
    assert body["code"] == "dataset-not-licensed", body
    status, body = await world.token_response(app, f"purpose:public-interest dataset:{b1['id']}")
    assert status == 403, body
    assert body["code"] == "dataset-not-licensed", body

    # A dataset the provider adds later is covered by the same token ...
    a3 = await world.dataset(provider="prov-a")
    await ok(world, f"/data/{a3['id']}/x", by_provider)
    # ... and one that leaves the provider is not.
    await patch_dataset(world, a2["id"], provider="prov-b")
    await refused(world, f"/data/{a2['id']}/x", by_provider, 403, "dataset-not-licensed")
    # A token for a provider the licence does not grant gets nothing.
    foreign = mint(world, app, lic, "public-interest", ["prov-b/*"])
    await refused(world, f"/data/{b1['id']}/x", foreign, 403, "dataset-not-licensed")
    # A licence of both providers, a token of one: the token's scope holds.
    both = await world.licence(licensee["id"], ["prov-a/*", "prov-b/*"])
    one = await world.token(app, f"purpose:public-interest dataset:prov-a/* licence:{both['id']}")
    await ok(world, f"/data/{a1['id']}/x", one)
    body = await refused(world, f"/data/{b1['id']}/x", one, 403, "dataset-not-licensed")
    assert "token" in body["detail"]


async def test_closed_dataset_is_never_served(world: World) -> None:
    ds, lic, app, token = await world.licensed()
    path = f"/data/{ds['id']}/x"
    await ok(world, path, token)
    await patch_dataset(world, ds["id"], open_class="closed")
    await refused(world, path, token, 403, "dataset-closed")
    status, body = await world.token_response(app, f"purpose:public-interest dataset:{ds['id']}")
    assert status == 403, body
    assert body["code"] == "dataset-closed", body
    await patch_dataset(world, ds["id"], open_class="conditional")
    await ok(world, path, token)

    # Closed from the start, though the licence lists it by id and by provider.
    closed = await world.dataset(provider="neg", open_class="closed")
    lic2 = await world.licence(lic["licensee_id"], [closed["id"], "neg/*"])
    status, body = await world.token_response(app, f"purpose:public-interest dataset:{closed['id']}")
    assert status == 403, body
    assert body["code"] == "dataset-closed", body
    for datasets in ([closed["id"]], ["neg/*"]):
        await refused(
            world,
            f"/data/{closed['id']}/x",
            mint(world, app, lic2, "public-interest", datasets),
            403,
            "dataset-closed",
        )


async def test_disabled_app_token_defects_and_unknown_dataset(world: World) -> None:
    ds, _lic, app, token = await world.licensed()
    path = f"/data/{ds['id']}/x"
    await ok(world, path, token)
    await world.admin_post(f"/apps/{app['client_id']}/disable", expect=200)
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, 401, "invalid-token")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    await world.admin_post(f"/apps/{app['client_id']}/enable", expect=200)
    await ok(world, path, token)

    status, body, resp = await world.call(path, None)
    check_problem(status, body, resp, 401, "token-required")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer", "Bearer a b", "Basic dXNlcjpwYXNz", f"Bearer {token}x", "Bearer e30.e30.e30"):
        status, body, resp = await world.call(path, headers={"Authorization": header})
        check_problem(status, body, resp, 401, "invalid-token")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer"), header
    assert len(world.upstream.seen) == 2

    body = await refused(world, "/data/no-such-dataset/x", token, 404, "unknown-dataset")
    assert "no-such-dataset" in body["detail"]
    await refused(world, "/data/no-such-dataset", token, 404, "unknown-dataset")
    # Authentication comes first: without a token, the catalogue is not revealed.
    await refused(world, "/data/no-such-dataset/x", None, 401, "token-required")


async def test_changes_on_another_gateway_apply_within_two_seconds(world_factory: WorldFactory) -> None:
    first = await world_factory()
    second = await world_factory()  # same database, same keys: another replica
    ds, lic, app, token = await first.licensed()
    path = f"/data/{ds['id']}/x"

    def answer_is(status: int, code: str | None = None, on: World = first) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            got, body, _resp = await on.call(path, token)
            return got == status and (code is None or body.get("code") == code)

        return check

    await ok(first, path, token)
    # What was made on the first replica is served by the second ...
    await eventually(answer_is(200, on=second))
    # ... and every change made on the second reaches the first.
    await second.admin_post(f"/licences/{lic['id']}/suspend", expect=200)
    await eventually(answer_is(403, "licence-inactive"))
    await second.admin_post(f"/licences/{lic['id']}/resume", expect=200)
    await eventually(answer_is(200))
    await second.admin_post(f"/apps/{app['client_id']}/disable", expect=200)
    await eventually(answer_is(401, "invalid-token"))
    await second.admin_post(f"/apps/{app['client_id']}/enable", expect=200)
    await eventually(answer_is(200))
    await patch_dataset(second, ds["id"], open_class="closed")
    await eventually(answer_is(403, "dataset-closed"))


@pytest.mark.parametrize(
    "backend", ["servers"], indirect=True
)  # refuses connections to a PostgreSQL database
async def test_a_replica_that_cannot_confirm_its_view_fails_closed(
    backend: Backend, world_factory: WorldFactory
) -> None:
    """With the database out of reach a replica keeps serving on its view as
    long as the catalogue version the replicas share in Redis says it is
    current (no change can be committed meanwhile); once another replica
    publishes a newer version it can not load, it refuses data calls within
    the two seconds of DESIGN §7, until it can reload."""
    world = await world_factory()
    ds, _lic, _app, token = await world.licensed()
    path = f"/data/{ds['id']}/x"
    await ok(world, path, token)
    name = backend.database_url.rsplit("/", 1)[1]
    admin = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    redis = world.app[REDIS]
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
        await asyncio.sleep(3.0)
        await ok(world, path, token)  # past the 2 s: the shared version vouches for the view
        # Another replica, which still reaches the database, loads a change.
        version = int(await redis.get("pdg:catalogue:version"))
        await redis.set("pdg:catalogue:version", version + 1)
        cut = time.monotonic()

        async def refused_now() -> bool:
            status, body, resp = await world.call(path, token)
            if status == 200:
                return False
            check_problem(status, body, resp, 503, "service-unavailable")
            return True

        await eventually(refused_now, within=4.0)
        assert time.monotonic() - cut < 3.5
        # Until the view is confirmed again, nothing is forwarded.
        await refused(world, path, token, 503, "service-unavailable")
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        await admin.dispose()

    async def served_again() -> bool:
        status, _body, _resp = await world.call(path, token)
        return status == 200

    await eventually(served_again, within=6.0)


# == part 2: forwarding =========================================================


async def test_bodies_stream_both_ways_intact(world: World) -> None:
    ds, _lic, _app, token = await world.licensed(dataset_fields=EVERY_METHOD)
    auth = {"Authorization": f"Bearer {token}"}
    payload = os.urandom(5 * 1024 * 1024)

    async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    # Chunked (no Content-Length): read whole within the limit (so a body
    # over it never reaches the upstream), then relayed byte for byte, with
    # its length.
    async with world.client.post(f"/data/{ds['id']}/digest", data=chunks(payload), headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        got = await resp.json()
    assert got["length"] == len(payload)
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()
    assert got["headers"]["Content-Length"] == str(len(payload))

    # With Content-Length: relayed with it.
    async with world.client.put(f"/data/{ds['id']}/digest", data=payload[:1_000_000], headers=auth) as resp:
        got = await resp.json()
    assert got["length"] == 1_000_000
    assert got["sha256"] == hashlib.sha256(payload[:1_000_000]).hexdigest()
    assert got["headers"]["Content-Length"] == "1000000"

    # With Content-Length, streamed, not buffered: the rest of the body is
    # only sent once the upstream has received the first bytes (a buffering
    # gateway deadlocks).
    async def gated() -> AsyncIterator[bytes]:
        yield payload[:65536]
        await asyncio.wait_for(world.upstream.upload_started.wait(), 5)
        yield payload[65536:]

    announced = {**auth, "Content-Length": str(len(payload))}
    async with world.client.post(f"/data/{ds['id']}/upload-probe", data=gated(), headers=announced) as resp:
        assert resp.status == 200, await resp.text()
        got = await resp.json()
    assert got == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    # Downloads: a large body arrives whole ...
    size = 8 * 1024 * 1024 + 17
    async with world.client.get(f"/data/{ds['id']}/big?bytes={size}", headers=auth) as resp:
        assert resp.status == 200
        assert resp.headers["X-Call-Id"]
        assert resp.headers["Content-Type"] == "application/octet-stream"
        received = await resp.read()
    assert len(received) == size
    assert received == b"x" * size

    # ... and its first chunk reaches the caller while the upstream is still sending.
    async with world.client.get(f"/data/{ds['id']}/drip", headers=auth) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(6), 5)
        assert first == b"first;"
        world.upstream.drip_release.set()
        assert await resp.content.read() == b"last"


async def test_hop_by_hop_and_credentials_never_cross(world: World) -> None:
    ds, _lic, _app, token = await world.licensed()
    resp = await raw_request(
        world.client.server.port,
        f"/data/{ds['id']}/echo".encode(),
        connection="close, X-Hop-Req",
        headers=[
            ("Authorization", f"Bearer {token}"),
            ("X-Hop-Req", "must-not-pass"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Trailer", "X-Checksum"),
            ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Foo", "bar"),
            ("Cookie", "session=secret"),
            ("DPoP", "proof"),
            ("Forwarded", "for=203.0.113.1"),
            ("X-End-To-End", "passes"),
            ("Accept", "application/json"),
            ("User-Agent", "pdg-test/1"),
        ],
    )
    assert resp.status == 200, resp.body
    seen = world.upstream.last
    banned = {
        "x-hop-req",
        "keep-alive",
        "te",
        "upgrade",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "proxy-foo",
        "authorization",
        "cookie",
        "dpop",
        "forwarded",
    }
    assert not banned & set(seen["header_names"]), seen["header_names"]
    assert "close" not in seen["headers"].get("Connection", "").lower()
    assert token not in str(seen["headers"])
    assert seen["headers"]["X-End-To-End"] == "passes"
    assert seen["headers"]["Accept"] == "application/json"
    assert seen["headers"]["User-Agent"] == "pdg-test/1"
    # The echo's own "Connection: keep-alive, X-Secret-Hop" + X-Secret-Hop.
    assert "X-Secret-Hop" not in resp.headers
    assert "x-secret-hop" not in resp.headers.get("Connection", "").lower()
    assert resp.headers["X-Upstream"] == "yes"

    status, _body, hop = await world.call(f"/data/{ds['id']}/hop", token)
    assert status == 200
    for name in ("X-Secret-Hop", "X-Other-Hop", "Keep-Alive", "Proxy-Authenticate", "Upgrade", "Trailer"):
        assert name not in hop.headers, name
    assert hop.headers["X-End-To-End"] == "passes"

    # Nor may the upstream set cookies, name its server or forge the call id.
    status, _body, leaky = await world.call(f"/data/{ds['id']}/leaky", token)
    assert status == 200
    assert "Set-Cookie" not in leaky.headers
    assert leaky.headers.get("Server", "") != "internal/1.0"
    assert leaky.headers.getall("X-Call-Id") == [leaky.headers["X-Call-Id"]]
    assert leaky.headers["X-Call-Id"] != "spoofed"


async def test_forwarded_request_line_and_headers(world_factory: WorldFactory) -> None:
    world = await world_factory()
    ds, _lic, _app, token = await world.licensed(dataset_fields=EVERY_METHOD)
    path = f"/data/{ds['id']}/echo"
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}

    # Untrusted peer: its X-Forwarded-* are replaced, not extended.
    await ok(world, path, token, headers=spoof)
    assert world.upstream.last["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert world.upstream.last["headers"]["X-Forwarded-Proto"] == "http"
    # X-Forwarded-Host is the gateway's public host, whatever Host the caller sent.
    public_host = world.settings.public_url.split("://", 1)[1]
    raw = await raw_request(
        world.client.server.port,
        path.encode(),
        headers=[("Authorization", f"Bearer {token}"), ("X-Forwarded-Host", "evil.example")],
        host="evil.example",
    )
    assert raw.status == 200, raw.body
    assert world.upstream.last["headers"]["X-Forwarded-Host"] == public_host

    # X-Request-Id: passed on when sane, else the call id.
    _s, _b, resp = await world.call(path, token, headers={"X-Request-Id": "req-42:abc/def=="})
    assert world.upstream.last["headers"]["X-Request-ID"] == "req-42:abc/def=="
    assert resp.headers["X-Call-Id"] != "req-42:abc/def=="
    for insane in ("has spaces in it", "x" * 129, "<script>", "a\tb", ""):
        _s, _b, resp = await world.call(path, token, headers={"X-Request-Id": insane})
        assert world.upstream.last["headers"]["X-Request-ID"] == resp.headers["X-Call-Id"], insane
    _s, _b, resp = await world.call(path, token)
    assert world.upstream.last["headers"]["X-Request-ID"] == resp.headers["X-Call-Id"]

    # Trusted proxy: the chain is extended (every X-Forwarded-For line of it).
    trusting = await world_factory(server__trusted_proxies=["127.0.0.1/32"])
    await ok(trusting, path, token, headers=spoof)
    assert world.upstream.last["headers"]["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert world.upstream.last["headers"]["X-Forwarded-Proto"] == "https"
    raw = await raw_request(
        trusting.client.server.port,
        path.encode(),
        headers=[
            ("Authorization", f"Bearer {token}"),
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Forwarded-For", "203.0.113.9"),
        ],
    )
    assert raw.status == 200, raw.body
    assert world.upstream.last["headers"]["X-Forwarded-For"] == "198.51.100.1, 203.0.113.9, 127.0.0.1"
    await ok(trusting, path, token)
    assert world.upstream.last["headers"]["X-Forwarded-For"] == "127.0.0.1"

    # The request line: the query string as it came, and every method.
    # Raw, so the test client does not re-encode the query on the way in.
    query = "b=2&a=1&a=3&x=%2F&y=a+b&z=&flag&%E4%B8%AD=%E6%96%87&r=../../x&s=%3D%26%25"
    raw = await raw_request(
        world.client.server.port,
        f"/data/{ds['id']}/search?{query}".encode(),
        headers=[("Authorization", f"Bearer {token}")],
    )
    assert raw.status == 200, raw.body
    assert world.upstream.last["raw_path"] == f"/svc/search?{query}"

    call_ids = set()
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        payload = f"{method} body".encode()
        status, body, resp = await world.call(f"/data/{ds['id']}/m", token, method=method, data=payload)
        assert status == 200, body
        assert body["method"] == method, body
        assert body["body"] == f"{method} body", body
        call_ids.add(resp.headers["X-Call-Id"])
    status, body, resp = await world.call(f"/data/{ds['id']}/m", token, method="HEAD")
    assert status == 200
    assert body is None
    assert world.upstream.last["method"] == "HEAD"
    assert int(resp.headers["Content-Length"]) > 0
    call_ids.add(resp.headers["X-Call-Id"])
    assert len(call_ids) == 6


async def test_upstream_failures_are_problems(world: World) -> None:
    ds, lic, app, token = await world.licensed(dataset_fields={"timeout_seconds": 0.3})
    base = f"/data/{ds['id']}"

    started = time.monotonic()
    body = await refused_after_upstream(world, f"{base}/slow?seconds=1", token, 504)
    assert time.monotonic() - started < 0.9
    assert "timed out" in body["detail"]

    for code in (500, 503):
        body = await refused_after_upstream(world, f"{base}/status/{code}", token, 502)
        assert body["upstream_status"] == code
    # Client errors of the upstream are its answer, relayed as they are.
    status, body, resp = await world.call(f"{base}/status/404", token)
    assert status == 404
    assert body == {"status": 404}
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "Location" not in resp.headers

    # Nothing listens: 503, and the next call still works.
    dead = await world.dataset(upstream_url=f"http://127.0.0.1:{free_port()}/svc")
    new_lic = await world.licence(lic["licensee_id"], [dead["id"]])
    dead_token = await world.token(
        app, f"purpose:public-interest dataset:{dead['id']} licence:{new_lic['id']}"
    )
    status, body, resp = await world.call(f"/data/{dead['id']}/x", dead_token)
    check_problem(status, body, resp, 503, "upstream-unavailable")


async def refused_after_upstream(world: World, path: str, token: str, expected: int) -> dict[str, Any]:
    """The upstream was asked once and failed: an upstream-unavailable problem
    that carries nothing of the upstream's own answer."""
    before = len(world.upstream.seen)
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, expected, "upstream-unavailable")
    assert len(world.upstream.seen) == before + 1
    assert "Location" not in resp.headers
    assert "X-Upstream" not in resp.headers
    return dict(body)


async def test_redirects_are_neither_followed_nor_relayed(world: World) -> None:
    ds, _lic, _app, token = await world.licensed(dataset_fields=EVERY_METHOD)
    base = f"/data/{ds['id']}"
    for code in (301, 302, 303, 307, 308):
        body = await refused_after_upstream(world, f"{base}/redirect/{code}", token, 502)
        assert body["upstream_status"] == code
    await refused_after_upstream(world, f"{base}/status/302", token, 502)
    assert not [s for s in world.upstream.seen if "evil" in s["raw_path"]]

    # 304 is relayed, with its validators and without a body.
    status, body, resp = await world.call(f"{base}/etag", token)
    assert status == 200
    assert resp.headers["ETag"] == '"v1"'
    status, body, resp = await world.call(f"{base}/etag", token, headers={"If-None-Match": '"v1"'})
    assert status == 304
    assert body is None
    assert resp.headers["ETag"] == '"v1"'
    assert resp.headers["X-Call-Id"]
    assert world.upstream.last["headers"]["If-None-Match"] == '"v1"'
    # An upstream's Location pointing elsewhere is dropped, even on a 304 ...
    status, _body, resp = await world.call(f"{base}/status/304", token)
    assert status == 304
    assert "Location" not in resp.headers
    # ... and one inside the upstream is rewritten to the gateway's own path.
    status, body, resp = await world.call(f"{base}/created", token, method="POST", json={"a": 1})
    assert status == 201, body
    assert resp.headers["Location"] == f"/data/{ds['id']}/items/7?v=1"
    assert resp.headers["Content-Location"] == f"/data/{ds['id']}/items/7"
    assert world.upstream.url not in str(resp.headers)
    origin = world.upstream.url.removesuffix("/svc")
    for location, expected in (
        ("/svc/a/b", f"/data/{ds['id']}/a/b"),
        (f"{origin}/svc", f"/data/{ds['id']}/"),
        ("../outside", None),
        (f"{origin}/svcx/1", None),
        (f"{origin}/admin", None),
        ("//evil.example/svc/x", None),
        ("http://evil.example/svc/x", None),
        ("https://127.0.0.1/svc/x", None),
    ):
        status, _body, resp = await world.call(f"{base}/created", token, params={"location": location})
        assert status == 201
        assert resp.headers.get("Location") == expected, location


async def test_request_body_limit(world_factory: WorldFactory) -> None:
    world = await world_factory(proxy__max_body_bytes=1024)
    ds, _lic, _app, token = await world.licensed(dataset_fields=EVERY_METHOD)
    path = f"/data/{ds['id']}/digest"
    auth = {"Authorization": f"Bearer {token}"}

    # At the limit: forwarded.
    status, body, _resp = await world.call(path, token, method="POST", data=b"a" * 1024)
    assert status == 200
    assert body["length"] == 1024

    # Content-Length over the limit: refused before anything is forwarded.
    before = len(world.upstream.arrived)
    status, body, resp = await world.call(path, token, method="POST", data=b"a" * 1025)
    check_problem(status, body, resp, 413, "request-too-large")
    assert len(world.upstream.arrived) == before

    # Refused on the head alone: a caller that announces too much and sends
    # only a little hears 413 at once, and the upstream hears nothing.
    reader, writer = await asyncio.open_connection("127.0.0.1", world.client.server.port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        writer.write(head.encode() + b"Content-Length: 5000\r\n\r\n" + b"a" * 100)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"application/problem+json" in answer
    assert len(world.upstream.arrived) == before

    # With Expect: 100-continue the body is not even invited: the answer to
    # the head alone is the refusal, not "100 Continue".
    for auth_line in (f"Authorization: Bearer {token}\r\n", ""):
        reader, writer = await asyncio.open_connection("127.0.0.1", world.client.server.port)
        try:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth_line}Expect: 100-continue\r\n"
            writer.write(head.encode() + b"Content-Length: 5000\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 413 " if auth_line else b"HTTP/1.1 401 "), answer
    assert len(world.upstream.arrived) == before
    # An expectation the gateway cannot meet is refused (RFC 9110 §10.1.1).
    status, body, resp = await world.call(path, token, method="POST", data=b"a", headers={"Expect": "magic"})
    check_problem(status, body, resp, 417, "bad-request")
    assert len(world.upstream.arrived) == before
    async with world.client.post(path, data=b"a" * 4096, headers=auth, expect100=True) as resp:
        check_problem(resp.status, await resp.json(content_type=None), resp, 413, "request-too-large")
    async with world.client.post(path, data=b"a" * 100, expect100=True) as resp:
        check_problem(resp.status, await resp.json(content_type=None), resp, 401, "token-required")
    async with world.client.post(path, data=b"a" * 100, headers=auth, expect100=True) as resp:
        assert resp.status == 200
        assert (await resp.json())["length"] == 100
    assert len(world.upstream.arrived) == before + 1

    # Chunked, within the limit: forwarded.
    async def chunks(total: int) -> AsyncIterator[bytes]:
        for _ in range(total // 256):
            yield b"b" * 256
            await asyncio.sleep(0)

    async with world.client.post(path, data=chunks(1024), headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["length"] == 1024
    # Chunked, growing past the limit: refused, and the upstream never
    # receives a complete request.
    before = len(world.upstream.seen)
    async with world.client.post(path, data=chunks(4096), headers=auth) as resp:
        check_problem(resp.status, await resp.json(content_type=None), resp, 413, "request-too-large")
    await asyncio.sleep(0.1)
    assert len(world.upstream.seen) == before, world.upstream.seen[before:]


async def test_a_view_left_behind_by_a_starved_poll_is_confirmed_before_it_serves(world: World) -> None:
    """A process that fell behind its background poll (a starved machine)
    confirms its view with the database before it serves on it, rather than
    refusing a call it can check; the confirmation is what makes it current."""
    ds, _lic, _app, token = await world.licensed()
    cache = world.app[CATALOGUE]
    cache.confirmed_at -= 30  # as if no poll had run for half a minute
    assert cache.stale
    status, body, _ = await world.call(f"/data/{ds['id']}/x", token)
    assert status == 200, body
    assert not cache.stale


async def test_what_another_replica_made_a_moment_ago_is_served_at_once(
    world_factory: Callable[..., Awaitable[World]],
) -> None:
    """A token for an app, licence and dataset made through one replica is
    served by another at once: its view is reloaded (at most twice a second)
    before a call is refused for something it lacks, long before its own poll."""
    one = await world_factory()
    two = await world_factory(server__catalogue_refresh_seconds=30)
    await asyncio.sleep(0.6)  # past any reload the start made
    ds, _lic, app, token = await one.licensed()
    assert app["client_id"] not in two.app[CATALOGUE].current.apps
    status, body, _ = await two.call(f"/data/{ds['id']}/x", token)
    assert status == 200, body
    # Something that exists nowhere is still refused.
    nobody = two.app[TOKENS].issue(
        app_id="app-nobody",
        licensee_id="lic-nobody",
        licence_id="lcn-nobody",
        purpose="public-interest",
        datasets=[ds["id"]],
    )[0]
    await asyncio.sleep(0.6)
    status, body, resp = await two.call(f"/data/{ds['id']}/x", nobody)
    check_problem(status, body, resp, 401, "invalid-token")


async def test_every_response_carries_the_request_id(world: World) -> None:
    """``X-Request-Id`` is echoed on every response: the caller's when it is
    well-formed (the one the upstream saw and the record keeps), else the
    call id; never what an upstream says."""
    ds, _lic, _app, token = await world.licensed()
    status, _body, resp = await world.call(f"/data/{ds['id']}/x", token, headers={"X-Request-Id": "order-42"})
    assert status == 200
    assert resp.headers["X-Request-Id"] == "order-42"
    seen = {name.lower(): value for name, value in world.upstream.last["headers"].items()}
    assert seen["x-request-id"] == "order-42", seen
    for sent in (None, "has spaces in it", "x" * 200):
        headers = {"X-Request-Id": sent} if sent else {}
        status, _body, resp = await world.call(f"/data/{ds['id']}/x", token, headers=headers)
        assert status == 200
        assert resp.headers["X-Request-Id"] == resp.headers["X-Call-Id"], sent
    # Refusals, the admin API, the token endpoint, health: all of them.
    status, _body, resp = await world.call(f"/data/{ds['id']}/x", None, headers={"X-Request-Id": "r-1"})
    assert (status, resp.headers["X-Request-Id"]) == (401, "r-1")
    for method, path in (("GET", "/admin/v1/datasets"), ("POST", "/oauth/token"), ("GET", "/healthz")):
        async with world.client.request(method, path, headers={"X-Request-Id": "r-2", **world.admin}) as resp:
            assert resp.headers["X-Request-Id"] == "r-2", path
        async with world.client.request(method, path) as resp:
            assert len(resp.headers["X-Request-Id"]) >= 16, path
