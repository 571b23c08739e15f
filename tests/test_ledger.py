"""The call record end to end: one durable record per authenticated call,
whatever its outcome, chained and checkpointed; the log's backlog bound; the
recovery of calls a dead replica left unfinished."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from gateway.state import ENGINE, PRESENCE, QUOTA, REDIS, SETTINGS
from ledger.chain import Verifier
from ledger.log import LOG
from ledger.models import CallRow, CheckpointRow, LedgerStateRow, LogCheckpointRow
from ledger.note import Signer
from ledger.record import hashed, opening
from ledger.store import LedgerError, LedgerStore, checkpoint_of
from ledger.writer import start_writer
from licensing.keys import load_or_create_signing_key
from metering.periods import period_of, zone
from metering.quota import Terms, plan_reservation
from tests.conftest import World
from tests.test_audit import make_record

pytestmark = pytest.mark.usefixtures("backend")


async def records_of(world: World, expected: int, within: float = 15.0) -> list[dict[str, Any]]:
    """The ledger's rows once it holds ``expected`` of them."""
    engine = world.app[ENGINE]
    deadline = asyncio.get_running_loop().time() + within
    while True:
        async with engine.connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(select(CallRow).order_by(CallRow.seq))]
        if len(rows) >= expected or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def verify_rows(world: World) -> Any:
    engine = world.app[ENGINE]
    settings = world.app[SETTINGS]
    key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
    async with engine.connect() as conn:
        cps = [checkpoint_of(r) for r in await conn.execute(select(CheckpointRow))]
        rows = [dict(r._mapping) for r in await conn.execute(select(CallRow).order_by(CallRow.seq))]
    verifier = Verifier(
        settings.ledger.hash_algorithm,
        checkpoints=sorted(cps, key=lambda c: c.first_seq),
        public_keys={key.kid: key.private_key.public_key()},
    )
    for row in rows:
        problem = verifier.feed(hashed(row), bytes.fromhex(row["hash"]))
        if problem:
            return problem
    return verifier.finish(), len(cps)


async def test_every_authenticated_call_has_exactly_one_record(world: World) -> None:
    ds, lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 3})
    other = await world.dataset()
    slow = await world.dataset(timeout_seconds=0.3)
    expected: dict[str, tuple[int, str, str | None]] = {}
    got: dict[str, tuple[int, str, bytes]] = {}

    async def call(rid: str, path: str, status: int, outcome: str, problem: str | None, **kw: Any) -> None:
        code, _body, resp = await world.call(path, token, headers={"X-Request-Id": rid}, **kw)
        assert code == status, (rid, code, _body)
        got[rid] = (code, resp.headers["X-Call-Id"], b"")
        expected[rid] = (status, outcome, problem)

    # served (also an upstream 404: the upstream answered), with a query
    await call("r-served", f"/data/{ds['id']}/echo?id_card=110101199003074512", 200, "served", None)
    await call("r-404", f"/data/{ds['id']}/status/404", 404, "served", None)
    # refused by the licence, by the catalogue, by the path, by the quota
    await call("r-unlicensed", f"/data/{other['id']}/echo", 403, "refused", "dataset-not-licensed")
    await call("r-unknown", "/data/no-such-dataset/echo", 404, "refused", "unknown-dataset")
    await call("r-badpath", f"/data/{ds['id']}/a%2Fb", 400, "refused", "bad-request")
    await call("r-served-2", f"/data/{ds['id']}/echo", 200, "served", None)
    await call("r-exhausted", f"/data/{ds['id']}/echo", 429, "refused", "quota-exhausted")
    # upstream failures: never charged
    lic2_ee = await world.licensee()
    lic2 = await world.licence(lic2_ee["id"], [slow["id"]])
    app2 = await world.app_client(lic2_ee["id"])
    token2 = await world.token(app2, f"purpose:public-interest dataset:{slow['id']}")
    for rid, path, status in (
        ("r-502", f"/data/{slow['id']}/status/503", 502),
        ("r-504", f"/data/{slow['id']}/slow", 504),
    ):
        code, _b, resp = await world.call(path, token2, headers={"X-Request-Id": rid})
        assert code == status
        got[rid] = (code, resp.headers["X-Call-Id"], b"")
        expected[rid] = (status, "upstream-failure", "upstream-unavailable")
    # a response the upstream cut short: incomplete
    with pytest.raises(Exception):  # noqa: B017,PT011 - any client error: the body is not whole
        await world.call(f"/data/{slow['id']}/cut", token2, headers={"X-Request-Id": "r-cut"})
    expected["r-cut"] = (200, "incomplete", "upstream-unavailable")
    # not authenticated: counted in metrics, never recorded
    code, _b, _r = await world.call(f"/data/{ds['id']}/echo", None, headers={"X-Request-Id": "r-anon"})
    assert code == 401
    code, _b, _r = await world.call(
        f"/data/{ds['id']}/echo", "not-a-token", headers={"X-Request-Id": "r-bad"}
    )
    assert code == 401

    rows = await records_of(world, len(expected))
    await asyncio.sleep(0.5)  # anything extra would have landed by now
    rows = await records_of(world, len(expected))
    by_rid = {row["request_id"]: row for row in rows}
    assert len(rows) == len(expected) == len(by_rid)
    assert set(by_rid) == set(expected)
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    for rid, (status, outcome, problem) in expected.items():
        row = by_rid[rid]
        assert (row["status"], row["outcome"], row["problem"]) == (status, outcome, problem), rid
        if rid in got:
            assert row["call_id"] == got[rid][1]
        assert row["token_id"]
        assert token not in str(row.values())
    served = by_rid["r-served"]
    assert served["dataset_id"] == ds["id"]
    assert served["licence_id"] == lic["id"]
    assert served["path"] == f"/data/{ds['id']}/echo"
    assert served["query_digest"] == hashlib.sha256(b"id_card=110101199003074512").hexdigest()
    assert "110101199003074512" not in str(rows)
    assert served["pool"] == "free"
    assert served["charge_e4"] == 0
    assert served["upstream_status"] == 200
    assert by_rid["r-502"]["upstream_status"] == 503
    assert by_rid["r-cut"]["bytes"] > 0
    # the digest is of the body as the caller received it (here a refusal)
    async with world.client.get(
        f"/data/{ds['id']}/echo", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 429
        raw = await resp.read()
    rows = await records_of(world, len(expected) + 1)
    assert rows[-1]["response_digest"] == hashlib.sha256(raw).hexdigest()
    assert rows[-1]["bytes"] == len(raw)
    # nothing left in flight, nothing charged twice
    redis = world.app[REDIS]
    assert await redis.hlen(f"pdg:{{{lic['id']}}}:inflight") == 0
    assert await redis.hlen(f"pdg:{{{lic2['id']}}}:inflight") == 0
    period = period_of(datetime.now(UTC), zone(world.settings.billing.time_zone)).name
    assert int(await redis.get(f"pdg:{{{lic['id']}}}:free:{ds['id']}:{period}") or 0) == 3
    assert int(await redis.get(f"pdg:{{{lic2['id']}}}:free:{slow['id']}:{period}") or 0) == 0
    problem, _n = await verify_rows(world)
    assert problem is None


async def test_records_are_chained_and_checkpointed(world_factory: Callable[..., Awaitable[World]]) -> None:
    world = await world_factory(ledger__checkpoint_records=4, ledger__checkpoint_seconds=0.5)
    ds, _lic, _app, token = await world.licensed()
    for i in range(11):
        code, body, _ = await world.call(f"/data/{ds['id']}/records?n={i}", token)
        assert code == 200
        assert len(body) == i
    rows = await records_of(world, 11)
    assert [r["records"] for r in rows] == list(range(11))
    # Two checkpoints by count; the timer checkpoints the tail.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        problem, checkpoints = await verify_rows(world)
        if checkpoints >= 3 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert problem is None
    assert checkpoints >= 3
    # Records and signed checkpoints are append-only in the database itself.
    for statement in (
        "UPDATE calls SET status = 200 WHERE seq = 1",
        "DELETE FROM calls WHERE seq = 11",
        "UPDATE ledger_checkpoints SET chain_head = merkle_root",
        "DELETE FROM ledger_checkpoints",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with world.app[ENGINE].begin() as conn:
                await conn.execute(text(statement))
    assert (await verify_rows(world)) == (None, checkpoints)


def ledger_store(world: World, checkpoint_records: int) -> LedgerStore:
    """A writer's store over the world's ledger, with its keys; checkpoints
    by count, or when asked (the timer's are far off)."""
    settings = world.settings
    key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
    log_key = load_or_create_signing_key(settings.log_key_path, "EdDSA")
    return LedgerStore(
        world.app[ENGINE],
        key,
        checkpoint_records=checkpoint_records,
        checkpoint_seconds=3600,
        time_zone=settings.billing.time_zone,
        log_signer=Signer(settings.log_origin, log_key.private_key),
    )


async def ledger_state(world: World) -> tuple[int, int, str]:
    """``(next_seq, checkpointed_seq, log_position)``."""
    async with world.app[ENGINE].connect() as conn:
        state = (await conn.execute(select(LedgerStateRow))).one()
    return state.next_seq, state.checkpointed_seq, state.log_position


async def test_a_batchs_tail_checkpointed_later_keeps_the_tree_head_its_batch_signed(
    world_factory: Callable[..., Awaitable[World]],
) -> None:
    """A checkpoint cut by count inside a batch signs the whole-log tree as the
    batch leaves it; the checkpoint of the batch's tail (the timer's, or a
    clean stop's) finds the tree the same size and keeps that signed head,
    rather than failing on it again at every retry."""
    world = await world_factory(ledger__run_writer=False)
    store = ledger_store(world, checkpoint_records=4)
    appended = await store.append([make_record(i) for i in range(1, 7)], "1-0")
    assert [(cp.first_seq, cp.last_seq) for cp in appended.checkpoints] == [(1, 4)]
    appended = await store.append([], "1-0", force_checkpoint=True)
    assert [(cp.first_seq, cp.last_seq) for cp in appended.checkpoints] == [(5, 6)]
    appended = await store.append([make_record(i) for i in range(7, 9)], "2-0", force_checkpoint=True)
    assert [(cp.first_seq, cp.last_seq) for cp in appended.checkpoints] == [(7, 8)]
    async with world.app[ENGINE].connect() as conn:
        sizes = list(
            (await conn.execute(select(LogCheckpointRow.size).order_by(LogCheckpointRow.size))).scalars()
        )
    assert sizes == [6, 8]
    assert await ledger_state(world) == (9, 8, "2-0")
    assert (await verify_rows(world)) == (None, 3)


async def test_a_checkpoint_already_stored_is_kept_and_a_different_one_refused(
    world_factory: Callable[..., Awaitable[World]],
) -> None:
    world = await world_factory(ledger__run_writer=False)
    await ledger_store(world, 100).append([make_record(i) for i in range(1, 4)], "1-0", force_checkpoint=True)
    assert await ledger_state(world) == (4, 3, "1-0")

    async def forget_the_checkpoint() -> None:
        async with world.app[ENGINE].begin() as conn:
            await conn.execute(update(LedgerStateRow).values(checkpointed_seq=0))

    # The checkpoint (and the tree head signed with it) is stored, but the
    # state leaves records 1..3 open: the writer cuts the same checkpoint,
    # keeps the stored one and moves on.
    await forget_the_checkpoint()
    appended = await ledger_store(world, 100).append([], "1-0", force_checkpoint=True)
    assert [(cp.first_seq, cp.last_seq) for cp in appended.checkpoints] == [(1, 3)]
    assert await ledger_state(world) == (4, 3, "1-0")
    assert (await verify_rows(world)) == (None, 1)
    # A different checkpoint over stored ones is refused, with nothing of its
    # batch written.
    await forget_the_checkpoint()
    with pytest.raises(LedgerError, match=r"a different checkpoint over records 1\.\.4"):
        await ledger_store(world, 100).append([make_record(4)], "2-0", force_checkpoint=True)
    assert await ledger_state(world) == (4, 0, "1-0")
    assert len(await records_of(world, 3)) == 3
    assert (await verify_rows(world)) == (None, 1)


async def test_sm3_chain_and_digests(world_factory: Callable[..., Awaitable[World]]) -> None:
    pytest.importorskip("cryptography")
    from ledger.chain import sm3_available

    if not sm3_available():
        pytest.skip("this OpenSSL build has no SM3")
    world = await world_factory(ledger__hash_algorithm="sm3", ledger__checkpoint_records=2)
    ds, _lic, _app, token = await world.licensed()
    for _ in range(3):
        code, _b, _r = await world.call(f"/data/{ds['id']}/echo", token)
        assert code == 200
    rows = await records_of(world, 3)
    assert all(len(r["response_digest"]) == 64 for r in rows)
    assert rows[0]["response_digest"] != hashlib.sha256(b"").hexdigest()
    problem, _n = await verify_rows(world)
    assert problem is None


async def test_a_full_log_fails_closed_and_recovers(world_factory: Callable[..., Awaitable[World]]) -> None:
    world = await world_factory(ledger__run_writer=False, ledger__max_backlog=100)
    ds, _lic, _app, token = await world.licensed(dataset_fields={"free_monthly_calls": 1000})
    for _ in range(101):
        code, _b, _r = await world.call(f"/data/{ds['id']}/echo", token)
        assert code == 200
    await asyncio.sleep(1.5)  # the next heartbeat reads the backlog
    arrived = len(world.upstream.arrived)
    code, body, resp = await world.call(f"/data/{ds['id']}/echo", token)
    assert code == 503
    assert body["code"] == "ledger-unavailable"
    assert resp.headers["Retry-After"]
    assert len(world.upstream.arrived) == arrived  # nothing forwarded
    assert await world.app[REDIS].xlen(LOG) == 101
    # A writer catches up; calls are served again.
    async with start_writer(world.settings, world.app[ENGINE], world.app[REDIS], owner="test-writer"):
        rows = await records_of(world, 101)
        assert len(rows) == 101
        await asyncio.sleep(1.5)
        code, _b, _r = await world.call(f"/data/{ds['id']}/echo", token)
        assert code == 200
        rows = await records_of(world, 102)
    # The refused call was never recorded (the log could take no record);
    # every served call was, once.
    assert len(rows) == 102
    assert len({r["call_id"] for r in rows}) == 102


def lost_call_skeleton(
    app: dict[str, Any],
    lic: dict[str, Any],
    ds: dict[str, Any],
    call_id: str,
    purpose: str,
    pool: str,
    rest: str,
    now: datetime,
    period: str,
) -> dict[str, Any]:
    """The opening fields of a call reserved by a replica that then died
    (request id ``lost-call``), for ``GET /data/{dataset}/{rest}``."""
    return {
        "call_id": call_id,
        "request_id": "lost-call",
        "started_at": now.isoformat().replace("+00:00", "Z"),
        "app_id": app["client_id"],
        "licensee_id": lic["licensee_id"],
        "licence_id": lic["id"],
        "dataset_id": ds["id"],
        "purpose": purpose,
        "method": "GET",
        "path": f"/data/{ds['id']}/{rest}",
        "query_digest": None,
        "pool": pool,
        "period": period,
        "client_address": "127.0.0.1",
        "token_id": "jti-lost",
        "terms_version": ds["terms_version"],
    }


async def test_a_dead_replicas_call_is_recorded_incomplete_and_released(
    world_factory: Callable[..., Awaitable[World]],
) -> None:
    world = await world_factory(ledger__replica_timeout_seconds=3)
    ds, lic, app, token = await world.licensed(licence_fields={"paid": {"prepaid_calls": 10}})
    code, _b, _r = await world.call(f"/data/{ds['id']}/echo", token)
    assert code == 200
    # A replica that is never heard from reserves a call and dies.
    now = datetime.now(UTC)
    period = period_of(now, zone(world.settings.billing.time_zone))
    skeleton = lost_call_skeleton(
        app,
        lic,
        ds,
        "0190f000-0000-7000-8000-000000000001",
        "industrial",
        "prepaid",
        "echo",
        now,
        period.name,
    )
    terms = Terms(
        licence_id=lic["id"],
        app_id=app["client_id"],
        dataset_id=ds["id"],
        purpose="industrial",
        free_limit=0,
        prepaid_calls=10,
        credit_limit_fen=None,
        per_call_e4=25000,
    )
    reservation = plan_reservation(
        terms,
        period,
        now,
        skeleton["call_id"],
        None,
        replica="replica-that-died",
        record=opening(skeleton),
    )
    outcome = await world.app[QUOTA].reserve(reservation)
    assert (outcome.status, outcome.cost) == (0, 1)
    redis = world.app[REDIS]
    prepaid = f"pdg:{{{lic['id']}}}:prepaid"
    assert int(await redis.get(prepaid) or 0) == 1  # the public-interest call drew on the free pool
    rows = await records_of(world, 2, within=15)
    lost = [r for r in rows if r["request_id"] == "lost-call"]
    assert len(lost) == 1
    assert lost[0]["outcome"] == "incomplete"
    assert lost[0]["terms_version"] == ds["terms_version"]
    assert lost[0]["charge_e4"] == 0
    assert lost[0]["status"] == 0
    # What was known when it was reserved is all in its record.
    for field in ("call_id", "app_id", "licence_id", "dataset_id", "path", "client_address", "token_id"):
        assert lost[0][field] == skeleton[field], field
    for _ in range(50):
        if await redis.hlen(f"pdg:{{{lic['id']}}}:inflight") == 0:
            break
        await asyncio.sleep(0.1)
    assert await redis.hlen(f"pdg:{{{lic['id']}}}:inflight") == 0
    assert int(await redis.get(prepaid) or 0) == 0  # released: never charged
    problem, _n = await verify_rows(world)
    assert problem is None


@pytest.mark.parametrize("answer", ["slow", "drip"])
async def test_a_call_outliving_its_heartbeat_is_handed_to_the_writer(world: World, answer: str) -> None:
    """A replica whose heartbeat lapsed while a call was in flight must not
    complete it (the writer may already take it for dead): the caller gets
    503 (``slow``: nothing sent yet) or a cut connection (``drip``: part of
    the body sent), and the writer records the call ``incomplete`` and
    releases it."""
    ds, lic, _app, token = await world.licensed()
    redis = world.app[REDIS]
    inflight = f"pdg:{{{lic['id']}}}:inflight"
    period = period_of(datetime.now(UTC), zone(world.settings.billing.time_zone))
    free = f"pdg:{{{lic['id']}}}:free:{ds['id']}:{period.name}"
    path = f"/data/{ds['id']}/slow?seconds=0.5" if answer == "slow" else f"/data/{ds['id']}/drip"
    call = asyncio.create_task(world.call(path, token))
    for _ in range(100):
        if await redis.hlen(inflight):
            break
        await asyncio.sleep(0.01)
    assert await redis.hlen(inflight) == 1
    assert int(await redis.get(free) or 0) == 1
    # What a heartbeat after a silence long enough to fail closed records.
    world.app[PRESENCE].epoch += 1
    if answer == "slow":
        code, body, _resp = await call
        assert code == 503, body
        assert body["code"] == "ledger-unavailable"
    else:
        world.upstream.drip_release.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await call
    rows = await records_of(world, 1, within=15)
    assert [(r["outcome"], r["charge_e4"]) for r in rows] == [("incomplete", 0)]
    for _ in range(100):
        if await redis.hlen(inflight) == 0:
            break
        await asyncio.sleep(0.1)
    assert await redis.hlen(inflight) == 0
    assert int(await redis.get(free) or 0) == 0, "released: never charged"
