"""One data call without an HTTP server (``gateway.call``): opened, reserved,
finished or abandoned against the real quota store (embedded Valkey and
Redis), its record read back from the call-record log as the ledger writer
reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from yarl import URL

from core.errors import QuotaExhaustedError
from gateway.call import Call, CallContext, digest_factory
from ledger.log import LOG, Presence
from ledger.record import SERVED, UPSTREAM_FAILURE, from_log
from licensing.catalogue import AppView, DatasetView, Grant, LicenceView
from licensing.tokens import AccessClaims
from metering.inflight import key as inflight_key
from metering.quota import LicenceKeys, QuotaBatcher
from storage.redis import RedisClient, connect
from tests.conftest import Backend

NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)


@dataclass
class FixedClock:
    at: datetime = NOW

    def now(self) -> datetime:
        return self.at


@dataclass
class Parts:
    ctx: CallContext
    redis: RedisClient
    grant: Grant
    claims: AccessClaims


@pytest.fixture
async def parts(backend: Backend) -> AsyncIterator[Parts]:
    redis = connect(backend.redis_url)
    quota = QuotaBatcher(redis)
    presence = Presence(redis, "replica-1", timeout=30, max_backlog=10_000, clock=quota.clock)
    await presence.beat()
    ctx = CallContext(
        quota=quota,
        presence=presence,
        clock=FixedClock(),
        zone=ZoneInfo("Asia/Shanghai"),
        new_digest=digest_factory("sha256"),
        replica_id="replica-1",
    )
    dataset = DatasetView(
        id="ds-1",
        name="one",
        provider="prov",
        upstream=URL("http://127.0.0.1:9/svc"),
        classification=1,
        open_class="open",
        free_monthly_calls=2,
        per_call_e4=25_000,
        per_record_e4=0,
        tiers=(),
        burst_per_second=1000,
        burst_capacity=1000,
        timeout_seconds=None,
        terms_version=3,
    )
    licence = LicenceView(
        id="licence-1",
        licensee_id="licensee-1",
        dataset_ids=frozenset({"ds-1"}),
        providers=frozenset(),
        max_classification=2,
        purposes=frozenset({"public-interest", "industrial"}),
        valid_from=datetime(2020, 1, 1, tzinfo=UTC),
        valid_until=datetime(2099, 1, 1, tzinfo=UTC),
        status="active",
        free_monthly_calls=None,
        paid_credit_limit_fen=None,
        paid_prepaid_calls=None,
    )
    app = AppView("app-1", "licensee-1", "app", True, "client_secret_basic", None, None)
    claims = AccessClaims(
        "jti-1", "app-1", "licensee-1", "licence-1", "public-interest", frozenset({"ds-1"}), 0, {}
    )
    try:
        yield Parts(ctx, redis, Grant(app, licence, dataset, "public-interest"), claims)
    finally:
        await ctx.quota.close()
        await redis.aclose()


def open_call(parts: Parts, n: int, path: str = "/data/ds-1/items?q=1") -> Call:
    return Call(
        parts.ctx,
        parts.claims,
        call_id=f"call-{n}",
        request_id=f"req-{n}",
        method="GET",
        raw_path=path,
        client_address="203.0.113.9",
    )


async def logged(parts: Parts) -> list[dict[str, object]]:
    return [from_log(fields[b"r"]) for _id, fields in await parts.redis.xrange(LOG)]


async def free_used(parts: Parts) -> int:
    period = open_call(parts, 0).period
    return int(await parts.redis.get(LicenceKeys("licence-1").free("ds-1", period)) or 0)


async def test_a_served_call_is_recorded_and_stays_counted(parts: Parts) -> None:
    call = open_call(parts, 1)
    call.authorised(parts.grant)
    charge = await call.reserve(parts.grant)
    assert charge.reservation is not None
    assert await free_used(parts) == 1
    await call.finish(status=200, outcome=SERVED, upstream_status=200, records=4, size=100, digest="ab" * 32)
    (record,) = await logged(parts)
    assert record["call_id"] == "call-1"
    assert (record["outcome"], record["status"], record["records"], record["bytes"]) == (SERVED, 200, 4, 100)
    assert (record["pool"], record["period"], record["terms_version"], record["charge_e4"]) == (
        "free",
        "2026-11",
        3,
        0,
    )
    assert record["path"] == "/data/ds-1/items"  # the query only as its digest
    assert record["query_digest"] is not None
    assert await free_used(parts) == 1
    assert await parts.redis.hlen(inflight_key("licence-1")) == 0
    # A second finish does nothing.
    await call.finish(status=500, outcome=UPSTREAM_FAILURE)
    assert len(await logged(parts)) == 1


async def test_a_failed_call_is_recorded_and_released(parts: Parts) -> None:
    call = open_call(parts, 2)
    await call.reserve(parts.grant)
    await call.finish(
        status=502, outcome=UPSTREAM_FAILURE, problem="upstream-unavailable", upstream_status=503
    )
    (record,) = await logged(parts)
    assert (record["outcome"], record["upstream_status"], record["charge_e4"]) == (UPSTREAM_FAILURE, 503, 0)
    assert await free_used(parts) == 0


async def test_a_refused_reservation_holds_nothing_and_is_recorded(parts: Parts) -> None:
    for n in (1, 2):
        call = open_call(parts, n)
        await call.reserve(parts.grant)
        await call.finish(status=200, outcome=SERVED)
    refused = open_call(parts, 3)
    with pytest.raises(QuotaExhaustedError):
        await refused.reserve(parts.grant)
    assert refused.charge is None
    await refused.finish(status=429, outcome="refused", problem="quota-exhausted")
    assert [r["outcome"] for r in await logged(parts)] == [SERVED, SERVED, "refused"]
    assert await free_used(parts) == 2


async def test_an_abandoned_call_is_left_to_the_ledger_writer(parts: Parts) -> None:
    call = open_call(parts, 4)
    await call.reserve(parts.grant)
    call.abandon()
    call.abandon()  # once
    await parts.ctx.presence.stop()
    entry = await parts.redis.hget(inflight_key("licence-1"), "call-4")
    assert entry is not None
    assert b"|orphan|" in entry
    # Nothing was recorded: the writer records it incomplete and releases it.
    assert await logged(parts) == []
    assert await free_used(parts) == 1
