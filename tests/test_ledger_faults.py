"""The call record under faults (DESIGN §5, §7), with real processes: a
gateway ``kill -9``-ed mid-load, a ledger writer killed and restarted again
and again, and the SQL database stopped while calls go on.

Each test runs ``pdg serve`` (and ``pdg worker``) as subprocesses on a private
Valkey and PostgreSQL (``tests.servers``), drives concurrent calls through a
real upstream (fast ``/svc/records`` and in-flight ``/svc/slow``), keeps every
response the client fully received (status and ``X-Call-Id``), injects the
fault, and then checks the ledger against what clients saw:

- every received call id has exactly one record, with the status received;
- no call id twice, ``seq`` exactly ``1..N``, the hash chain and signed
  checkpoints verify;
- the quota counters equal the served records, and no in-flight entry is left;
- calls reserved but never finished are recorded ``incomplete``, uncharged.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ledger.chain import Verifier
from ledger.log import LOG, WRITER_LOCK, Presence
from ledger.models import CallRow, CheckpointRow, LedgerKeyRow, LedgerStateRow
from ledger.record import hashed
from ledger.store import checkpoint_of
from metering.inflight import key as inflight_key
from tests.conftest import Upstream, credit_code, free_port
from tests.servers import (
    PdgProcess,
    PrivatePostgres,
    PrivateValkey,
    pdg_env,
    run_pdg,
)
from tests.test_processes import _admin_headers, _request, _wait_http

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), pytest.mark.xdist_group("heavy")]

#: Seconds of silence after which a replica is dead. Not the least allowed
#: (3): there a healthy replica goes stale at every heartbeat (see
#: ``test_a_healthy_replica_stays_fresh_at_the_shortest_replica_timeout``).
REPLICA_TIMEOUT = 5
#: Seconds a slow call spends upstream: long enough to be in flight at a kill.
SLOW_SECONDS = 2.5
#: A ``Load`` route prefix: the caller hangs up after the first chunk.
HANG_UP = "hangup:"
DATASET = "faults-ds"


# -- the deployment -------------------------------------------------------------


@dataclass
class Deployment:
    """``pdg`` processes on one set of settings, and a tenant to call with."""

    tmp: Path
    database_url: str
    redis_url: str
    upstream: Upstream
    port: int = field(default_factory=free_port)
    processes: list[PdgProcess] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    licence_id: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return pdg_env(
            PDG_DATA_DIR=str(self.tmp / "data"),
            PDG_DATABASE_URL=self.database_url,
            PDG_REDIS_URL=self.redis_url,
            PDG_PORT=str(self.port),
            PDG_LEDGER_REPLICA_TIMEOUT_SECONDS=str(REPLICA_TIMEOUT),
            PDG_LEDGER_CHECKPOINT_SECONDS="1",
            PDG_LOG_LEVEL="WARNING",
            **extra,
        )

    def gateway(self, **extra: str) -> PdgProcess:
        process = PdgProcess(["serve"], self.env(**extra), self.tmp / "gateway.log")
        self.processes.append(process)
        _wait_http(f"{self.base}/readyz", process.proc, seconds=60)
        return process

    def worker(self) -> PdgProcess:
        process = PdgProcess(["worker"], self.env(), self.tmp / "worker.log")
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.alive():
                process.kill()

    def logs(self) -> str:
        seen: set[Path] = set()
        text = ""
        for process in self.processes:
            if process.logfile not in seen:
                seen.add(process.logfile)
                text += f"=== {process.logfile.name}\n{process.tail(4000)}\n"
        return text

    async def provision(self, **dataset_fields: Any) -> None:
        """A dataset on the upstream (with ``dataset_fields``), a licensee
        with a licence for both purposes (free allowance and prepaid calls),
        an app, and a token per purpose."""
        admin = _admin_headers(self.env())
        status, body = _request(
            "POST",
            f"{self.base}/admin/v1/datasets",
            {
                "id": DATASET,
                "name": "Fault dataset",
                "provider": "test-provider",
                "upstream_url": self.upstream.url,
                "classification": 1,
                "open_class": "open",
                "free_monthly_calls": 1_000_000,
                "price": {"per_call_fen": "2.5", "per_record_fen": "0"},
                "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
                "burst": {"per_second": 100_000, "capacity": 100_000},
                **dataset_fields,
            },
            admin,
        )
        assert status == 201, body
        status, licensee = _request(
            "POST",
            f"{self.base}/admin/v1/licensees",
            {"name": "Faults Co", "credit_code": credit_code(), "contact": "ops@example.com"},
            admin,
        )
        assert status == 201, licensee
        status, licence = _request(
            "POST",
            f"{self.base}/admin/v1/licences",
            {
                "licensee_id": licensee["id"],
                "datasets": [DATASET],
                "max_classification": 2,
                "purposes": ["public-interest", "industrial"],
                "valid_from": "2020-01-01T00:00:00Z",
                "valid_until": "2099-01-01T00:00:00Z",
                "security_officer": "Officer Li",
                "paid": {"prepaid_calls": 1_000_000},
            },
            admin,
        )
        assert status == 201, licence
        self.licence_id = licence["id"]
        status, app = _request(
            "POST", f"{self.base}/admin/v1/apps", {"licensee_id": licensee["id"], "name": "faults"}, admin
        )
        assert status == 201, app
        basic = base64.b64encode(f"{app['client_id']}:{app['client_secret']}".encode()).decode()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for purpose in ("public-interest", "industrial"):
                form = {"grant_type": "client_credentials", "scope": f"purpose:{purpose} dataset:{DATASET}"}
                async with session.post(
                    f"{self.base}/oauth/token", data=form, headers={"Authorization": f"Basic {basic}"}
                ) as resp:
                    token = await resp.json(content_type=None)
                    assert resp.status == 200, token
                    self.tokens[purpose] = token["access_token"]


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path, database_url: str, redis_url: str, upstream: Upstream
) -> AsyncIterator[Deployment]:
    deploy = Deployment(tmp_path, database_url, redis_url, upstream)
    try:
        yield deploy
    except BaseException:
        print(deploy.logs())  # noqa: T201 - shown by pytest on failure
        raise
    finally:
        deploy.close()


# -- the load -------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A response the client read whole."""

    status: int
    call_id: str | None
    purpose: str
    slow: bool
    at: float
    #: The problem code of a refusal (``None`` when served).
    problem: str | None = None
    #: The upstream route called (``Load.routes``).
    route: str = ""


@dataclass
class Load:
    """Concurrent callers until :meth:`stop`; what they received in full."""

    deploy: Deployment
    concurrency: int = 16
    #: Every this-many-th caller calls the slow route.
    slow_every: int = 4
    #: Routes of the upstream the callers take in turn (caller ``i`` calls
    #: ``routes[i % len]``); empty: the slow route and ``records?n=3``.
    routes: tuple[str, ...] = ()
    received: list[Received] = field(default_factory=list)
    failed: int = 0
    #: Calls the callers hung up on mid-response (``hangup:`` routes).
    hung_up: int = 0
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency, force_close=False),
        )
        purposes = list(self.deploy.tokens)
        for i in range(self.concurrency):
            slow = i % self.slow_every == 0
            purpose = purposes[i % len(purposes)]
            route = self.routes[i % len(self.routes)] if self.routes else None
            self._tasks.append(asyncio.create_task(self._caller(purpose, slow, route)))

    async def _caller(self, purpose: str, slow: bool, chosen: str | None = None) -> None:
        assert self._session is not None
        route = chosen or (f"slow?seconds={SLOW_SECONDS}" if slow else "records?n=3")
        # "hangup:ROUTE": read the first chunk of the answer, then hang up.
        hang_up = route.startswith(HANG_UP)
        url = f"{self.deploy.base}/data/{DATASET}/{route.removeprefix(HANG_UP)}"
        headers = {"Authorization": f"Bearer {self.deploy.tokens[purpose]}"}
        while not self._stopping.is_set():
            if hang_up:
                await self._hang_up(url, headers)
                continue
            try:
                async with self._session.get(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=SLOW_SECONDS + 20)
                ) as resp:
                    body = await resp.read()
                    problem = None
                    if resp.status != 200:
                        with contextlib.suppress(ValueError, AttributeError):
                            problem = str(json.loads(body).get("code"))
                    self.received.append(
                        Received(
                            resp.status,
                            resp.headers.get("X-Call-Id"),
                            purpose,
                            slow,
                            time.monotonic(),
                            problem,
                            route,
                        )
                    )
            except (aiohttp.ClientError, TimeoutError):
                self.failed += 1
                await asyncio.sleep(0.05)

    async def _hang_up(self, url: str, headers: dict[str, str]) -> None:
        """A caller that leaves mid-response (its socket closed with data
        unread: a reset), on a connection of its own."""
        try:
            async with (
                aiohttp.ClientSession() as own,
                own.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=20)) as resp,
            ):
                await resp.content.readany()
                self.hung_up += 1
                resp.close()
        except (aiohttp.ClientError, TimeoutError):
            self.failed += 1
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stopping.set()
        try:
            async with asyncio.timeout(SLOW_SECONDS + 25):
                await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            if self._session is not None:
                await self._session.close()

    def served(self) -> int:
        return sum(1 for r in self.received if r.status == 200)


# -- reading the ledger ---------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


async def ledger_rows(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(select(CallRow.__table__).order_by(CallRow.seq))
        return [dict(row._mapping) for row in result]


async def settled(
    engine: AsyncEngine,
    client: aioredis.Redis,
    licence_id: str,
    load: Load,
    seconds: float,
    unrecorded: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Wait until the writer has moved the whole log (its stored position is
    the stream's newest entry), no call of the licence is in flight, and every
    call id the load received is in the ledger (but refusals with a problem
    in ``unrecorded``); the ledger's rows."""
    call_ids = {r.call_id for r in load.received if r.call_id and r.problem not in unrecorded}
    end = time.monotonic() + seconds
    state: Any = None
    newest: Any = None
    inflight = -1
    missing: set[str] = set(call_ids)
    while time.monotonic() < end:
        try:
            async with asyncio.timeout(5):
                async with engine.connect() as conn:
                    state = (await conn.execute(select(LedgerStateRow.__table__))).first()
                last = await client.xrevrange(LOG, count=1)
                newest = last[0][0] if last else None
                inflight = await client.hlen(inflight_key(licence_id))
                moved = state is not None and (
                    newest is None or _stream_id(newest) <= _stream_id(state.log_position)
                )
                if moved and inflight == 0:
                    rows = await ledger_rows(engine)
                    missing = call_ids - {row["call_id"] for row in rows}
                    if not missing:
                        return rows
        except (OSError, TimeoutError) as exc:  # the database may be coming back
            state = f"unreachable: {type(exc).__name__}"
        await asyncio.sleep(0.25)
    raise AssertionError(
        f"the ledger did not settle in {seconds} s: state {state}, newest log entry {newest}, "
        f"{inflight} call(s) in flight, {len(missing)} received call(s) not recorded: "
        f"{[r for r in load.received if r.call_id in missing][:10]}"
    )


async def invariant_holds(
    engine: AsyncEngine,
    client: aioredis.Redis,
    deploy: Deployment,
    load: Load,
    label: str,
    unrecorded: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The one check after every fault: the ledger settles, every response
    has its record, no reservation is left, the counters equal the records,
    and the chain verifies. The ledger's rows."""
    rows = await settled(engine, client, deploy.licence_id, load, 30, unrecorded)
    summary(label, load, rows)
    check_ledger(rows, load, unrecorded)
    await check_quota(client, deploy.licence_id, rows)
    await verify_chain(engine, deploy.env())
    return rows


def check_ledger(
    rows: list[dict[str, Any]], load: Load, unrecorded: tuple[str, ...] = ("ledger-unavailable",)
) -> dict[str, dict[str, Any]]:
    """What every fault test demands of the ledger and what clients saw.
    A refusal with a problem in ``unrecorded`` may have no record (or an
    ``incomplete`` one): it said the log could not be reached."""
    seqs = [row["seq"] for row in rows]
    assert seqs == list(range(1, len(rows) + 1)), "seq is not exactly 1..N"
    ids = collections.Counter(row["call_id"] for row in rows)
    twice = [call_id for call_id, n in ids.items() if n > 1]
    assert not twice, f"call ids recorded more than once: {twice[:5]}"
    by_id = {row["call_id"]: row for row in rows}
    assert load.received, "no response was received at all"
    for got in load.received:
        assert got.call_id, f"a data response without X-Call-Id: {got}"
        row = by_id.get(got.call_id)
        if got.problem in unrecorded:
            # Refused because no record could be taken: none is owed (and a
            # reserved one is ended by the writer, ``incomplete``).
            assert row is None or row["outcome"] == "incomplete", (got, row)
            continue
        assert row is not None, f"call {got.call_id} ({got.status}) was received but is not in the ledger"
        assert row["status"] == got.status, (got, row)
    for row in rows:
        if row["outcome"] != "served":
            assert row["charge_e4"] == 0, f"an unserved call is charged: {row}"
    return by_id


async def check_quota(client: aioredis.Redis, licence_id: str, rows: list[dict[str, Any]]) -> None:
    """The counters equal the served records: each served call counted once,
    every other reservation given back."""
    served = collections.Counter(
        (row["pool"], row["dataset_id"], row["period"])
        for row in rows
        if row["outcome"] == "served" and row["licence_id"] == licence_id
    )
    periods = {row["period"] for row in rows}
    prefix = f"pdg:{{{licence_id}}}"
    for period in periods:
        free = int(await client.get(f"{prefix}:free:{DATASET}:{period}") or 0)
        assert free == served[("free", DATASET, period)], f"free counter {free} for {period}"
        paid = int(await client.get(f"{prefix}:paidcalls:{DATASET}:{period}") or 0)
        assert paid == served[("prepaid", DATASET, period)], f"paid calls counter {paid} for {period}"
    prepaid = int(await client.get(f"{prefix}:prepaid") or 0)
    assert prepaid == sum(n for (pool, _, _), n in served.items() if pool == "prepaid"), (
        f"prepaid counter {prepaid}"
    )
    assert await client.hlen(inflight_key(licence_id)) == 0


async def verify_chain(engine: AsyncEngine, env: dict[str, str]) -> None:
    """Re-derive the hash chain and check the signed checkpoints; also with
    ``pdg audit verify`` once that command exists."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(CallRow.__table__).order_by(CallRow.seq))).all()
        cps = (await conn.execute(select(CheckpointRow.__table__).order_by(CheckpointRow.first_seq))).all()
        keys = (await conn.execute(select(LedgerKeyRow.__table__))).all()
        algorithm = (await conn.execute(select(LedgerStateRow.algorithm))).scalar_one()
    public: dict[str, ec.EllipticCurvePublicKey] = {}
    for key in keys:
        loaded = serialization.load_pem_public_key(key.public_pem.encode())
        assert isinstance(loaded, ec.EllipticCurvePublicKey)
        public[key.key_id] = loaded
    verifier = Verifier(algorithm, checkpoints=[checkpoint_of(cp) for cp in cps], public_keys=public)
    problem = None
    for row in rows:
        mapping = dict(row._mapping)
        problem = verifier.feed(hashed(mapping), bytes.fromhex(mapping["hash"]))
        if problem is not None:
            break
    else:
        problem = verifier.finish()
    assert problem is None, problem
    assert cps, "no signed checkpoint was written"
    if (await asyncio.to_thread(run_pdg, ["audit", "verify", "--help"], env)).returncode == 0:
        done = await asyncio.to_thread(run_pdg, ["audit", "verify", "--json"], env, 120)
        assert done.returncode == 0, done.stdout + done.stderr
        with contextlib.suppress(ValueError):
            report = json.loads(done.stdout)
            if isinstance(report, dict) and "records" in report:
                assert report["records"] == len(rows), report


def summary(name: str, load: Load, rows: list[dict[str, Any]]) -> None:
    """One line for ``pytest -s``: what the clients saw, what the ledger holds."""
    received = collections.Counter((r.status, r.problem) for r in load.received)
    outcomes = collections.Counter(row["outcome"] for row in rows)
    print(  # noqa: T201
        f"\n{name}: received {dict(received)}, {load.failed} failed; "
        f"ledger {len(rows)} records {dict(outcomes)}"
    )


def clean_logs(deploy: Deployment) -> None:
    assert "Traceback" not in deploy.logs(), deploy.logs()


def log_reachable_throughout(load: Load) -> None:
    """Redis (the log) never failed in these tests: no call may have been
    refused for want of it."""
    refused = [r for r in load.received if r.problem == "ledger-unavailable"]
    assert not refused, (
        f"{len(refused)} of {len(load.received)} calls got 503 ledger-unavailable "
        f"while the log was reachable: {refused[:3]}"
    )


# -- 1. the gateway killed mid-load ---------------------------------------------


async def test_gateway_killed_mid_load_loses_nothing_it_acknowledged(
    tmp_path: Path, valkey: PrivateValkey, database_url: str, upstream: Upstream
) -> None:
    async with deployment(tmp_path, database_url, valkey.url(), upstream) as deploy:
        gateway = deploy.gateway()
        await deploy.provision()
        load = Load(deploy, concurrency=16, slow_every=4)
        load.start()
        # Kill once the first slow calls were served and the next ones are
        # upstream (reserved, not finished).
        end = time.monotonic() + SLOW_SECONDS + 15
        while not any(r.slow and r.status == 200 for r in load.received):
            assert time.monotonic() < end, "no slow call served: " + str(
                collections.Counter((r.slow, r.status, r.problem) for r in load.received)
            )
            await asyncio.sleep(0.05)
        await asyncio.sleep(SLOW_SECONDS / 2)
        assert load.served() > 0, f"nothing served before the kill; {load.failed} failures"
        gateway.kill()
        await asyncio.sleep(0.3)
        await load.stop()
        client = aioredis.Redis.from_url(deploy.redis_url)
        engine = create_async_engine(deploy.database_url)
        try:
            left = {_text(k) for k in await client.hkeys(inflight_key(deploy.licence_id))}
            assert left, "no call was in flight at the kill"
            # A writer of its own ends the dead gateway's calls: after the
            # dead writer's lock lapses and the replica is silent long enough.
            worker = deploy.worker()
            rows = await settled(engine, client, deploy.licence_id, load, 45)
            by_id = check_ledger(rows, load)
            summary("gateway kill", load, rows)
            assert left <= set(by_id), "a call reserved at the kill has no record"
            await check_quota(client, deploy.licence_id, rows)
            ended = [row for row in rows if row["outcome"] == "incomplete"]
            assert ended, "no call was recorded incomplete"
            slow_in_flight = [row for row in ended if row["path"].endswith("/slow")]
            assert slow_in_flight, "the slow calls upstream at the kill are not recorded incomplete"
            for row in ended:
                assert row["status"] == 0 or row["problem"], row
                assert row["charge_e4"] == 0
            received_ids = {r.call_id for r in load.received if r.problem != "ledger-unavailable"}
            assert not received_ids & {row["call_id"] for row in ended}, "a received call is incomplete"
            assert sum(1 for row in by_id.values() if row["outcome"] == "served") >= load.served()
            await verify_chain(engine, deploy.env())
            assert worker.stop() == 0
        finally:
            await client.aclose()
            await engine.dispose()
        clean_logs(deploy)
        log_reachable_throughout(load)


# -- 2. the writer killed and restarted -----------------------------------------

WRITER_KILLS = 3


async def _next_seq(engine: AsyncEngine) -> int:
    async with asyncio.timeout(5), engine.connect() as conn:
        value = (await conn.execute(select(LedgerStateRow.next_seq))).scalar()
        return int(value or 1)


async def _wait_progress(engine: AsyncEngine, worker: PdgProcess, beyond: int, seconds: float) -> int:
    """Until the ledger moved past ``beyond`` (the worker holds the lock and writes)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert worker.alive(), worker.tail()
        with contextlib.suppress(Exception):
            now = await _next_seq(engine)
            if now > beyond:
                return now
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger did not move past seq {beyond} within {seconds} s")


async def test_writer_killed_and_restarted_writes_every_record_once(
    tmp_path: Path, valkey: PrivateValkey, database_url: str, upstream: Upstream
) -> None:
    async with deployment(tmp_path, database_url, valkey.url(), upstream) as deploy:
        gateway = deploy.gateway(PDG_LEDGER_RUN_WRITER="false")
        await deploy.provision()
        client = aioredis.Redis.from_url(deploy.redis_url)
        engine = create_async_engine(deploy.database_url)
        try:
            worker = deploy.worker()
            load = Load(deploy, concurrency=24, slow_every=8)
            load.start()
            rng = random.Random(20240601)
            seen = await _next_seq(engine)
            for kill in range(WRITER_KILLS):
                # The lock of a killed writer lapses on its own (10 s); the
                # first kill waits that out, the others end it at once, as
                # its lapse would, to keep the test short.
                seen = await _wait_progress(engine, worker, seen, 30)
                await asyncio.sleep(rng.uniform(0.02, 0.6))
                worker.kill()
                if kill > 0:
                    await client.delete(WRITER_LOCK)
                # A commit sent just before the kill may still land.
                await asyncio.sleep(0.3)
                seen = await _next_seq(engine)
                worker = deploy.worker()
            seen = await _wait_progress(engine, worker, seen, 30)
            await asyncio.sleep(0.5)
            await load.stop()
            assert gateway.alive(), gateway.tail()
            rows = await settled(engine, client, deploy.licence_id, load, 30)
            summary("writer kills", load, rows)
            check_ledger(rows, load)
            assert {r.status for r in load.received} == {200}, collections.Counter(
                r.status for r in load.received
            )
            # The gateway is alive: every call it received was finished by it.
            assert len(rows) >= len(load.received)
            await check_quota(client, deploy.licence_id, rows)
            await verify_chain(engine, deploy.env())
            assert worker.stop() == 0
            assert gateway.stop() == 0
        finally:
            await client.aclose()
            await engine.dispose()
        clean_logs(deploy)
        log_reachable_throughout(load)


# -- 3. PostgreSQL stopped and started during load ------------------------------

OUTAGE_SECONDS = 4.0


async def test_database_outage_keeps_records_in_the_log_until_it_returns(
    tmp_path: Path, valkey: PrivateValkey, private_pg: PrivatePostgres, upstream: Upstream
) -> None:
    async with deployment(tmp_path, private_pg.url(), valkey.url(), upstream) as deploy:
        gateway = deploy.gateway()
        await deploy.provision()
        client = aioredis.Redis.from_url(deploy.redis_url)
        engine = create_async_engine(deploy.database_url)
        try:
            load = Load(deploy, concurrency=16, slow_every=8)
            load.start()
            await asyncio.sleep(1.5)
            await asyncio.to_thread(private_pg.stop, "immediate")
            down_at = time.monotonic()
            backlog = 0
            while time.monotonic() - down_at < OUTAGE_SECONDS:
                await asyncio.sleep(0.2)
                backlog = max(backlog, int(await client.xlen(LOG)))
            up_at = time.monotonic()
            await asyncio.to_thread(private_pg.start)
            await asyncio.sleep(1.5)
            await load.stop()
            assert gateway.alive(), gateway.tail()
            assert backlog > 0, "no record waited in the log while the database was down"
            rows = await settled(engine, client, deploy.licence_id, load, 45)
            summary("database outage", load, rows)
            check_ledger(rows, load)
            await check_quota(client, deploy.licence_id, rows)
            await verify_chain(engine, deploy.env())
            # Served throughout: the data path needs Redis, not SQL, and
            # records wait in the log (DESIGN §7 fails closed on the log, and
            # on a backlog past ledger.max_backlog, not on SQL being down).
            during = [r for r in load.received if down_at + 0.5 < r.at < up_at]
            assert during, f"no response during the outage; {load.failed} calls failed"
            statuses = collections.Counter((r.status, r.problem) for r in during)
            assert set(statuses) == {(200, None)}, (
                f"calls during the {OUTAGE_SECONDS:g} s database outage were not all served: {statuses}"
            )
            assert gateway.stop() == 0
        finally:
            await client.aclose()
            await engine.dispose()
        clean_logs(deploy)
        log_reachable_throughout(load)


# -- 4. a healthy replica stays fresh -------------------------------------------


async def test_a_healthy_replica_stays_fresh_at_the_shortest_replica_timeout(valkey: PrivateValkey) -> None:
    """At ``ledger.replica_timeout_seconds = 3`` (the least allowed) a replica
    whose heartbeats all succeed must neither refuse calls (503
    ``ledger-unavailable``) nor invalidate the calls it has in flight."""
    client = aioredis.Redis.from_url(valkey.url())
    presence = Presence(client, "fresh-replica", timeout=3.0, max_backlog=100_000)
    await presence.start()
    try:
        epoch = presence.check()
        stale, samples = 0, 0
        end = time.monotonic() + 3.5
        while time.monotonic() < end:
            samples += 1
            stale += not presence.fresh
            await asyncio.sleep(0.002)
        assert stale == 0, f"not fresh in {stale} of {samples} samples though every heartbeat succeeded"
        assert presence.still_valid(epoch), (
            f"a call begun 3.5 s ago may not be completed: epoch {epoch} became {presence.epoch}"
        )
    finally:
        await presence.stop()
        await client.aclose()
