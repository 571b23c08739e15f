"""The quota scripts and their batcher against real Redis / Valkey servers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from ledger.record import LOGGED_FIELDS, from_log, to_log, to_log_uncharged
from metering.periods import period_of
from metering.quota import (
    EXHAUSTED,
    IDEMPOTENCY_MISMATCH,
    IN_FLIGHT,
    NOT_KEPT,
    RATE_LIMITED,
    REPLAYED,
    RESERVED,
    QuotaBatcher,
    QuotaStoreError,
    Terms,
    plan_reservation,
)
from storage.redis import connect
from tests.conftest import REDIS_URL, flush_redis, free_port

NOW = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
PERIOD = period_of(NOW)


@pytest.fixture(params=["valkey", "redis"])
async def batcher(request: pytest.FixtureRequest, embedded_valkey_url: str) -> AsyncIterator[QuotaBatcher]:
    url = embedded_valkey_url
    if request.param == "redis":
        if not REDIS_URL:
            pytest.skip("PDG_TEST_REDIS_URL is not set (CI sets it)")
        url = REDIS_URL
    await flush_redis(url)
    client = connect(url)
    store = QuotaBatcher(client)
    try:
        yield store
    finally:
        await store.close()
        await client.aclose()


def terms(**overrides: Any) -> Terms:
    values: dict[str, Any] = {
        "licence_id": "licence-1",
        "app_id": "app-1",
        "dataset_id": "ds-1",
        "purpose": "public-interest",
        "free_limit": 3,
        "prepaid_calls": None,
        "credit_limit_fen": None,
        "per_call_e4": 25000,
        "burst_per_second": 1000.0,
        "burst_capacity": 1000,
    }
    values.update(overrides)
    return Terms(**values)


def plan(t: Terms, call: str, key: str | None = None, fingerprint: str = "GET /a") -> Any:
    return plan_reservation(t, PERIOD, NOW, call, key, fingerprint=fingerprint)


def record(call_id: str) -> dict[str, Any]:
    """A call record with every logged field (values beside the point)."""
    values: dict[str, Any] = dict.fromkeys(LOGGED_FIELDS, "x")
    values.update(call_id=call_id, time=NOW, started_at=NOW, charge_e4=0, response_digest=None)
    return values


async def test_free_pool_is_exact_and_release_gives_back(batcher: QuotaBatcher) -> None:
    t = terms()
    outcomes = await asyncio.gather(*(batcher.reserve(plan(t, f"c{i}")) for i in range(5)))
    assert sorted(o.status for o in outcomes) == [RESERVED] * 3 + [EXHAUSTED] * 2
    reserved = [i for i, o in enumerate(outcomes) if o.status == RESERVED]
    assert await batcher.release(plan(t, f"c{reserved[0]}"))
    assert not await batcher.release(plan(t, f"c{reserved[0]}")), "a second release changes nothing"
    again = await batcher.reserve(plan(t, "c-again"))
    assert again.status == RESERVED
    assert again.used == 3
    assert (await batcher.reserve(plan(t, "c-over"))).status == EXHAUSTED


async def test_periods_have_their_own_counters(batcher: QuotaBatcher) -> None:
    t = terms(free_limit=1)
    assert (await batcher.reserve(plan(t, "a"))).status == RESERVED
    assert (await batcher.reserve(plan(t, "b"))).status == EXHAUSTED
    december = plan_reservation(t, PERIOD.next(), PERIOD.next().start, "c", None)
    assert (await batcher.reserve(december)).status == RESERVED


async def test_settled_calls_stay_charged(batcher: QuotaBatcher) -> None:
    t = terms(free_limit=1)
    r = plan(t, "a")
    assert (await batcher.reserve(r)).status == RESERVED
    assert await batcher.settle(r)
    assert not await batcher.release(r), "a settled call is not released"
    assert (await batcher.reserve(plan(t, "b"))).status == EXHAUSTED


async def test_burst_limit(batcher: QuotaBatcher) -> None:
    t = terms(free_limit=100, burst_per_second=1.0, burst_capacity=2)
    results = [await batcher.reserve(plan(t, f"b{i}")) for i in range(3)]
    assert [r.status for r in results] == [RESERVED, RESERVED, RATE_LIMITED]
    assert 0 < results[2].retry_after_ms <= 1000
    # A rate-limited call consumed no quota.
    assert results[1].used == 2


async def test_prepaid_top_up_applies_at_once(batcher: QuotaBatcher) -> None:
    t = terms(purpose="industrial", prepaid_calls=2)
    assert [(await batcher.reserve(plan(t, f"p{i}"))).status for i in range(3)] == [
        RESERVED,
        RESERVED,
        EXHAUSTED,
    ]
    topped = terms(purpose="industrial", prepaid_calls=5)
    outcome = await batcher.reserve(plan(topped, "p-after-top-up"))
    assert outcome.status == RESERVED
    assert outcome.used == 3, "the counter kept its value; only the limit moved"


async def test_credit_priced_by_graduated_tiers(batcher: QuotaBatcher) -> None:
    # 2 calls at 1 fen, then 0.5 fen; limit 2 fen = 20000 e4.
    t = terms(purpose="industrial", credit_limit_fen=2, tiers=((2, 10000), (None, 5000)))
    first = [await batcher.reserve(plan(t, f"k{i}")) for i in range(2)]
    assert [(o.status, o.cost) for o in first] == [(RESERVED, 10000), (RESERVED, 10000)]
    assert (await batcher.reserve(plan(t, "k2"))).status == EXHAUSTED
    for i in range(2):
        assert await batcher.settle(plan(t, f"k{i}"))
    raised = terms(purpose="industrial", credit_limit_fen=3, tiers=((2, 10000), (None, 5000)))
    # Two calls were charged: the next lands in the second tier at worst.
    third = await batcher.reserve(plan(raised, "k3"))
    assert (third.status, third.cost, third.used) == (RESERVED, 5000, 25000)
    # A released call gives back what it held and took no position.
    assert await batcher.release(plan(raised, "k3"))
    again = await batcher.reserve(plan(raised, "k4"))
    assert (again.cost, again.used) == (5000, 25000)
    assert await batcher.settle(plan(raised, "k4"))
    assert int(await batcher.client.get(plan(raised, "k4").keys[2])) == 3, "three calls charged"


async def test_the_nth_charged_call_is_priced_at_position_n(batcher: QuotaBatcher) -> None:
    """A call released while a later one was served gives no position back
    for the next call to take again: positions are taken when calls are
    settled. Tiers: 3 fen for the first two calls, then 1 fen."""
    t = terms(purpose="industrial", credit_limit_fen=100, per_call_e4=0, tiers=((2, 30000), (None, 10000)))
    log = "pdg:test:log"
    one, two, three, four = (plan(t, f"n{i}") for i in range(1, 5))

    async def settle(r: Any) -> int:
        entry, at = to_log_uncharged(record(r.call_id))
        assert await batcher.finish(r, "settle", record=(log, entry), charge_at=at)
        entries = await batcher.client.xrange(log)
        return int(from_log(entries[-1][1][b"r"])["charge_e4"])

    assert (await batcher.reserve(one)).cost == 30000
    assert await settle(one) == 30000
    # Two and three in flight at once; three is served first, two fails.
    assert [(await batcher.reserve(r)).cost for r in (two, three)] == [30000, 30000]
    assert await settle(three) == 30000, "the second charged call: tier 1"
    assert await batcher.finish(two, "release", record=(log, to_log(record(two.call_id))))
    assert (await batcher.reserve(four)).cost == 10000, "only the second tier is left"
    assert await settle(four) == 10000, "the third charged call: tier 2"
    assert int(await batcher.client.get(one.keys[1])) == 70000, "the pool holds exactly the charges"
    assert int(await batcher.client.get(one.keys[2])) == 3


async def test_credit_holds_the_worst_case_and_keeps_the_actual(batcher: QuotaBatcher) -> None:
    """A credit reservation holds the per-call price plus the records' most
    (here 5 records at 1 fen); settlement keeps the actual charge."""
    t = terms(purpose="industrial", credit_limit_fen=10, per_call_e4=10000, worst_records_e4=50000)
    r1, r2, r3 = (plan(t, f"r{i}") for i in range(1, 4))
    assert (await batcher.reserve(r1)).used == 60000
    assert await batcher.settle(r1, extra_e4=30000)
    assert int(await batcher.client.get(r1.keys[1])) == 40000, "3 records: 1 + 3 fen kept"
    assert (await batcher.reserve(r2)).used == 100000
    assert (await batcher.reserve(r3)).status == EXHAUSTED, "a worst case that does not fit: refused"
    assert await batcher.settle(r2)
    assert int(await batcher.client.get(r1.keys[1])) == 50000


async def test_no_paid_terms_means_payment_required(batcher: QuotaBatcher) -> None:
    outcome = await batcher.reserve(plan(terms(purpose="industrial"), "n1"))
    assert outcome.status == EXHAUSTED


async def test_idempotent_retries_are_charged_once(batcher: QuotaBatcher) -> None:
    t = terms(free_limit=5)
    first = plan(t, "i1", "order-42")
    assert (await batcher.reserve(first)).status == RESERVED
    in_flight = await batcher.reserve(plan(t, "i2", "order-42"))
    assert (in_flight.status, in_flight.first_call_id) == (IN_FLIGHT, "i1")
    assert await batcher.finish(first, "settle", record=None, response=b"kept\n\x00response")
    replay = await batcher.reserve(plan(t, "i3", "order-42"))
    assert (replay.status, replay.used, replay.first_call_id) == (REPLAYED, 1, "i1")
    assert replay.response == b"kept\n\x00response"
    other = await batcher.reserve(plan(terms(free_limit=5, app_id="app-2"), "i4", "order-42"))
    assert other.status == RESERVED, "the key is per app"
    assert other.used == 2


async def test_a_key_is_bound_to_its_request(batcher: QuotaBatcher) -> None:
    t = terms(free_limit=1)
    first = plan(t, "m1", "order-43", fingerprint="GET /a")
    assert (await batcher.reserve(first)).status == RESERVED
    # In flight or served, and with the allowance used up: another request
    # under the key is refused, counted nowhere.
    for settled in (False, True):
        if settled:
            assert await batcher.settle(first)
        for call, fingerprint in (("m2", "GET /b"), ("m3", "POST /a")):
            other = await batcher.reserve(plan(t, call, "order-43", fingerprint=fingerprint))
            assert (other.status, other.first_call_id, other.cost) == (IDEMPOTENCY_MISMATCH, "m1", 0)
    assert (await batcher.reserve(plan(t, "m4", "order-43"))).status == NOT_KEPT, "settled, nothing kept"
    assert (await batcher.reserve(plan(t, "m5"))).used == 1


async def test_a_released_idempotent_call_is_charged_on_retry(batcher: QuotaBatcher) -> None:
    t = terms(free_limit=5)
    first = plan(t, "j1", "k")
    assert (await batcher.reserve(first)).status == RESERVED
    assert await batcher.release(first)
    retry = await batcher.reserve(plan(t, "j2", "k"))
    assert (retry.status, retry.used) == (RESERVED, 1)
    # Released, the key is free for any request.
    assert await batcher.release(plan(t, "j2", "k"))
    other = await batcher.reserve(plan(t, "j3", "k", fingerprint="POST /b"))
    assert (other.status, other.used) == (RESERVED, 1)


async def test_scripts_reload_after_a_flush(batcher: QuotaBatcher) -> None:
    assert (await batcher.reserve(plan(terms(), "s1"))).status == RESERVED
    await batcher.client.script_flush()
    assert (await batcher.reserve(plan(terms(), "s2"))).status == RESERVED


async def test_unreachable_store_fails_closed() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    store = QuotaBatcher(client)
    try:
        with pytest.raises(QuotaStoreError):
            await store.reserve(plan(terms(), "u1"))
    finally:
        await client.aclose()


async def test_a_task_sending_commands_stops_when_cancelled(batcher: QuotaBatcher) -> None:
    """A cancellation reaches a task whatever command it is in the middle of.
    (A client whose sends go through ``asyncio.wait_for`` -- redis-py's
    per-command socket timeout -- loses some on Python 3.11, and the task
    carries on: a background loop that never stops, a timeout that never
    fires.)"""
    client = batcher.client
    rng = random.Random(7)

    async def busy() -> None:
        while True:
            await client.eval("return redis.call('INCR', KEYS[1])", 1, "pdg:test:busy")
            await client.get("pdg:test:busy")

    for _ in range(200):
        task = asyncio.create_task(busy())
        await asyncio.sleep(rng.random() * 0.003)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert task in done, "the task went on after it was cancelled"
        assert task.cancelled()
    assert int(await client.get("pdg:test:busy") or 0) > 0


async def test_a_finish_appends_the_call_record_in_the_same_run(batcher: QuotaBatcher) -> None:
    client = batcher.client
    t = terms(free_limit=10)
    calls = [plan(t, f"r{i}") for i in range(6)]
    assert all(o.status == RESERVED for o in await asyncio.gather(*(batcher.reserve(r) for r in calls)))
    assert await client.hlen(calls[0].keys[4]) == 6
    # One batch: settles, releases and records together.
    done = await asyncio.gather(
        *(
            batcher.finish(
                r, "settle" if i % 2 else "release", record=("pdg:test:log", f"record {i}".encode())
            )
            for i, r in enumerate(calls)
        )
    )
    assert done == [True] * 6
    entries = await client.xrange("pdg:test:log")
    assert sorted(fields[b"r"] for _id, fields in entries) == [f"record {i}".encode() for i in range(6)]
    assert await client.hlen(calls[0].keys[4]) == 0, "no call left in flight"
    assert int(await client.get(calls[0].pool.counter_key)) == 3, "the three released calls were given back"
    # A call finished already: its record is still appended; nothing else moves.
    assert not await batcher.finish(calls[0], "release", record=("pdg:test:log", b"late"))
    assert await client.xlen("pdg:test:log") == 7
    assert int(await client.get(calls[0].pool.counter_key)) == 3


async def test_counters_get_their_time_to_live_when_made(batcher: QuotaBatcher) -> None:
    """A period's counters outlive it (usage and reconciliation read them) and
    then go: each gets its time to live when the period's first call makes it,
    and keeps it (no EXPIRE on every call)."""
    client = batcher.client
    credit = terms(purpose="industrial", credit_limit_fen=1000)
    free = terms(dataset_id="ds-2")
    first = [plan(free, "f1"), plan(credit, "p1")]
    for reservation in first:
        assert (await batcher.reserve(reservation)).status == RESERVED
    assert await batcher.settle(first[1])  # a paid call takes its position when settled
    keys = [first[0].keys[1], first[1].keys[1], first[1].keys[2]]  # free, credit, paid calls
    ttls = [await client.ttl(key) for key in keys]
    assert all(399 * 24 * 3600 < ttl <= 400 * 24 * 3600 for ttl in ttls), ttls
    for key in keys:
        await client.expire(key, 1000)  # as if made long ago
    for reservation in (plan(free, "f2"), plan(credit, "p2")):
        assert (await batcher.reserve(reservation)).status == RESERVED
        assert await batcher.settle(reservation)
    assert [await client.ttl(key) for key in keys] == [pytest.approx(1000, abs=5)] * 3
    assert int(await client.get(keys[0]) or 0) == 2
