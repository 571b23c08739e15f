"""``Idempotency-Key`` through the running gateway (DESIGN §3, §4;
draft-ietf-httpapi-idempotency-key-header): a key is bound to the request it
was first sent with (method, path, query, body); another request under it is
refused (422) and never forwarded; a retry of a served call is answered with
the first response and never reaches the upstream again; a retry while the
first is in flight gets 409; a response too large to keep, 409 naming the
first call; a first call the upstream failed frees the key.

Everything runs through the real gateway in front of a real upstream that
counts what it receives, on both backends; what was charged is read back
through the usage API and the ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from gateway.charging import fingerprint
from gateway.state import CATALOGUE, QUOTA
from ledger.record import opening
from metering.periods import period_of, zone
from metering.quota import Terms, plan_reservation
from tests.conftest import World, free_port
from tests.test_data_plane import check_problem, eventually
from tests.test_ledger import lost_call_skeleton, records_of
from tests.test_quota import NOW, PERIOD, refused, sf_items, stop_clock, usage

WorldFactory = Callable[..., Awaitable[World]]

#: The datasets here serve writes too: the key, not the method, is under test.
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


@pytest.fixture
async def world(world_factory: WorldFactory) -> World:
    started = await world_factory()
    stop_clock(started, NOW)
    return started


async def free_used(world: World, lic: dict[str, Any], ds: dict[str, Any]) -> int:
    return int((await usage(world, lic, ds, PERIOD))["free"]["used"])


async def paid_calls(world: World, lic: dict[str, Any], ds: dict[str, Any]) -> int:
    return int((await usage(world, lic, ds, PERIOD))["paid"]["calls"])


def same_response(first: tuple[int, Any, Any], again: tuple[int, Any, Any], *names: str) -> None:
    """``again`` is ``first`` replayed: status, body and the named header
    fields alike; its own call id."""
    (status, body, resp), (status2, body2, resp2) = first, again
    assert (status2, body2) == (status, body)
    for name in names:
        assert resp2.headers.getall(name) == resp.headers.getall(name), name
    assert resp2.headers["X-Call-Id"] != resp.headers["X-Call-Id"]


async def test_a_key_reused_for_another_request_is_refused_and_never_forwarded(world: World) -> None:
    """The hole this closes: once the free allowance was used up, one key
    sent with other paths, queries or methods was forwarded again for free."""
    ds, lic, _app, token = await world.licensed(dataset_fields={"methods": METHODS, "free_monthly_calls": 2})
    key = {"Idempotency-Key": "order-7f3a"}
    base = f"/data/{ds['id']}"
    first = await world.call(f"{base}/orders?id=7", token, headers=key)
    assert first[0] == 200, first[1]
    first_id = first[2].headers["X-Call-Id"]
    status, body, _ = await world.call(f"{base}/other", token)
    assert status == 200, body
    assert await free_used(world, lic, ds) == 2  # the allowance is used up
    seen = len(world.upstream.seen)

    others = [
        "orders?id=8",
        "orders",
        "orders?id=7&page=2",
        "orders/7?id=7",
        "Orders?id=7",
        "orders?ID=7",
        "orders/?id=7",
        "invoices?id=7",
    ]
    for rest in others:
        resp = await refused(world, f"{base}/{rest}", token, 422, "idempotency-mismatch", headers=key)
        problem = await resp.json(content_type=None)
        assert problem["first_call_id"] == first_id, problem
    resp = await refused(
        world,
        f"{base}/orders?id=7",
        token,
        422,
        "idempotency-mismatch",
        method="POST",
        data=b"{}",
        headers=key,
    )
    assert (await resp.json(content_type=None))["first_call_id"] == first_id
    assert await free_used(world, lic, ds) == 2

    # The request itself, again: the first response, from the gateway.
    again = await world.call(f"{base}/orders?id=7", token, headers=key)
    same_response(first, again, "X-Upstream", "Content-Type")
    assert again[1]["raw_path"] == "/svc/orders?id=7"
    assert sf_items(again[2].headers["RateLimit"])["free"]["r"] == 0
    assert len(world.upstream.seen) == seen
    assert await free_used(world, lic, ds) == 2

    rows = await records_of(world, 12)
    assert len(rows) == 12
    mine = {r["call_id"]: r for r in rows}
    assert mine[first_id]["charge_e4"] == 0
    assert mine[first_id]["pool"] == "free"
    refusals = [r for r in rows if r["problem"] == "idempotency-mismatch"]
    assert len(refusals) == 9
    assert {(r["status"], r["outcome"], r["charge_e4"]) for r in refusals} == {(422, "refused", 0)}
    replay = mine[again[2].headers["X-Call-Id"]]
    assert (replay["outcome"], replay["pool"], replay["charge_e4"], replay["status"]) == (
        "served",
        "replay",
        0,
        200,
    )
    assert replay["response_digest"] == mine[first_id]["response_digest"]


async def test_a_retry_gets_the_first_response_back_without_the_upstream(world: World) -> None:
    ds, lic, _app, token = await world.licensed(purpose="industrial", dataset_fields={"methods": METHODS})
    other_app = await world.app_client(lic["licensee_id"])
    other = await world.token(other_app, f"purpose:industrial dataset:{ds['id']}")
    path = f"/data/{ds['id']}/created?tag=a%20b"
    key = {"Idempotency-Key": "create-item-1", "Content-Type": "application/json"}
    payload = b'{"name": "item"}'
    seen = len(world.upstream.seen)
    first = await world.call(path, token, method="POST", data=payload, headers=key)
    assert first[0] == 201, first[1]
    assert world.upstream.last["body"] == payload.decode()
    assert first[2].headers["Location"] == f"/data/{ds['id']}/items/7?v=1"
    for _ in range(2):
        again = await world.call(path, token, method="POST", data=payload, headers=key)
        same_response(first, again, "Location", "Content-Location", "Content-Type", "Content-Length")
        assert "RateLimit-Policy" in again[2].headers
    assert len(world.upstream.seen) == seen + 1
    assert await paid_calls(world, lic, ds) == 1

    # Another body under the key: refused, never forwarded.
    await refused(
        world, path, token, 422, "idempotency-mismatch", method="POST", data=b'{"name": "other"}', headers=key
    )
    # The same key from another app of the licence is another call.
    status, body, _ = await world.call(path, other, method="POST", data=payload, headers=key)
    assert status == 201, body
    # A new key is a new call.
    fresh = {**key, "Idempotency-Key": "create-item-2"}
    status, body, _ = await world.call(path, token, method="POST", data=payload, headers=fresh)
    assert status == 201, body
    assert len(world.upstream.seen) == seen + 3
    assert await paid_calls(world, lic, ds) == 3


async def test_a_retry_while_the_first_is_in_flight_gets_409(world: World) -> None:
    ds, lic, _app, token = await world.licensed(dataset_fields={"methods": METHODS, "free_monthly_calls": 5})
    key = {"Idempotency-Key": "slow-order-1"}
    path = f"/data/{ds['id']}/drip"
    first = asyncio.create_task(world.call(path, token, headers=key))
    await eventually(lambda: _arrived(world, "/svc/drip"))

    resp = await refused(world, path, token, 409, "conflict", headers=key)
    assert resp.headers["Retry-After"] == "1"
    # Another request under the key, in flight or not: 422.
    await refused(world, f"/data/{ds['id']}/x", token, 422, "idempotency-mismatch", headers=key)
    assert not first.done()
    world.upstream.drip_release.set()
    status, body, resp = await first
    assert (status, body) == (200, b"first;last")
    first_id = resp.headers["X-Call-Id"]
    problem = await (
        await refused(world, f"/data/{ds['id']}/x", token, 422, "idempotency-mismatch", headers=key)
    ).json(content_type=None)
    assert problem["first_call_id"] == first_id

    seen = len(world.upstream.seen)
    status, body, _ = await world.call(path, token, headers=key)
    assert (status, body) == (200, b"first;last")
    assert len(world.upstream.seen) == seen
    assert await free_used(world, lic, ds) == 1


async def _arrived(world: World, path: str) -> bool:
    return path in world.upstream.arrived


async def test_a_response_too_large_to_keep_is_not_sent_again(world_factory: WorldFactory) -> None:
    world = await world_factory(proxy__idempotent_response_max_bytes=1000)
    stop_clock(world, NOW)
    ds, lic, _app, token = await world.licensed(dataset_fields={"methods": METHODS, "free_monthly_calls": 5})
    # At the limit: kept, and replayed.
    key = {"Idempotency-Key": "just-fits"}
    first = await world.call(f"/data/{ds['id']}/big?bytes=1000", token, headers=key)
    assert first[0] == 200
    seen = len(world.upstream.seen)
    again = await world.call(f"/data/{ds['id']}/big?bytes=1000", token, headers=key)
    same_response(first, again, "Content-Type")
    assert len(world.upstream.seen) == seen

    key = {"Idempotency-Key": "too-big"}
    status, body, resp = await world.call(f"/data/{ds['id']}/big?bytes=1001", token, headers=key)
    assert (status, len(body)) == (200, 1001)
    first_id = resp.headers["X-Call-Id"]
    for _ in range(2):
        resp = await refused(world, f"/data/{ds['id']}/big?bytes=1001", token, 409, "conflict", headers=key)
        problem = await resp.json(content_type=None)
        assert problem["first_call_id"] == first_id
        assert first_id in problem["detail"]
    assert await free_used(world, lic, ds) == 2


@pytest.fixture
async def flaky() -> AsyncIterator[dict[str, Any]]:
    """An upstream that fails its first call (503) and serves the next ones;
    it counts the requests that reach it."""
    state: dict[str, Any] = {"calls": 0, "bodies": []}

    async def handler(request: web.Request) -> web.Response:
        state["calls"] += 1
        state["bodies"].append(await request.read())
        if state["calls"] == 1:
            return web.json_response({"down": True}, status=503)
        return web.json_response({"served": state["calls"]})

    port = free_port()
    runner = web.AppRunner(web.Application())
    runner.app.router.add_route("*", "/{tail:.*}", handler)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state["url"] = f"http://127.0.0.1:{port}/up"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_a_failed_first_call_frees_the_key(world: World, flaky: dict[str, Any]) -> None:
    ds, lic, _app, token = await world.licensed(
        purpose="industrial", dataset_fields={"methods": METHODS, "upstream_url": flaky["url"]}
    )
    key = {"Idempotency-Key": "pay-1"}
    path = f"/data/{ds['id']}/orders?id=1"
    status, body, resp = await world.call(path, token, method="POST", data=b"order", headers=key)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    assert await paid_calls(world, lic, ds) == 0
    # The retry is a new call: forwarded, charged once; then replayed.
    for _ in range(2):
        status, body, _ = await world.call(path, token, method="POST", data=b"order", headers=key)
        assert (status, body) == (200, {"served": 2})
        assert await paid_calls(world, lic, ds) == 1
    assert flaky["bodies"] == [b"order", b"order"]


async def test_replays_across_gateways_sharing_one_store(world_factory: WorldFactory) -> None:
    one = await world_factory()
    two = await world_factory()  # same database and Redis: another replica
    for started in (one, two):
        stop_clock(started, NOW)
    ds, lic, _app, token = await one.licensed(dataset_fields={"methods": METHODS, "free_monthly_calls": 5})
    # The second replica learns of the new app and licence on its next refresh: now.
    await two.app[CATALOGUE].reload()
    key = {"Idempotency-Key": "across"}
    path = f"/data/{ds['id']}/report?year=2026"
    first = await one.call(path, token, method="PUT", data=b"payload", headers=key)
    assert first[0] == 200, first[1]
    seen = len(one.upstream.seen)
    again = await two.call(path, token, method="PUT", data=b"payload", headers=key)
    same_response(first, again, "X-Upstream", "Content-Type")
    await refused(two, path, token, 422, "idempotency-mismatch", method="PUT", data=b"other", headers=key)
    assert len(one.upstream.seen) == seen
    assert await free_used(one, lic, ds) == 1


async def test_replays_are_held_to_the_burst_limit(world: World) -> None:
    """A replay is answered by the gateway, but it is a call of the app like
    any other: not charged, not forwarded, not exempt from the burst limit."""
    ds, _lic, _app, token = await world.licensed(
        dataset_fields={"methods": METHODS, "burst": {"per_second": 1, "capacity": 2}}
    )
    key = {"Idempotency-Key": "hammer"}
    seen = len(world.upstream.seen)
    for _ in range(2):
        status, body, _ = await world.call(f"/data/{ds['id']}/x", token, headers=key)
        assert status == 200, body
    assert len(world.upstream.seen) == seen + 1
    await refused(world, f"/data/{ds['id']}/x", token, 429, "rate-limited", headers=key)


async def test_a_body_over_the_limit_is_refused_before_anything_is_reserved(
    world_factory: WorldFactory,
) -> None:
    world = await world_factory(proxy__max_body_bytes=2000)
    stop_clock(world, NOW)
    ds, lic, _app, token = await world.licensed(dataset_fields={"methods": METHODS, "free_monthly_calls": 5})
    path = f"/data/{ds['id']}/upload"
    key = {"Idempotency-Key": "upload-1"}

    async def chunked(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 10):
            yield b"x" * 10

    # Announced by Content-Length, or found while reading a chunked body.
    await refused(world, path, token, 413, "request-too-large", method="POST", data=b"x" * 2001, headers=key)
    await refused(
        world, path, token, 413, "request-too-large", method="POST", data=chunked(2010), headers=key
    )
    assert await free_used(world, lic, ds) == 0
    # The key was not taken: the same key with a body within the limit is served,
    # the chunked body forwarded whole.
    status, body, _ = await world.call(path, token, method="POST", data=chunked(2000), headers=key)
    assert (status, body["body_length"]) == (200, 2000)
    assert await free_used(world, lic, ds) == 1


async def test_a_head_retry_gets_the_first_head_back(world: World) -> None:
    ds, lic, _app, token = await world.licensed(dataset_fields={"methods": METHODS, "free_monthly_calls": 5})
    key = {"Idempotency-Key": "head-1"}
    path = f"/data/{ds['id']}/etag"
    first = await world.call(path, token, method="HEAD", headers=key)
    assert first[0] == 200
    seen = len(world.upstream.seen)
    again = await world.call(path, token, method="HEAD", headers=key)
    same_response(first, again, "ETag", "Cache-Control", "Content-Type", "Content-Length")
    assert len(world.upstream.seen) == seen
    # GET is another request under the key.
    await refused(world, path, token, 422, "idempotency-mismatch", headers=key)
    assert await free_used(world, lic, ds) == 1


async def test_a_key_held_by_a_replica_that_died_is_freed_by_the_writer(world_factory: WorldFactory) -> None:
    """A replica reserves an idempotent call and dies: the ledger writer
    records the call incomplete and releases it, and frees its key, so the
    caller's retry is a new call, forwarded and charged once."""
    world = await world_factory(ledger__replica_timeout_seconds=3)
    ds, lic, app, token = await world.licensed(
        dataset_fields={"methods": METHODS}, licence_fields={"paid": {"prepaid_calls": 10}}
    )
    key = "lost-order"
    path = f"/data/{ds['id']}/orders?id=1"
    now = datetime.now(UTC)
    period = period_of(now, zone(world.settings.billing.time_zone))
    call_id = "0190f000-0000-7000-8000-0000000000a1"
    skeleton = lost_call_skeleton(
        app, lic, ds, call_id, "public-interest", "free", "orders", now, period.name
    )
    terms = Terms(
        licence_id=lic["id"],
        app_id=app["client_id"],
        dataset_id=ds["id"],
        purpose="public-interest",
        free_limit=100,
        prepaid_calls=None,
        credit_limit_fen=None,
        per_call_e4=0,
    )
    reservation = plan_reservation(
        terms,
        period,
        now,
        call_id,
        key,
        replica="replica-that-died",
        record=opening(skeleton),
        fingerprint=fingerprint("GET", path, b""),
    )
    assert (await world.app[QUOTA].reserve(reservation)).status == 0
    # While the dead replica's call holds the key: 409, naming it.
    resp = await refused(world, path, token, 409, "conflict", headers={"Idempotency-Key": key})
    assert (await resp.json(content_type=None))["first_call_id"] == call_id

    rows = await records_of(world, 2, within=15)
    lost = [r for r in rows if r["call_id"] == call_id]
    assert [(r["outcome"], r["charge_e4"]) for r in lost] == [("incomplete", 0)]

    async def key_free() -> bool:
        status, _body, _resp = await world.call(path, token, headers={"Idempotency-Key": key})
        return status != 409

    seen = len(world.upstream.seen)
    await eventually(key_free, within=10)
    assert len(world.upstream.seen) == seen + 1
    assert world.upstream.last["raw_path"] == "/svc/orders?id=1"
    # Served, it is replayed from now on.
    status, _body, _resp = await world.call(path, token, headers={"Idempotency-Key": key})
    assert status == 200
    assert len(world.upstream.seen) == seen + 1
