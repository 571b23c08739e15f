"""Ledger benchmark: how fast the writer moves the log into PostgreSQL, and how fast
the stored ledger re-verifies.

    .venv/bin/python -m bench.call_record              # 200,000 records x 3 runs (~1.5-2 min)
    .venv/bin/python bench/call_record.py -n 20000 -r 1   # smoke check
    .venv/bin/python -m bench.call_record --json       # the report as JSON on stdout
    .venv/bin/python -m bench.call_record --profile    # also a cProfile of writer.drain()

Needs a local PostgreSQL and Redis (not the embedded defaults). Each run (``--runs``):

1. creates a fresh PostgreSQL database ``pdg_bench_<hex>`` (``CREATE DATABASE`` through
   asyncpg on ``--pg-admin-url``, default ``postgresql://postgres@127.0.0.1:5432/postgres``)
   and migrates it with ``storage.migrate.upgrade``; empties the Redis database named by
   ``--redis-url`` (default ``redis://127.0.0.1:6379/14``, which must name its database:
   ``FLUSHDB`` on that database only, before and after; no other is touched);
2. fills the log stream ``pdg:{ledger}:log`` with ``-n`` realistic call records (the
   shape ``gateway.call`` writes: UUIDv7 call ids, ~93 % served, digests...;
   ~770 bytes each), ``ledger.record.to_log`` bytes in field ``r``, pipelined ``XADD``
   -- not timed;
3. **write**: builds the deployment's writer (``ledger.writer.build_writer``, with
   ``--batch``, ``--checkpoint-records``, ``--algorithm`` as its settings) and times
   ``writer.drain()`` alone (the chain state is loaded first). Then checks that every
   record landed once and in order, and counts the checkpoints and what is left in the
   stream (it should be trimmed);
4. **verify**: times a full re-derivation of that ledger with ``ledger.audit.verify``.
   Then, to show where that time goes, its two halves apart, in one process: reading
   alone (verify's own scan, ``ledger.segment``: its query and planner settings, each
   row made back into its record, no hashing) and hashing alone (``Verifier.feed_many``
   over the same records already in memory; the garbage collector off, as in verify);
5. drops the database.

Then one more run, not counted, times each phase of the writer's batches with timers
patched in (``--no-breakdown`` skips it), and with ``--profile`` one more under cProfile
(the top functions are printed, the ``.prof`` file kept beside the JSON report).

The report gives the median (and min/max) records/s of each figure over the runs against
the targets (write >= 20,000/s, verify >= 200,000/s); the CPU used meanwhile by this
process, by the benchmark database's PostgreSQL backends (and by every postgres process,
which includes other sessions' work), and by Redis; how busy the machine was before each
run (it waits up to ``--quiet-wait`` seconds for it to settle: other sessions may share
it); and notes on anything odd seen (records left in the log, checkpoints wider than
configured). A rich table, and the JSON in ``bench/results/ledger.json`` (``--json``
prints it on stdout instead of the table).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a file, bench/ is sys.path[0]: the project root takes its place.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import asyncpg  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import Table as SQLTable  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine  # noqa: E402

import ledger.writer as ledger_writer  # noqa: E402
from bench.proxy import core_busy, core_times, wait_quiet  # noqa: E402
from config.settings import Settings, load_settings  # noqa: E402
from ledger import audit, segment  # noqa: E402
from ledger.chain import ChainWriter, Checkpoint, Verifier  # noqa: E402
from ledger.log import LOG  # noqa: E402
from ledger.models import CallRow, CheckpointRow  # noqa: E402
from ledger.record import to_log  # noqa: E402
from ledger.store import checkpoint_of  # noqa: E402
from ledger.writer import LedgerWriter, build_writer  # noqa: E402
from licensing.ids import uuid7  # noqa: E402
from storage.db import create_engine  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.redis import RedisClient, connect  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "ledger.json"
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
WRITE_TARGET = 20_000
VERIFY_TARGET = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CALLS: SQLTable = CallRow.__table__  # type: ignore[assignment]
_CHECKPOINTS: SQLTable = CheckpointRow.__table__  # type: ignore[assignment]


class BenchError(Exception):
    """The benchmark could not run, or what it measured is wrong."""


# --------------------------------------------------------------------------- records


def _uuid7(ms: int, rng: random.Random) -> str:
    return uuid7(ms, rng.getrandbits(80))


DATASETS = (
    "weather-hourly",
    "air-quality",
    "traffic-counts",
    "company-register",
    "land-parcels",
    "water-levels",
    "transit-gtfs",
    "energy-prices",
)
#: Each dataset's price (terms version 1): per call and per record, in
#: 1/10000 fen, taken in turn; a served paid call is charged by it, so a
#: reconciliation that re-prices every billed call finds the charges right.
PRICES = ((10_000, 0), (15_000, 0), (2_500, 50), (10_000, 125))
#: The most records a generated call returns (the datasets' max_records_per_call).
MAX_RECORDS = 200


def price_of(dataset: str) -> tuple[int, int]:
    return PRICES[DATASETS.index(dataset) % len(PRICES)]


REFUSALS = (
    (429, "rate-limited"),
    (402, "quota-exhausted"),
    (403, "dataset-not-licensed"),
    (404, "not-found"),
)


def make_log(n: int, seed: int = 20260301) -> list[bytes]:
    """``n`` call records as a gateway appends them (``to_log`` bytes), in time order.

    The mix: ~93 % served (200, a response digest, prepaid/credit/free pool and a
    charge), ~4 % refused by the gateway, ~2 % upstream failures, ~1 % incomplete;
    ~70 % with a query digest; a fifth with a caller's ``X-Request-Id``.
    """
    rng = random.Random(seed)

    def hexd() -> str:
        return f"{rng.getrandbits(256):064x}"

    licensees = [f"licensee-{rng.getrandbits(48):012x}" for _ in range(20)]
    licences = [(f"licence-{rng.getrandbits(48):012x}", rng.choice(licensees)) for _ in range(40)]
    apps = [(f"app-{rng.getrandbits(48):012x}", rng.choice(licences)) for _ in range(60)]
    tokens = [f"tok-{rng.getrandbits(48):012x}" for _ in range(500)]
    clients = [f"203.0.113.{i}" for i in range(1, 200)] + [f"2001:db8::{i:x}" for i in range(1, 50)]
    t = datetime(2026, 3, 9, 8, 0, 0, tzinfo=UTC)
    out: list[bytes] = []
    for _ in range(n):
        t += timedelta(microseconds=rng.randint(50, 4000))
        latency = rng.randint(1_500, 250_000)
        app_id, (licence_id, licensee_id) = rng.choice(apps)
        dataset = rng.choice(DATASETS)
        path = f"/data/{dataset}/{rng.choice(('items', 'stations', 'series', 'search'))}"
        if rng.random() < 0.6:
            path += f"/{rng.randint(1, 999_999)}"
        started = t - timedelta(microseconds=latency)
        call_id = _uuid7(int(started.timestamp() * 1000), rng)
        roll = rng.random()
        record: dict[str, Any] = {
            "call_id": call_id,
            "request_id": call_id if rng.random() < 0.8 else f"req-{rng.getrandbits(64):016x}",
            "started_at": started,
            "app_id": app_id,
            "licensee_id": licensee_id,
            "licence_id": licence_id,
            "dataset_id": dataset,
            "purpose": "industrial" if rng.random() < 0.6 else "public-interest",
            "method": "GET" if rng.random() < 0.95 else "POST",
            "path": path,
            "query_digest": hexd() if rng.random() < 0.7 else None,
            "pool": None,
            "period": started.strftime("%Y-%m"),
            "client_address": rng.choice(clients),
            "token_id": rng.choice(tokens),
            "terms_version": 1,
            "upstream_target": rng.choice(("a", "b")),
            "time": t,
            "latency_us": latency,
        }
        if roll < 0.93:
            pool = rng.choice(("prepaid", "prepaid", "credit", "free"))
            records = rng.randint(1, MAX_RECORDS)
            per_call, per_record = price_of(dataset)
            record.update(
                status=200,
                upstream_status=200,
                outcome="served",
                problem=None,
                records=records,
                bytes=records * rng.randint(80, 400),
                pool=pool,
                charge_e4=0 if pool == "free" else per_call + per_record * records,
                response_digest=hexd(),
            )
        elif roll < 0.97:
            status, problem = rng.choice(REFUSALS)
            record.update(
                status=status,
                upstream_status=None,
                outcome="refused",
                problem=problem,
                upstream_target=None,
                records=0,
                bytes=rng.randint(200, 400),
                charge_e4=0,
                response_digest=hexd(),
            )
        elif roll < 0.99:
            record.update(
                status=502,
                upstream_status=rng.choice((500, 503, None)),
                outcome="upstream-failure",
                problem="upstream-unavailable",
                records=0,
                bytes=rng.randint(200, 400),
                pool=rng.choice(("prepaid", "free")),
                charge_e4=0,
                response_digest=hexd(),
            )
        else:
            record.update(
                status=0,
                upstream_status=None,
                outcome="incomplete",
                problem=None,
                records=0,
                bytes=0,
                pool="prepaid",
                charge_e4=0,
                response_digest=None,
            )
        out.append(to_log(record))
    return out


# --------------------------------------------------------------------------- machine


def _cpu_seconds(stat: str) -> float:
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_cpu(names: tuple[str, ...], pids: frozenset[int] = frozenset()) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the processes of each command name
    (every such process on the machine), and by ``pids`` together (key ``"pids"``)."""
    totals = dict.fromkeys((*names, "pids"), 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = (entry / "stat").read_text()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            if comm in totals:
                totals[comm] += _cpu_seconds(raw)
            if int(entry.name) in pids:
                totals["pids"] += _cpu_seconds(raw)
    return totals


async def database_backends(engine: AsyncEngine) -> frozenset[int]:
    """The server processes of the engine's pooled connections to its database."""
    async with engine.connect() as conn:
        query = text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return frozenset((await conn.execute(query)).scalars())


@dataclass
class CpuWindow:
    """CPU use over a timed section: this process, PostgreSQL (the benchmark
    database's backends, and every postgres process on the machine, which includes
    other sessions' and the server's own), Redis (every redis-server), each core."""

    pids: frozenset[int] = frozenset()
    started: float = 0.0
    own0: float = 0.0
    procs0: dict[str, float] | None = None
    cores0: dict[int, tuple[int, int]] | None = None

    NAMES = ("postgres", "redis-server")

    def start(self) -> None:
        self.procs0 = process_cpu(self.NAMES, self.pids)
        self.cores0 = core_times()
        self.own0 = time.process_time()
        self.started = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        own = time.process_time() - self.own0
        procs = process_cpu(self.NAMES, self.pids)
        cores = core_busy(self.cores0 or {}, core_times())

        def pct(seconds: float) -> float:
            return round(100.0 * seconds / elapsed, 1) if elapsed > 0 else 0.0

        assert self.procs0 is not None
        return {
            "elapsed_s": round(elapsed, 3),
            "bench_cpu_pct": pct(own),
            "postgres_backend_cpu_pct": pct(procs["pids"] - self.procs0["pids"]),
            "postgres_all_cpu_pct": pct(procs["postgres"] - self.procs0["postgres"]),
            "redis_cpu_pct": pct(procs["redis-server"] - self.procs0["redis-server"]),
            "cores_busy_pct": cores,
        }


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
    }
    with contextlib.suppress(OSError):
        facts["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return facts


def source_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        facts["commit"] = done.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "ledger"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        facts["ledger_uncommitted"] = bool(dirty.stdout.strip())
    return facts


# --------------------------------------------------------------------------- backends


def redis_db(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    if not path.isdigit():
        raise BenchError(f"--redis-url must name its database explicitly (e.g. {DEFAULT_REDIS}), got {url}")
    return int(path)


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new PostgreSQL database (an SQLAlchemy asyncpg URL), dropped afterwards."""
    name = f"pdg_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    parts = urlsplit(admin_url)
    try:
        yield f"postgresql+asyncpg://{parts.netloc}/{name}"
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def fill_log(client: RedisClient, entries: list[bytes], chunk: int = 5000) -> None:
    for start in range(0, len(entries), chunk):
        pipe = client.pipeline(transaction=False)
        for data in entries[start : start + chunk]:
            pipe.xadd(LOG, {"r": data})
        await pipe.execute()


def bench_settings(opts: Options, data_dir: Path, database_url: str) -> Settings:
    overrides: dict[str, Any] = {
        "data_dir": str(data_dir),
        "storage.database_url": database_url,
        "storage.redis_url": opts.redis_url,
        "ledger.hash_algorithm": opts.algorithm,
        "ledger.writer_batch": opts.batch,
        "ledger.checkpoint_records": opts.checkpoint_records,
    }
    # Only the overrides: inherited PDG_* variables and $PDG_CONFIG are ignored.
    return load_settings(env={}, overrides=overrides)


# --------------------------------------------------------------------------- verifying


async def _checkpoints_and_keys(
    engine: AsyncEngine, writer: LedgerWriter
) -> tuple[list[Any], dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.first_seq))
        checkpoints = [checkpoint_of(r) for r in rows]
    keys = {writer.store.key.kid: writer.store.private_key.public_key()}
    return checkpoints, keys


Verified = tuple[int, Any, dict[str, Any]]


async def verify_audit(engine: AsyncEngine, writer: LedgerWriter) -> Verified:
    """``ledger.audit.verify(engine, public_keys)``, trusting the writer's key."""
    _, keys = await _checkpoints_and_keys(engine, writer)
    report = await audit.verify(engine, keys)
    problem = None if report.ok else (report.problem or report)
    return report.records, problem, {"own_seconds": round(report.seconds, 3), "checked": report.checkpoints}


async def fetch_raw(engine: AsyncEngine) -> AsyncIterator[list[Any]]:
    """Chunks of rows as ``pdg audit verify`` reads them on PostgreSQL: its query,
    its planner settings, its chunk size (``ledger.segment``)."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        pg: Any = raw.driver_connection
        async with pg.transaction(isolation="repeatable_read", readonly=True):
            await pg.execute(segment._SETTINGS)
            cursor = await pg.cursor(segment._SCAN, 1, segment.NO_END)
            while rows := await cursor.fetch(segment.CHUNK):
                yield rows


async def read_only(engine: AsyncEngine) -> Verified:
    """The reading half of a verify: the scan, and each row made back into its
    record and stored hash as verify does it, no hashing."""
    n = 0
    with segment.no_gc():
        async for rows in fetch_raw(engine):
            for _ in segment._records(rows):
                n += 1
    return n, None, {}


def verify_in_memory(
    rows: list[tuple[dict[str, Any], bytes]], checkpoints: list[Any], keys: Any, algorithm: str
) -> Any:
    """The hashing half: ``Verifier`` over rows already in memory."""
    verifier = Verifier(algorithm, checkpoints=checkpoints, public_keys=keys)
    with segment.no_gc():
        problem = verifier.feed_many(rows)
    return problem or verifier.finish()


# --------------------------------------------------------------------------- phases


class Phases:
    """Wall time of each part of the writer's batches (patched in for one run only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def _swap(self, owner: Any, name: str, new: Any) -> None:
        """Replace ``owner.name`` (a module's, a class's or an instance's) until :meth:`undo`."""
        own = vars(owner)
        if name in own:
            old = own[name]
            self._undo.append(lambda: setattr(owner, name, old))
        else:  # an instance using its class's method
            self._undo.append(lambda: delattr(owner, name))
        setattr(owner, name, new)

    def wrap_async(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        async def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - t0
                calls[label] += 1

        self._swap(owner, name, timed_call)

    def wrap_sync(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - t0
                calls[label] += 1

        self._swap(owner, name, timed_call)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def instrument(writer: LedgerWriter) -> Phases:
    """Time the parts of ``LedgerWriter.step`` / ``LedgerStore._append``; what is left
    of the total is SQLAlchemy's transaction (begin, state UPDATE, commit) and the loop."""
    phases = Phases()
    store = writer.store
    phases.wrap_async(writer.client, "xread", "redis XREAD")
    phases.wrap_async(writer.client, "xtrim", "redis XTRIM")
    phases.wrap_sync(ledger_writer, "from_log", "parse log entries (from_log)")
    phases.wrap_async(store, "_unseen", "dedup query (call_id IN ...)")
    phases.wrap_sync(ChainWriter, "append", "chain records (canonical + 2 hashes)")
    phases.wrap_sync(ChainWriter, "checkpoint", "Merkle root of checkpoints")
    phases.wrap_async(asyncpg.connection.Connection, "copy_records_to_table", "COPY to PostgreSQL (asyncpg)")
    # _insert = building the row tuples (the columns' bind processors) + the COPY.
    phases.wrap_async(store, "_insert", "_insert total")
    phases.wrap_sync(Checkpoint, "sign", "sign checkpoints (ECDSA)")
    return phases


# --------------------------------------------------------------------------- one run


@dataclass
class Options:
    records: int
    runs: int
    batch: int
    checkpoint_records: int
    algorithm: str
    pg_admin_url: str
    redis_url: str
    breakdown: bool
    profile: bool
    breakdown_records: int
    loop: str
    quiet_wait: float
    output: Path
    json: bool


async def _check_ledger(engine: AsyncEngine, n: int, client: RedisClient) -> dict[str, int]:
    """Every record landed once, in order (or raise); the checkpoints written, how
    many records the largest covers, and the entries still in the log (trimming)."""
    async with engine.connect() as conn:
        query = select(func.count(), func.min(_CALLS.c.seq), func.max(_CALLS.c.seq))
        count, lo, hi = (await conn.execute(query)).one()
        distinct = await conn.scalar(select(func.count(func.distinct(_CALLS.c.call_id))))
        span = _CHECKPOINTS.c.last_seq - _CHECKPOINTS.c.first_seq + 1
        cps, widest = (await conn.execute(select(func.count(), func.max(span)))).one()
    left = await client.xlen(LOG)
    if (count, lo, hi, distinct) != (n, 1, n, n):
        raise BenchError(f"the ledger holds {count} rows (seq {lo}..{hi}, {distinct} call ids); expected {n}")
    return {"checkpoints": int(cps or 0), "widest_checkpoint": int(widest or 0), "log_left": int(left)}


@contextlib.asynccontextmanager
async def ledger_world(
    opts: Options, entries: list[bytes], tmp: Path
) -> AsyncIterator[tuple[Settings, AsyncEngine, RedisClient, LedgerWriter]]:
    """A fresh database, a clean Redis database holding ``entries`` in the log, a writer."""
    async with fresh_database(opts.pg_admin_url) as url:
        engine = create_engine(url)
        client = connect(opts.redis_url)
        try:
            await upgrade(engine)
            await client.flushdb()
            await fill_log(client, entries)
            if await client.xlen(LOG) != len(entries):
                raise BenchError("the log does not hold every record written to it")
            settings = bench_settings(opts, tmp, url)
            writer = build_writer(settings, engine, client, owner=f"bench-{secrets.token_hex(4)}")
            await writer.store.load()
            yield settings, engine, client, writer
        finally:
            with contextlib.suppress(Exception):
                await client.flushdb()
            await client.aclose()
            await engine.dispose()


async def timed(
    label: str, work: Callable[[], Awaitable[Verified]], n: int, pids: frozenset[int]
) -> dict[str, Any]:
    window = CpuWindow(pids)
    window.start()
    count, problem, extra = await work()
    figures = window.stop()
    if problem is not None:
        raise BenchError(f"{label}: the ledger did not verify: {problem}")
    if count != n:
        raise BenchError(f"{label}: went through {count} records, expected {n}")
    figures["records_per_s"] = round(n / figures["elapsed_s"]) if figures["elapsed_s"] else 0
    figures.update(extra)
    return figures


async def one_run(
    opts: Options, entries: list[bytes], tmp: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    n = len(entries)
    quiet, busy_before = wait_quiet(opts.quiet_wait)
    result: dict[str, Any] = {"machine_busy_before_pct": busy_before, "quiet_before": quiet}
    async with ledger_world(opts, entries, tmp) as (settings, engine, client, writer):
        pids = await database_backends(engine)
        window = CpuWindow(pids)
        window.start()
        moved = await writer.drain()
        write = window.stop()
        if moved != n:
            raise BenchError(f"drain() moved {moved} log entries, expected {n}")
        write["records_per_s"] = round(n / write["elapsed_s"])
        write.update(await _check_ledger(engine, n, client))
        result["write"] = write
        say(
            f"write   {write['records_per_s']:>9,} rec/s  ({write['elapsed_s']:.2f} s; CPU: bench "
            f"{write['bench_cpu_pct']:.0f} %, postgres {write['postgres_backend_cpu_pct']:.0f} % "
            f"(all postgres {write['postgres_all_cpu_pct']:.0f} %), redis {write['redis_cpu_pct']:.0f} %; "
            f"{write['checkpoints']} checkpoints; {write['log_left']} entries left in the log)"
        )

        algorithm = settings.ledger.hash_algorithm
        result["verify"] = await timed("ledger.audit.verify", lambda: verify_audit(engine, writer), n, pids)
        result["verify"]["path"] = "ledger.audit.verify"
        result["read_only"] = await timed("reading rows", lambda: read_only(engine), n, pids)

        rows = [pair async for b in fetch_raw(engine) for pair in segment._records(b)]
        checkpoints, keys = await _checkpoints_and_keys(engine, writer)
        t0 = time.perf_counter()
        problem = verify_in_memory(rows, checkpoints, keys, algorithm)
        elapsed = time.perf_counter() - t0
        del rows
        if problem is not None:
            raise BenchError(f"Verifier (in memory): {problem}")
        result["verifier_only"] = {"elapsed_s": round(elapsed, 3), "records_per_s": round(n / elapsed)}
        v, ro, vo = result["verify"], result["read_only"], result["verifier_only"]
        say(
            f"verify  {v['records_per_s']:>9,} rec/s  ({v['path'].split(' ')[0]}; bench CPU "
            f"{v['bench_cpu_pct']:.0f} %, postgres {v['postgres_backend_cpu_pct']:.0f} %); "
            f"reading rows alone {ro['records_per_s']:,}; Verifier alone {vo['records_per_s']:,}"
        )
    return result


async def diagnostic_run(
    opts: Options, entries: list[bytes], tmp: Path, profile_to: Path | None
) -> dict[str, Any]:
    """One uncounted run: the time of each phase, or with ``profile_to`` a cProfile."""
    n = len(entries)
    wait_quiet(opts.quiet_wait)
    async with ledger_world(opts, entries, tmp) as (_settings, _engine, _client, writer):
        profiler = cProfile.Profile() if profile_to is not None else None
        # Timers or the profiler, not both: each distorts what the other measures.
        phases = instrument(writer) if profiler is None else Phases()
        t0 = time.perf_counter()
        try:
            if profiler is not None:
                profiler.enable()
            await writer.drain()
        finally:
            if profiler is not None:
                profiler.disable()
            total = time.perf_counter() - t0
            phases.undo()
    out: dict[str, Any] = {"records": n, "elapsed_s": round(total, 3), "records_per_s": round(n / total)}
    if profiler is not None and profile_to is not None:
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(profile_to))
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile_file"] = str(profile_to)
        out["profile_top_tottime"] = buf.getvalue()
        return out
    insert_total = phases.seconds.pop("_insert total", 0.0)
    phases.calls.pop("_insert total", None)
    copy_wire = phases.seconds.get("COPY to PostgreSQL (asyncpg)", 0.0)
    phases.seconds["build COPY rows (bind processors + tuples)"] = max(0.0, insert_total - copy_wire)
    phases.calls["build COPY rows (bind processors + tuples)"] = phases.calls.get(
        "COPY to PostgreSQL (asyncpg)", 0
    )
    accounted = sum(phases.seconds.values())
    phases.seconds["the rest (SQLAlchemy begin/UPDATE/commit, loop)"] = max(0.0, total - accounted)
    out["phases"] = {
        label: {
            "seconds": round(s, 3),
            "pct": round(100.0 * s / total, 1),
            "us_per_record": round(1e6 * s / n, 2),
            "calls": phases.calls.get(label, 0),
        }
        for label, s in sorted(phases.seconds.items(), key=lambda kv: -kv[1])
    }
    out["instrumentation_note"] = (
        "wall time with timers patched in (a few % slower than the measured runs); "
        "'build COPY rows' is LedgerStore._insert less the COPY itself"
    )
    return out


# --------------------------------------------------------------------------- report


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values)),
        "min": round(min(values)),
        "max": round(max(values)),
        "runs": [round(v) for v in values],
    }


def median_of(runs: list[dict[str, Any]], section: str, key: str) -> float:
    return round(float(statistics.median(r[section][key] for r in runs)), 1)


async def bench(opts: Options, say: Callable[[str], None]) -> dict[str, Any]:
    t_gen = time.perf_counter()
    entries = make_log(opts.records)
    mean_size = sum(map(len, entries)) / len(entries)
    say(
        f"{len(entries):,} records generated ({mean_size:.0f} bytes each in the log) "
        f"in {time.perf_counter() - t_gen:.1f} s"
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pdg-bench-ledger-") as tmp:
        for i in range(opts.runs):
            say(f"run {i + 1}/{opts.runs}")
            runs.append(await one_run(opts, entries, Path(tmp), lambda s: say("  " + s)))
        diagnostic = profile = None
        m = min(opts.records, opts.breakdown_records)
        if opts.breakdown:
            say(f"phase timing run ({m:,} records; not counted)")
            diagnostic = await diagnostic_run(opts, entries[:m], Path(tmp), None)
        if opts.profile:
            say(f"cProfile run ({m:,} records; not counted)")
            profile = await diagnostic_run(opts, entries[:m], Path(tmp), opts.output.with_suffix(".prof"))
    write = spread([r["write"]["records_per_s"] for r in runs])
    verify = spread([r["verify"]["records_per_s"] for r in runs])
    report: dict[str, Any] = {
        "benchmark": "ledger",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "source": source_facts(),
        "settings": {
            "records": opts.records,
            "runs": opts.runs,
            "writer_batch": opts.batch,
            "checkpoint_records": opts.checkpoint_records,
            "hash_algorithm": opts.algorithm,
            "event_loop": opts.loop,
            "log_entry_bytes_mean": round(mean_size),
            "database": "PostgreSQL (fresh database per run, migrated)",
            "redis_url": opts.redis_url,
            "verify_path": runs[0]["verify"]["path"],
        },
        "results": {
            "write_records_per_s": write,
            "verify_records_per_s": verify,
            "read_rows_only_records_per_s": spread([r["read_only"]["records_per_s"] for r in runs]),
            "verifier_only_records_per_s": spread([r["verifier_only"]["records_per_s"] for r in runs]),
            "write_cpu_median_pct": {
                "bench": median_of(runs, "write", "bench_cpu_pct"),
                "postgres_backend": median_of(runs, "write", "postgres_backend_cpu_pct"),
                "postgres_all": median_of(runs, "write", "postgres_all_cpu_pct"),
                "redis": median_of(runs, "write", "redis_cpu_pct"),
            },
            "verify_cpu_median_pct": {
                "bench": median_of(runs, "verify", "bench_cpu_pct"),
                "postgres_backend": median_of(runs, "verify", "postgres_backend_cpu_pct"),
                "postgres_all": median_of(runs, "verify", "postgres_all_cpu_pct"),
            },
        },
        "targets": {
            "write_records_per_s": WRITE_TARGET,
            "verify_records_per_s": VERIFY_TARGET,
            "write_met": write["median"] >= WRITE_TARGET,
            "verify_met": verify["median"] >= VERIFY_TARGET,
        },
        "runs": runs,
        "diagnostic": diagnostic,
        "profile": profile,
        "output": str(opts.output),
    }
    busy = [r["machine_busy_before_pct"] for r in runs]
    notes = []
    if not all(r["quiet_before"] for r in runs):
        notes.append(
            f"the machine was busy before some runs (busy before: {busy} % of one core summed over cores); "
            "figures may be low"
        )
    left = [r["write"]["log_left"] for r in runs]
    if any(left):
        notes.append(
            f"entries left in the log after drain(), every record having been moved: {left}. "
            "LedgerWriter.step trims with XTRIM MINID ~ (redis-py's default approximate=True), which "
            "removes at most 10,000 entries per call: with ledger.writer_batch > 10,000 the log (and "
            "the backlog the gateways check) grows without bound"
        )
    widest = max(r["write"]["widest_checkpoint"] for r in runs)
    if widest > opts.checkpoint_records:
        notes.append(
            f"checkpoints cover up to {widest:,} records, not ledger.checkpoint_records "
            f"({opts.checkpoint_records:,}): LedgerStore.append cuts at most one checkpoint per "
            f"batch (ledger.writer_batch {opts.batch:,})"
        )
    if any(r["write"]["postgres_all_cpu_pct"] > r["write"]["postgres_backend_cpu_pct"] + 30 for r in runs):
        notes.append(
            "other postgres processes used CPU while writing (other sessions' databases, or "
            "the server's own checkpointer/autovacuum): figures may be low"
        )
    if opts.records < 50_000:
        notes.append("fewer than 50,000 records: start-up costs weigh on the figures")
    report["notes"] = notes
    return report


def render(report: dict[str, Any], console: Console) -> None:
    r, t, s = report["results"], report["targets"], report["settings"]
    table = Table(
        title=(
            f"ledger: {s['records']:,} records x {s['runs']} runs, batch {s['writer_batch']}, "
            f"checkpoint every {s['checkpoint_records']}, {s['hash_algorithm']}"
        )
    )
    table.add_column("figure")
    table.add_column("median rec/s", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("target", justify="right")
    table.add_column("", justify="center")

    def row(label: str, fig: dict[str, Any], target: int | None) -> None:
        mark = "" if target is None else ("[green]met[/]" if fig["median"] >= target else "[red]below[/]")
        table.add_row(
            label,
            f"{fig['median']:,}",
            f"{fig['min']:,}",
            f"{fig['max']:,}",
            f"{target:,}" if target else "",
            mark,
        )

    row("write: writer.drain() into PostgreSQL", r["write_records_per_s"], t["write_records_per_s"])
    row(f"verify: {s['verify_path'].split(' (')[0]}", r["verify_records_per_s"], t["verify_records_per_s"])
    row("  its reading alone (its scan, records rebuilt)", r["read_rows_only_records_per_s"], None)
    row("  its hashing alone (Verifier, rows in memory)", r["verifier_only_records_per_s"], None)
    console.print(table)
    w, v = r["write_cpu_median_pct"], r["verify_cpu_median_pct"]
    console.print(
        f"CPU while writing (median, % of one core): bench/writer {w['bench']}, PostgreSQL backend "
        f"{w['postgres_backend']} (all postgres processes {w['postgres_all']}), Redis {w['redis']}; "
        f"while verifying: bench {v['bench']}, PostgreSQL backend {v['postgres_backend']}"
    )
    diag = report.get("diagnostic")
    if diag:
        phases = Table(
            title=f"where the writer's time goes ({diag['records']:,} records, "
            f"{diag['records_per_s']:,} rec/s with timers)"
        )
        phases.add_column("phase")
        phases.add_column("s", justify="right")
        phases.add_column("%", justify="right")
        phases.add_column("us/record", justify="right")
        phases.add_column("calls", justify="right")
        for label, p in diag["phases"].items():
            phases.add_row(
                label, f"{p['seconds']:.2f}", f"{p['pct']:.1f}", f"{p['us_per_record']:.1f}", str(p["calls"])
            )
        console.print(phases)
    prof = report.get("profile")
    if prof:
        console.print(
            f"cProfile of writer.drain() ({prof['records']:,} records, {prof['records_per_s']:,} rec/s "
            f"under the profiler; {prof['profile_file']}):"
        )
        console.print(prof["profile_top_tottime"], markup=False, highlight=False)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"machine: {report['machine']}")
    console.print(f"JSON: {report['output']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Options:
    defaults = load_settings(env={}).ledger
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--records", type=int, default=200_000, help="records in the log per run (200,000)")
    p.add_argument("-r", "--runs", type=int, default=3, help="measured runs (3); medians are reported")
    p.add_argument(
        "--batch",
        type=int,
        default=defaults.writer_batch,
        help=f"ledger.writer_batch ({defaults.writer_batch})",
    )
    p.add_argument(
        "--checkpoint-records",
        type=int,
        default=defaults.checkpoint_records,
        help=f"ledger.checkpoint_records ({defaults.checkpoint_records})",
    )
    p.add_argument(
        "--algorithm",
        choices=("sha256", "sm3"),
        default=defaults.hash_algorithm,
        help="ledger.hash_algorithm",
    )
    p.add_argument(
        "--pg-admin-url",
        default=DEFAULT_PG_ADMIN,
        help=f"asyncpg URL of a database to CREATE DATABASE from ({DEFAULT_PG_ADMIN})",
    )
    p.add_argument(
        "--redis-url", default=DEFAULT_REDIS, help=f"Redis database to use; it is FLUSHDB'd ({DEFAULT_REDIS})"
    )
    p.add_argument(
        "--no-breakdown", action="store_true", help="skip the uncounted run that times each writer phase"
    )
    p.add_argument(
        "--breakdown-records", type=int, default=100_000, help="records in the diagnostic run (100,000)"
    )
    p.add_argument(
        "--profile", action="store_true", help="run the diagnostic run under cProfile too (top 25 printed)"
    )
    p.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (uvloop, as pdg serve)"
    )
    p.add_argument(
        "--quiet-wait", type=float, default=15.0, help="seconds to wait for an idle machine before a run (15)"
    )
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    a = p.parse_args(argv)
    if a.records < 1 or a.runs < 1:
        p.error("--records and --runs must be positive")
    return Options(
        records=a.records,
        runs=a.runs,
        batch=a.batch,
        checkpoint_records=a.checkpoint_records,
        algorithm=a.algorithm,
        pg_admin_url=a.pg_admin_url,
        redis_url=a.redis_url,
        breakdown=not a.no_breakdown,
        profile=a.profile,
        breakdown_records=a.breakdown_records,
        loop=a.loop,
        quiet_wait=a.quiet_wait,
        output=a.output,
        json=a.json,
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def event_loop_policy(name: str) -> Iterator[None]:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            name = "asyncio"
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(None)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Progress to stderr when stdout carries the JSON.
    console = Console(stderr=opts.json) if sys.stderr.isatty() else Console(stderr=opts.json, width=140)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        redis_db(opts.redis_url)
        with event_loop_policy(opts.loop):
            report = asyncio.run(bench(opts, lambda s: console.print(s, highlight=False)))
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    if opts.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render(report, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
