"""The auditor's tools over the SQL ledger: verify, trace, export, prove.

Used by ``pdg audit`` and the admin API; pure service code over an
:class:`~sqlalchemy.ext.asyncio.AsyncEngine` (and files, for exports).

**Verify** re-derives the whole chain from the ``calls`` rows in ``seq``
order with :class:`ledger.chain.Verifier`, checks every checkpoint (signature,
chain head, Merkle root, tiling) and then what the rows alone cannot show:
that the last record is the one the writer's state (``ledger_state``) says is
last, with the chain head it says. Everything is read from one snapshot
(``REPEATABLE READ`` on PostgreSQL, a read transaction on SQLite), so a
gateway writing meanwhile is never mistaken for tampering. On PostgreSQL rows
are streamed through asyncpg directly (the ORM would cost more than the
hashing); ``pdg audit verify`` must do 200,000 records/s.

Trusted keys are the caller's: the deployment's ledger key file and any
``--public-key`` files. Keys stored in ``ledger_keys`` (or carried in an
export) are *not* trusted unless asked: whoever can rewrite the ledger can
add a key of their own there.

**Export** writes a contiguous run of records (JSON Lines or CSV, the
:func:`ledger.record.public` form with ``hash``) and a manifest: algorithm,
range, the previous record's chain entry, every checkpoint inside the range
plus the one that vouches for its start, public keys, and the data file's
SHA-256. An export starts at a checkpoint boundary (or seq 1), so
:func:`verify_export` re-derives everything offline.

**Prove** gives one call's RFC 6962 inclusion proof against the signed
checkpoint covering it; :func:`check_proof` is what a third party runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from pydantic import AwareDatetime, BaseModel
from sqlalchemy import Integer, Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.chain import GENESIS, Chain, Checkpoint, Problem, ProblemKind, Verifier, canonical
from ledger.models import CallRow, CheckpointRow, LedgerKeyRow, LedgerStateRow
from ledger.record import FIELDS, TIME_FIELDS, public
from ledger.store import checkpoint_of, public_pem
from licensing.errors import BadRequestError, NotFoundError, ValidationFailedError
from licensing.keys import thumbprint

EXPORT_FORMAT: Final = "pdg.audit-export.v1"
PROOF_FORMAT: Final = "pdg.inclusion-proof.v1"
MANIFEST: Final = "manifest.json"
#: Rows per fetch while verifying and exporting.
CHUNK: Final = 20_000
MAX_PAGE: Final = 1000
#: How far around a misfit record to look for the place it was moved from.
_MOVED_WINDOW: Final = timedelta(minutes=5)
_MOVED_CANDIDATES: Final = 50_000

_CALLS = cast(Table, CallRow.__table__)
_STATE = cast(Table, LedgerStateRow.__table__)
_CHECKPOINTS = cast(Table, CheckpointRow.__table__)
_KEYS = cast(Table, LedgerKeyRow.__table__)
_COLUMNS: Final = (*FIELDS, "hash")
_INT_FIELDS: Final = frozenset(c.name for c in _CALLS.c if isinstance(c.type, Integer))
_NULLABLE: Final = frozenset(c.name for c in _CALLS.c if c.nullable)
_PUBLIC_COLUMNS: Final = (*_COLUMNS, "charge_fen")
#: Scanned columns: the fields in sorted order (orjson's key sort is a third
#: cheaper over a dict already in order), then ``hash``.
_SORTED: Final = tuple(sorted(FIELDS))
_SCANNED: Final = (*_SORTED, "hash")
#: The row stream on PostgreSQL, ``$1 <= seq < $2``; times as ISO text in UTC
#: (DateStyle ISO is set first), see :func:`_feed_text_times`.
_PG_SCAN: Final = "SELECT {} FROM calls WHERE seq >= $1 AND seq < $2 ORDER BY seq".format(  # noqa: S608
    ", ".join(f"{c}::text || '+00' AS {c}" if c in TIME_FIELDS else c for c in _SCANNED)
)
_NO_END: Final = 2**63 - 1

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
PublicKeys = Mapping[str, ec.EllipticCurvePublicKey]


class AuditError(BadRequestError):
    """The audit tools cannot do what was asked (a one-line reason)."""


class _ChildFailedError(AuditError):
    """A verifying child process could not do its part (one pass will)."""


# -- keys ------------------------------------------------------------------------


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """The id checkpoints name a key by: its RFC 7638 thumbprint (as the writer's)."""
    return thumbprint(json.loads(ECAlgorithm.to_jwk(key)))


def load_public_key(pem: bytes, where: str) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from a public or private PEM (a ledger key file)."""
    key: object
    try:
        if b"PRIVATE KEY" in pem:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{where}: not a PEM key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AuditError(f"{where}: ledger keys are EC P-256")
    return key


def read_public_keys(paths: Sequence[Path]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Trusted keys from PEM files, by key id."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for path in paths:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise AuditError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        key = load_public_key(pem, str(path))
        keys[key_id(key)] = key
    return keys


async def stored_keys(engine: AsyncEngine) -> dict[str, ec.EllipticCurvePublicKey]:
    """The keys in ``ledger_keys`` (not trusted by default; see the module docstring)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(_KEYS.c.key_id, _KEYS.c.public_pem))).all()
    keys = {}
    for row in rows:
        with contextlib.suppress(AuditError):
            keys[row.key_id] = load_public_key(row.public_pem.encode(), f"stored key {row.key_id}")
    return keys


# -- verify ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    source: str
    algorithm: str
    #: Records that re-derived (all of them when ``ok``).
    records: int
    #: Checkpoints whose signature, head and root were checked and held.
    checkpoints: int
    first_seq: int
    last_seq: int
    #: Records after the last checkpoint: chained, not yet signed.
    unsigned_tail: int
    problem: Problem | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        problem = self.problem
        return {
            "ok": self.ok,
            "source": self.source,
            "algorithm": self.algorithm,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "unsigned_tail": self.unsigned_tail,
            "problem": None
            if problem is None
            else {"seq": problem.seq, "kind": problem.kind, "reason": problem.reason},
            "seconds": round(self.seconds, 3),
            "records_per_second": int(self.records / self.seconds) if self.seconds > 0 else None,
        }


def _first(*problems: Problem | None) -> Problem | None:
    found = [p for p in problems if p is not None]
    return min(found, key=lambda p: p.seq) if found else None


def _checkpoints(rows: Sequence[Any], algorithm: str) -> tuple[list[Checkpoint], Problem | None]:
    """Checkpoint rows as :class:`Checkpoint`. A row that cannot be read
    becomes an unsigned stand-in, so the verifier reports it where it lies."""
    cps: list[Checkpoint] = []
    problem: Problem | None = None
    for row in rows:
        try:
            cp = checkpoint_of(row)
            if cp.first_seq < 1:
                raise ValueError("it starts before seq 1")
            cps.append(cp)
        except (TypeError, ValueError) as exc:
            first = max(int(row.first_seq), 1)
            problem = _first(
                problem,
                Problem(
                    first, "checkpoint", f"checkpoint {row.first_seq}..{row.last_seq} is unreadable: {exc}"
                ),
            )
            if row.first_seq >= 1 and row.last_seq >= row.first_seq:
                cps.append(
                    Checkpoint(
                        row.first_seq,
                        row.last_seq,
                        GENESIS,
                        GENESIS,
                        datetime(1970, 1, 1, tzinfo=UTC),
                        algorithm,
                    )
                )
    return cps, problem


def _count_checked(cps: Sequence[Checkpoint], through: int, problem: Problem | None) -> int:
    bad = problem.seq if problem is not None and problem.kind == "checkpoint" else None
    return sum(1 for cp in cps if cp.last_seq <= through and cp.first_seq != bad)


@contextlib.asynccontextmanager
async def _snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection whose reads all see one snapshot of the ledger."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        elif engine.dialect.name == "sqlite":
            # pysqlite begins only before writes; a read transaction in WAL
            # mode pins the snapshot for every statement that follows.
            await conn.exec_driver_sql("BEGIN")
        try:
            yield conn
        finally:
            await conn.rollback()


@dataclass(frozen=True, slots=True)
class _Scanned:
    """How far one scan got: its first problem, or the last seq and chain entry."""

    problem: Problem | None
    last_seq: int
    head: bytes


def _feed_text_times(verifier: Verifier, rows: Sequence[Sequence[Any]]) -> Problem | None:
    """The hot loop (PostgreSQL): times arrive as ISO text with ``+00``, which
    ``fromisoformat`` turns into UTC datetimes for a third of what asyncpg's
    own timestamp decoding costs."""
    feed, fromhex, fromiso, fields = verifier.feed, bytes.fromhex, datetime.fromisoformat, _SORTED
    for row in rows:
        record = dict(zip(fields, row, strict=False))
        try:
            record["time"] = fromiso(record["time"])
            record["started_at"] = fromiso(record["started_at"])
        except ValueError:
            pass  # a year PostgreSQL can hold and Python cannot: left as text, it cannot re-derive
        try:
            stored = fromhex(row[-1])
        except (TypeError, ValueError):
            stored = b""
        if (problem := feed(record, stored)) is not None:
            return problem
    return None


def _feed(verifier: Verifier, rows: Sequence[Sequence[Any]]) -> Problem | None:
    feed, fromhex, fields = verifier.feed, bytes.fromhex, _SORTED
    for row in rows:
        try:
            stored = fromhex(row[-1])
        except (TypeError, ValueError):
            stored = b""
        if (problem := feed(dict(zip(fields, row, strict=False)), stored)) is not None:
            return problem
    return None


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Hold the cyclic collector off: a scan makes millions of short-lived
    dicts and no cycles, and generation sweeps would cost a good part of it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _scan_postgres(
    driver: Any, verifier: Verifier, first: int, until: int, tick: Callable[[int], bool]
) -> _Scanned:
    """Feed rows ``first <= seq < until`` through an asyncpg cursor (inside
    the caller's transaction). ``tick(rows)`` after each chunk; False stops."""
    import asyncpg

    problem = None
    try:
        await driver.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        cursor = await driver.cursor(_PG_SCAN, first, until)
        with _no_gc():
            while rows := await cursor.fetch(CHUNK):
                problem = _feed_text_times(verifier, rows)
                if problem is not None or not tick(len(rows)):
                    break
    except asyncpg.PostgresError as exc:
        raise AuditError(f"database: {exc}") from exc
    return _Scanned(problem or verifier.finish(), verifier.last_seq, verifier.head)


async def _scan_sqlite(conn: AsyncConnection, verifier: Verifier, tick: Callable[[int], bool]) -> _Scanned:
    problem = None
    result = await conn.stream(select(*(_CALLS.c[c] for c in _SCANNED)).order_by(_CALLS.c.seq))
    with _no_gc():
        async for rows in result.partitions(CHUNK):
            problem = _feed(verifier, rows)
            if problem is not None or not tick(len(rows)):
                break
    await result.close()
    return _Scanned(problem or verifier.finish(), verifier.last_seq, verifier.head)


# -- verifying on several cores (PostgreSQL) -------------------------------------------
#
# One process re-derives ~200,000 records/s and PostgreSQL needs a fifth of a
# core to serve them. So a large ledger is cut into segments at checkpoint
# boundaries; child processes verify all but the first, each from the same
# snapshot (pg_export_snapshot), starting from the signed chain head of the
# checkpoint before its segment. The segment before closes that checkpoint
# itself, so together the segments check exactly what one pass would; the
# first problem is the lowest-numbered one any segment found.

#: Ledgers smaller than this are verified in one process (a child takes ~0.5 s to start).
PARALLEL_MIN_RECORDS: Final = 300_000
MAX_SEGMENTS: Final = 4
_SNAPSHOT_ID = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")
_CHILD = "from ledger.audit import child_main; child_main()"


def _split_points(cps: Sequence[Checkpoint], last: int, parts: int) -> list[Checkpoint]:
    """The checkpoints to cut after, for ``parts`` segments of about equal size;
    none unless the checkpoints tile the ledger (otherwise one pass says why)."""
    expected = 1
    for cp in cps:
        if cp.first_seq != expected:
            return []
        expected = cp.last_seq + 1
    inner = [cp for cp in cps if cp.last_seq < last]
    cuts: list[Checkpoint] = []
    for part in range(1, parts):
        target = last * part // parts
        best = min(inner, key=lambda cp: abs(cp.last_seq - target), default=None)
        if best is not None and best not in cuts and (not cuts or best.last_seq > cuts[-1].last_seq):
            cuts.append(best)
    return cuts


def child_main() -> None:
    """The child process of :func:`_verify_parallel`: a job (JSON) on stdin;
    ``P <rows>`` progress lines, then ``R <json>`` or ``E <reason>``, on stdout."""
    import sys

    job = json.loads(sys.stdin.buffer.read())

    def tick(rows: int) -> bool:
        sys.stdout.write(f"P {rows}\n")
        sys.stdout.flush()
        return True

    try:
        scanned = asyncio.run(_verify_segment(job, tick))
    except (AuditError, OSError, ValueError) as exc:
        sys.stdout.write(f"E {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")
        sys.exit(1)
    p = scanned.problem
    result = {
        "problem": None if p is None else [p.seq, p.kind, p.reason],
        "last_seq": scanned.last_seq,
        "head": scanned.head.hex(),
    }
    sys.stdout.write(f"R {json.dumps(result)}\n")


async def _verify_segment(job: dict[str, Any], tick: Callable[[int], bool]) -> _Scanned:
    import asyncpg

    snapshot = str(job["snapshot"])
    if not _SNAPSHOT_ID.match(snapshot):
        raise AuditError(f"unexpected snapshot id {snapshot!r}")
    first, until = int(job["first_seq"]), int(job["until"])
    verifier = Verifier(
        job["algorithm"],
        checkpoints=[checkpoint_from_json(cp, "checkpoint") for cp in job["checkpoints"]],
        public_keys={kid: load_public_key(pem.encode(), kid) for kid, pem in job["keys"].items()},
        first_seq=first,
        prev_hash=bytes.fromhex(job["prev_hash"]),
    )
    try:
        driver = await asyncpg.connect(job["dsn"])
    except asyncpg.PostgresError as exc:
        raise AuditError(f"database: {exc}") from exc
    try:
        async with driver.transaction(isolation="repeatable_read", readonly=True):
            await driver.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            return await _scan_postgres(driver, verifier, first, until, tick)
    finally:
        await driver.close()


class _Child:
    """One segment's child process, and what it has said so far."""

    def __init__(self, process: asyncio.subprocess.Process, first: int) -> None:
        self.process = process
        self.first = first
        self.done = 0
        self.answer: dict[str, str] = {}

    async def listen(self, progress: Callable[[], None]) -> None:
        if self.process.stdout is None:  # pragma: no cover (started with PIPE)
            return
        async for line in self.process.stdout:
            kind, _, rest = line.decode().rstrip("\n").partition(" ")
            if kind == "P":
                self.done += int(rest)
                progress()
            elif kind in ("R", "E"):
                self.answer[kind] = rest

    async def result(self) -> _Scanned:
        errors = await self.process.stderr.read() if self.process.stderr is not None else b""
        await self.process.wait()
        if "R" not in self.answer:
            lines = errors.decode(errors="replace").strip().splitlines()
            reason = self.answer.get("E") or (
                lines[-1] if lines else f"exit status {self.process.returncode}"
            )
            raise _ChildFailedError(f"verifying records from seq {self.first} failed: {reason}")
        data = json.loads(self.answer["R"])
        found = data["problem"]
        problem = (
            None if found is None else Problem(int(found[0]), cast(ProblemKind, found[1]), str(found[2]))
        )
        return _Scanned(problem, int(data["last_seq"]), bytes.fromhex(data["head"]))


async def _verify_parallel(
    conn: AsyncConnection,
    algorithm: str,
    cps: list[Checkpoint],
    keys: PublicKeys,
    cuts: list[Checkpoint],
    progress: Callable[[int], None],
) -> _Scanned:
    import sys

    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    snapshot = await driver.fetchval("SELECT pg_export_snapshot()")
    dsn = conn.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    pems = {kid: public_pem(key) for kid, key in keys.items()}
    starts = [cut.last_seq + 1 for cut in cuts]
    ends = [*starts[1:], _NO_END]
    # The children import what we imported, from where we imported it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    children: list[_Child] = []
    listening: list[asyncio.Task[None]] = []
    ours = 0

    def report() -> None:
        progress(ours + sum(child.done for child in children))

    try:
        for cut, first, until in zip(cuts, starts, ends, strict=True):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CHILD,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            children.append(_Child(process, first))
            job = {
                "dsn": dsn,
                "snapshot": snapshot,
                "algorithm": algorithm,
                "checkpoints": [
                    checkpoint_json(cp) for cp in cps if first <= cp.first_seq and cp.last_seq < until
                ],
                "keys": pems,
                "first_seq": first,
                "until": until,
                "prev_hash": cut.chain_head.hex(),
            }
            if process.stdin is not None:
                process.stdin.write(json.dumps(job).encode())
                await process.stdin.drain()
                process.stdin.close()
        listening += [asyncio.create_task(child.listen(report)) for child in children]

        def tick(rows: int) -> bool:
            nonlocal ours
            ours += rows
            report()
            return True

        first_part = Verifier(
            algorithm, checkpoints=[cp for cp in cps if cp.last_seq < starts[0]], public_keys=keys
        )
        scanned = await _scan_postgres(driver, first_part, 1, starts[0], tick)
        if scanned.problem is not None:
            return scanned  # nothing after our segment can come earlier
        await asyncio.gather(*listening)
        for child in children:
            theirs = await child.result()
            if theirs.problem is not None:
                return theirs
            if theirs.last_seq >= child.first:  # an empty last segment leaves the head where it was
                scanned = theirs
        return scanned
    finally:
        for child in children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
        report()


async def verify(
    engine: AsyncEngine,
    public_keys: PublicKeys,
    *,
    progress: Progress | None = None,
    parallel_min: int = PARALLEL_MIN_RECORDS,
    segments: int | None = None,
) -> VerifyReport:
    """Re-derive the whole ledger and report the first problem, if any.

    ``progress(done, total)`` is called after each chunk of rows. A PostgreSQL
    ledger of ``parallel_min`` records or more is verified in ``segments``
    processes (default: one per core, at most :data:`MAX_SEGMENTS`).
    """
    started = time.perf_counter()
    async with _snapshot(engine) as conn:
        state = (await conn.execute(select(_STATE))).first()
        cp_rows = (await conn.execute(select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.first_seq))).all()
        algorithm = state.algorithm if state is not None else "sha256"
        last = state.next_seq - 1 if state is not None else 0
        cps, early = _checkpoints(cp_rows, algorithm)
        try:
            verifier = Verifier(algorithm, checkpoints=cps, public_keys=public_keys)
        except ValueError as exc:
            raise AuditError(f"cannot verify this ledger: {exc}") from exc

        def report(done: int) -> None:
            if progress is not None:
                progress(done, max(last, done))

        done = 0

        def tick(rows: int) -> bool:
            nonlocal done
            done += rows
            report(done)
            return True

        postgres = engine.dialect.name == "postgresql"
        parts = segments or min(MAX_SEGMENTS, os.cpu_count() or 1)
        cuts = _split_points(cps, last, parts) if postgres and last >= parallel_min and parts > 1 else []
        scanned = None
        if cuts:
            try:
                scanned = await _verify_parallel(conn, algorithm, cps, public_keys, cuts, report)
            except _ChildFailedError as exc:
                log.warning("verifying in one process instead: %s", exc)
        if scanned is None and postgres:
            raw = await conn.get_raw_connection()
            scanned = await _scan_postgres(raw.driver_connection, verifier, 1, _NO_END, tick)
        elif scanned is None:
            scanned = await _scan_sqlite(conn, verifier, tick)
        problem = await _tail(conn, scanned, state, last)
        if problem is not None and problem.kind == "altered":
            problem = await _diagnose(conn, problem, scanned.head, last, state)
    problem = _first(early, problem)
    signed = max((cp.last_seq for cp in cps if cp.last_seq <= last), default=0)
    records = problem.seq - 1 if problem is not None else scanned.last_seq
    return VerifyReport(
        ok=problem is None,
        source="database",
        algorithm=algorithm,
        records=max(0, records),
        checkpoints=_count_checked(cps, records, problem),
        first_seq=1,
        last_seq=last,
        unsigned_tail=max(0, last - signed),
        problem=problem,
        seconds=time.perf_counter() - started,
    )


async def _tail(conn: AsyncConnection, scanned: _Scanned, state: Any, last: int) -> Problem | None:
    """What the rows alone do not show: records past the writer's last one,
    a missing tail, or a tail rewritten off the writer's head."""
    problem = scanned.problem
    extra = await conn.scalar(select(func.min(_CALLS.c.seq)).where(_CALLS.c.seq > last))
    if extra is not None and (problem is None or problem.seq >= extra or problem.seq > last):
        return Problem(
            extra, "inserted", f"record {extra} is past the ledger's end (the writer's last record is {last})"
        )
    if problem is not None:
        return problem
    if scanned.last_seq < last:
        seq = scanned.last_seq + 1
        return Problem(seq, "missing", f"record {seq} is missing (the writer's last record is {last})")
    if state is not None and scanned.head.hex() != state.head:
        return Problem(last, "altered", f"record {last} does not end the chain the writer recorded")
    return None


async def _diagnose(conn: AsyncConnection, problem: Problem, head: bytes, last: int, state: Any) -> Problem:
    """An ``altered`` record may really be a second copy of a number, or a
    record moved from elsewhere (two records' ``seq`` swapped): say so."""
    n = problem.seq
    rows = (await conn.execute(select(_CALLS).where(_CALLS.c.seq == n))).all()
    if len(rows) > 1:
        return Problem(n, "inserted", f"{len(rows)} records are numbered {n}")
    if len(rows) != 1:
        return problem
    record = {c: rows[0]._mapping[c] for c in FIELDS}
    try:
        stored = bytes.fromhex(rows[0].hash)
    except ValueError:
        return problem
    if len(stored) != len(head):
        return problem
    chain = Chain(state.algorithm if state is not None else "sha256")
    around = (
        await conn.execute(
            select(_CALLS)
            .where(_CALLS.c.time.between(record["time"] - _MOVED_WINDOW, record["time"] + _MOVED_WINDOW))
            .where(_CALLS.c.seq != n)
            .order_by(_CALLS.c.seq)
            .limit(_MOVED_CANDIDATES)
        )
    ).all()
    # Where did this record's stored entry come from? The record after that
    # place chains from it; with none after it, it is the writer's head.
    origin = None
    for row in around:
        try:
            if chain.link(stored, canonical({c: row._mapping[c] for c in FIELDS})).hex() == row.hash:
                origin = int(row.seq) - 1
                break
        except (TypeError, ValueError):
            continue
    if origin is None and state is not None and stored.hex() == state.head:
        origin = last
    if origin is None or origin == n:
        return problem
    # And does the record itself chain there, onto one of its neighbours?
    leaf = chain.leaf_hash(canonical({**record, "seq": origin}))
    befores = [head, *(bytes.fromhex(r.hash) for r in around if _is_hex(r.hash))]
    if any(chain.link_leaf(before, leaf) == stored for before in befores):
        return Problem(n, "reordered", f"the record at seq {n} is record {origin}, renumbered (moved)")
    return problem


def _is_hex(value: str) -> bool:
    try:
        return len(bytes.fromhex(value)) == 32
    except ValueError:
        return False


# -- records in their public form ------------------------------------------------


def rfc3339(value: datetime) -> str:
    """``value`` spelled as in the hashed bytes (UTC, ``Z``)."""
    return orjson.dumps(value, option=orjson.OPT_UTC_Z).decode()[1:-1]


def public_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored record as the API and exports show it, JSON-ready."""
    data = public(row)
    for name in TIME_FIELDS:
        data[name] = rfc3339(data[name])
    return data


class CallRecord(BaseModel):
    """A call record (DESIGN §5): every hashed field, its chain ``hash``, and
    the charge in fen (``charge_e4`` is 1/10000 fen)."""

    seq: int
    call_id: str
    request_id: str
    time: AwareDatetime
    started_at: AwareDatetime
    app_id: str
    licensee_id: str
    licence_id: str
    dataset_id: str
    purpose: str
    method: str
    path: str
    query_digest: str | None
    status: int
    upstream_status: int | None
    outcome: str
    problem: str | None
    records: int
    bytes: int
    latency_us: int
    pool: str | None
    period: str
    charge_e4: int
    client_address: str
    token_id: str
    response_digest: str | None
    hash: str
    charge_fen: str


def parse_time(value: str, field: str) -> datetime:
    """An RFC 3339 time with a zone, as UTC (a 400 naming ``field`` otherwise)."""
    # An unescaped "+" in a URL query arrives as a space: "...T08:00:00 08:00".
    text = re.sub(r" (\d\d(:?\d\d)?)$", r"+\1", value.strip())
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValidationFailedError(
            field, f"{value!r} is not an RFC 3339 time with a zone, e.g. 2026-03-01T00:00:00Z"
        )
    return parsed.astimezone(UTC)


def parse_int(value: str, field: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValidationFailedError(field, f"{value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ValidationFailedError(field, f"must be between {low} and {high}")
    return number


@dataclass(frozen=True, slots=True)
class CallQuery:
    """Which calls to list: all filters optional, ``since`` inclusive, ``until``
    exclusive, oldest first; ``after`` is the ``seq`` cursor of the previous page."""

    request_id: str | None = None
    licensee: str | None = None
    dataset: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int = 0
    limit: int = 100

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CallQuery:
        """From query parameters (``from``/``to``/``after``/``limit``...); bad
        values raise a 400 naming the parameter."""
        since = parse_time(params["from"], "from") if params.get("from") else None
        until = parse_time(params["to"], "to") if params.get("to") else None
        if since is not None and until is not None and until <= since:
            raise ValidationFailedError("to", "must be after from")
        for name in ("licensee", "dataset", "request_id"):
            if len(params.get(name, "")) > 128:
                raise ValidationFailedError(name, "at most 128 characters")
        return cls(
            request_id=params.get("request_id") or None,
            licensee=params.get("licensee") or None,
            dataset=params.get("dataset") or None,
            since=since,
            until=until,
            after=parse_int(params["after"], "after", 0, 2**63 - 1) if params.get("after") else 0,
            limit=parse_int(params["limit"], "limit", 1, MAX_PAGE) if params.get("limit") else 100,
        )


@dataclass(frozen=True, slots=True)
class CallPage:
    calls: list[dict[str, Any]]
    #: Pass as ``after`` for the next page; ``None`` on the last page.
    next_after: int | None


async def get_call(engine: AsyncEngine, call_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (await conn.execute(select(_CALLS).where(_CALLS.c.call_id == call_id))).first()
    return None if row is None else public_json(row._mapping)


async def find_calls(engine: AsyncEngine, query: CallQuery) -> CallPage:
    stmt = select(_CALLS).where(_CALLS.c.seq > query.after)
    if query.request_id is not None:
        stmt = stmt.where(_CALLS.c.request_id == query.request_id)
    if query.licensee is not None:
        stmt = stmt.where(_CALLS.c.licensee_id == query.licensee)
    if query.dataset is not None:
        stmt = stmt.where(_CALLS.c.dataset_id == query.dataset)
    if query.since is not None:
        stmt = stmt.where(_CALLS.c.time >= query.since)
    if query.until is not None:
        stmt = stmt.where(_CALLS.c.time < query.until)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt.order_by(_CALLS.c.seq).limit(query.limit + 1))).all()
    calls = [public_json(row._mapping) for row in rows[: query.limit]]
    more = len(rows) > query.limit
    return CallPage(calls, calls[-1]["seq"] if more and calls else None)


# -- export ----------------------------------------------------------------------


def checkpoint_json(cp: Checkpoint) -> dict[str, Any]:
    return {
        "first_seq": cp.first_seq,
        "last_seq": cp.last_seq,
        "chain_head": cp.chain_head.hex(),
        "merkle_root": cp.merkle_root.hex(),
        "created_at": rfc3339(cp.created_at),
        "algorithm": cp.algorithm,
        "key_id": cp.key_id,
        "signature": cp.signature.hex(),
    }


def checkpoint_from_json(data: Any, where: str) -> Checkpoint:
    try:
        return Checkpoint(
            first_seq=_int(data["first_seq"]),
            last_seq=_int(data["last_seq"]),
            chain_head=bytes.fromhex(data["chain_head"]),
            merkle_root=bytes.fromhex(data["merkle_root"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            algorithm=str(data["algorithm"]),
            key_id=str(data["key_id"]),
            signature=bytes.fromhex(data["signature"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{where}: not a checkpoint ({exc})") from exc


def _int(value: Any) -> int:
    if value.__class__ is not int:
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


class _Sink:
    """The data file being written, and its running SHA-256."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.digest = hashlib.sha256()
        self.count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("wb")
        if fmt == "csv":
            self._write(self._csv_line(_PUBLIC_COLUMNS))

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self.digest.update(data)

    @staticmethod
    def _csv_line(values: Sequence[Any]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue().encode()

    def add(self, rows: Sequence[Mapping[Any, Any]]) -> None:
        out = bytearray()
        for row in rows:
            data = public_json(row)
            if self.fmt == "csv":
                out += self._csv_line(["" if data[c] is None else data[c] for c in _PUBLIC_COLUMNS])
            else:
                out += orjson.dumps(data) + b"\n"
        self._write(bytes(out))
        self.count += len(rows)

    def close(self) -> None:
        self._fh.close()


async def _range(
    conn: AsyncConnection,
    last: int,
    from_seq: int | None,
    to_seq: int | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[int, int]:
    start, end = from_seq or 1, to_seq or last
    if since is not None:
        found = await conn.scalar(select(func.min(_CALLS.c.seq)).where(_CALLS.c.time >= since))
        start = max(start, found if found is not None else last + 1)
    if until is not None:
        found = await conn.scalar(select(func.max(_CALLS.c.seq)).where(_CALLS.c.time < until))
        end = min(end, found if found is not None else 0)
    if last == 0:
        raise AuditError("the ledger holds no records")
    if not 1 <= start <= end <= last:
        raise AuditError(f"no records in that range (the ledger holds seq 1..{last})")
    return start, end


async def export(
    engine: AsyncEngine,
    out_dir: Path,
    *,
    fmt: str = "jsonl",
    from_seq: int | None = None,
    to_seq: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    public_keys: PublicKeys | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write records and a manifest to ``out_dir``; return the manifest.

    The range widens to checkpoint boundaries: back to the start of the
    interval holding its first record (or seq 1), on to the end of the
    interval holding its last (when one is signed yet).
    """
    if fmt not in ("jsonl", "csv"):
        raise AuditError(f"unknown export format {fmt!r}; use jsonl or csv")
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        raise AuditError(f"{out_dir} already holds an export ({MANIFEST}); choose an empty folder")
    async with _snapshot(engine) as conn:
        state = (await conn.execute(select(_STATE))).first()
        last = state.next_seq - 1 if state is not None else 0
        algorithm = state.algorithm if state is not None else "sha256"
        start, end = await _range(conn, last, from_seq, to_seq, since, until)
        cp_rows = (await conn.execute(select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.first_seq))).all()
        cps, unreadable = _checkpoints(cp_rows, algorithm)
        if unreadable is not None:
            raise AuditError(f"{unreadable.reason}: run 'pdg audit verify'")
        holding = [cp for cp in cps if cp.first_seq <= start]
        if holding:
            start = holding[-1].first_seq if holding[-1].last_seq >= start else holding[-1].last_seq + 1
        anchor = next((cp for cp in cps if cp.last_seq == start - 1), None)
        closing = next((cp for cp in cps if cp.first_seq <= end <= cp.last_seq), None)
        end = closing.last_seq if closing is not None else end
        if start == 1:
            prev_hash = GENESIS
        elif anchor is not None:
            prev_hash = anchor.chain_head
        else:
            prev = await conn.scalar(select(_CALLS.c.hash).where(_CALLS.c.seq == start - 1))
            prev_hash = bytes.fromhex(prev or "")
        inside = [cp for cp in cps if start <= cp.first_seq and cp.last_seq <= end]
        keys: dict[str, str] = {}
        stored = {r.key_id: r.public_pem for r in (await conn.execute(select(_KEYS))).all()}
        for cp in [*([anchor] if anchor else []), *inside]:
            if cp.key_id in (public_keys or {}):
                keys[cp.key_id] = public_pem((public_keys or {})[cp.key_id])
            elif cp.key_id in stored:
                keys[cp.key_id] = stored[cp.key_id]
        data_name = f"calls-{start}-{end}.{fmt}"
        sink = _Sink(out_dir / data_name, fmt)
        try:
            after = start - 1
            while after < end:
                rows = (
                    await conn.execute(
                        select(_CALLS)
                        .where(_CALLS.c.seq > after, _CALLS.c.seq <= end)
                        .order_by(_CALLS.c.seq)
                        .limit(CHUNK)
                    )
                ).all()
                if not rows:
                    break
                sink.add([r._mapping for r in rows])
                after = rows[-1].seq
                if progress is not None:
                    progress(sink.count, end - start + 1)
        finally:
            sink.close()
    manifest = {
        "format": EXPORT_FORMAT,
        "created_at": rfc3339(datetime.now(UTC)),
        "algorithm": algorithm,
        "first_seq": start,
        "last_seq": end,
        "records": sink.count,
        "prev_hash": prev_hash.hex(),
        "anchor_checkpoint": checkpoint_json(anchor) if anchor is not None else None,
        "checkpoints": [checkpoint_json(cp) for cp in inside],
        "public_keys": keys,
        "data_file": data_name,
        "data_format": fmt,
        "data_sha256": sink.digest.hexdigest(),
        "requested": {
            "from_seq": from_seq,
            "to_seq": to_seq,
            "from": rfc3339(since) if since else None,
            "to": rfc3339(until) if until else None,
        },
    }
    manifest_path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    return manifest


# -- verifying an export, offline --------------------------------------------------


def _record_from_public(data: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed record back from its public (exported or proved) form."""
    record = {name: data[name] for name in FIELDS}
    for name in TIME_FIELDS:
        record[name] = datetime.fromisoformat(record[name])
    expected_fen = public({**record, "hash": ""})["charge_fen"]
    if data.get("charge_fen", expected_fen) != expected_fen:
        raise ValueError(f"charge_fen {data.get('charge_fen')!r} does not match charge_e4")
    return record


def _csv_value(name: str, value: str) -> Any:
    if value == "" and name in _NULLABLE:
        return None
    if name in _INT_FIELDS:
        return int(value)
    return value


def _read_records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line number, public record)`` per record, or ``(line number, error)``."""
    if fmt == "jsonl":
        with path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield number, str(exc)
                    continue
                yield number, data if isinstance(data, dict) else "not a JSON object"
        return
    # CSV values may span lines (a path with a newline in it is quoted).
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield reader.line_num, str(exc)
                return
            if header is None:
                header = values
                continue
            try:
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} values for {len(header)} columns")
                yield reader.line_num, {k: _csv_value(k, v) for k, v in zip(header, values, strict=True)}
            except ValueError as exc:
                yield reader.line_num, str(exc)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise AuditError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise AuditError(f"{path}: not a pdg audit export manifest ({EXPORT_FORMAT})")
    return manifest


def manifest_keys(manifest: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    keys = {}
    for kid, pem in (manifest.get("public_keys") or {}).items():
        keys[str(kid)] = load_public_key(str(pem).encode(), f"manifest key {kid}")
    return keys


def verify_export(
    manifest_path: Path, public_keys: PublicKeys, *, progress: Progress | None = None
) -> VerifyReport:
    """Re-derive an export from its files: every record, every checkpoint, the
    anchor that vouches for its start, the data file's digest."""
    started = time.perf_counter()
    manifest = read_manifest(manifest_path)
    try:
        algorithm = str(manifest["algorithm"])
        first, last = _int(manifest["first_seq"]), _int(manifest["last_seq"])
        prev_hash = bytes.fromhex(manifest["prev_hash"])
        data_path = manifest_path.parent / Path(str(manifest["data_file"])).name
        fmt = str(manifest["data_format"])
        expected_digest = str(manifest["data_sha256"])
        cps = [checkpoint_from_json(c, "manifest") for c in manifest["checkpoints"]]
        anchor_data = manifest.get("anchor_checkpoint")
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{manifest_path}: incomplete manifest ({exc})") from exc
    if fmt not in ("jsonl", "csv"):
        raise AuditError(f"{manifest_path}: unknown data format {fmt!r}")
    if not data_path.is_file():
        raise AuditError(f"the data file {data_path} is missing")
    early: Problem | None = None
    if first == 1:
        if prev_hash != GENESIS:
            early = Problem(1, "altered", "an export from seq 1 must start from the genesis hash")
    elif anchor_data is None:
        early = Problem(first, "checkpoint", f"no signed checkpoint vouches for the chain before seq {first}")
    else:
        anchor = checkpoint_from_json(anchor_data, "manifest anchor")
        key = public_keys.get(anchor.key_id)
        if anchor.last_seq != first - 1 or anchor.chain_head != prev_hash:
            early = Problem(first, "checkpoint", f"the anchor checkpoint does not end at seq {first - 1}")
        elif key is None:
            early = Problem(first, "checkpoint", f"anchor checkpoint: unknown key id {anchor.key_id!r}")
        elif not anchor.verify(key):
            early = Problem(first, "checkpoint", "anchor checkpoint: bad signature")
    try:
        verifier = Verifier(
            algorithm, checkpoints=cps, public_keys=public_keys, first_seq=first, prev_hash=prev_hash
        )
    except ValueError as exc:
        raise AuditError(f"{manifest_path}: {exc}") from exc
    problem: Problem | None = None
    count = 0
    with _no_gc():
        for number, item in _read_records(data_path, fmt):
            seq = verifier.last_seq + 1
            if isinstance(item, str):
                problem = Problem(seq, "altered", f"line {number} of {data_path.name} cannot be read: {item}")
                break
            try:
                record = _record_from_public(item)
                stored = bytes.fromhex(str(item.get("hash")))
            except (KeyError, TypeError, ValueError) as exc:
                problem = Problem(seq, "altered", f"line {number}: {exc}")
                break
            count += 1
            if (problem := verifier.feed(record, stored)) is not None:
                break
            if progress is not None and count % CHUNK == 0:
                progress(count, last - first + 1)
    if problem is None:
        problem = verifier.finish()
    if problem is None and verifier.last_seq < last:
        problem = Problem(verifier.last_seq + 1, "missing", f"the data ends at seq {verifier.last_seq}")
    if problem is None and verifier.last_seq > last:
        problem = Problem(last + 1, "inserted", f"the data goes on past the manifest's last seq {last}")
    if problem is None and _sha256_of(data_path) != expected_digest:
        problem = Problem(first, "altered", "the data file's SHA-256 does not match the manifest")
    problem = _first(problem, early)
    signed = max((cp.last_seq for cp in cps if cp.last_seq <= last), default=first - 1)
    return VerifyReport(
        ok=problem is None,
        source=str(manifest_path),
        algorithm=algorithm,
        records=verifier.last_seq - first + 1,
        checkpoints=_count_checked(cps, verifier.last_seq, problem),
        first_seq=first,
        last_seq=last,
        unsigned_tail=max(0, last - signed),
        problem=problem,
        seconds=time.perf_counter() - started,
    )


# -- inclusion proofs ------------------------------------------------------------


async def prove(engine: AsyncEngine, call_id: str, public_keys: PublicKeys | None = None) -> dict[str, Any]:
    """The inclusion proof of one call against its signed checkpoint."""
    async with _snapshot(engine) as conn:
        row = (await conn.execute(select(_CALLS).where(_CALLS.c.call_id == call_id))).first()
        if row is None:
            raise NotFoundError(f"no call {call_id}")
        seq = int(row.seq)
        cp_row = (
            await conn.execute(
                select(_CHECKPOINTS).where(_CHECKPOINTS.c.first_seq <= seq, _CHECKPOINTS.c.last_seq >= seq)
            )
        ).first()
        if cp_row is None:
            raise AuditError(
                f"call {call_id} (seq {seq}) is not under a signed checkpoint yet; "
                "checkpoints are cut every few seconds: try again shortly"
            )
        try:
            cp = checkpoint_of(cp_row)
        except (TypeError, ValueError) as exc:
            raise AuditError(
                f"the checkpoint covering seq {seq} is unreadable: run 'pdg audit verify'"
            ) from exc
        interval = (
            await conn.execute(
                select(*(_CALLS.c[c] for c in FIELDS))
                .where(_CALLS.c.seq >= cp.first_seq, _CALLS.c.seq <= cp.last_seq)
                .order_by(_CALLS.c.seq)
            )
        ).all()
        pem = None
        if public_keys is not None and cp.key_id in public_keys:
            pem = public_pem(public_keys[cp.key_id])
        else:
            pem = await conn.scalar(select(_KEYS.c.public_pem).where(_KEYS.c.key_id == cp.key_id))
    chain = Chain(cp.algorithm)
    damaged = AuditError(
        f"the ledger around seq {seq} does not match checkpoint {cp.first_seq}..{cp.last_seq}: "
        "run 'pdg audit verify'"
    )
    if [r.seq for r in interval] != list(range(cp.first_seq, cp.last_seq + 1)):
        raise damaged
    try:
        leaves = [chain.leaf_hash(canonical(dict(r._mapping))) for r in interval]
    except (TypeError, ValueError) as exc:
        raise damaged from exc
    if chain.root_of_hashes(leaves) != cp.merkle_root:
        raise damaged
    index = seq - cp.first_seq
    record = public_json(row._mapping)
    return {
        "format": PROOF_FORMAT,
        "algorithm": cp.algorithm,
        "call_id": call_id,
        "seq": seq,
        "record": record,
        "leaf_data": canonical({name: row._mapping[name] for name in FIELDS}).decode(),
        "leaf_index": index,
        "tree_size": len(leaves),
        "audit_path": [h.hex() for h in chain.path_of_hashes(leaves, index)],
        "merkle_root": cp.merkle_root.hex(),
        "checkpoint": checkpoint_json(cp),
        "public_key": {"key_id": cp.key_id, "pem": pem},
        "check": (
            "leaf = H(0x00 || leaf_data as UTF-8); fold audit_path per RFC 9162 2.1.3.2 to "
            "merkle_root; the checkpoint's signature (ECDSA P-256/SHA-256, DER) covers its "
            "sorted-key JSON payload including merkle_root; leaf_data is the sorted-key "
            "compact JSON of record without hash and charge_fen"
        ),
    }


@dataclass(frozen=True, slots=True)
class ProofCheck:
    ok: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason}


def check_proof(proof: Mapping[str, Any], public_key: ec.EllipticCurvePublicKey) -> ProofCheck:
    """Whether ``proof`` shows its record is in the ledger, signed by ``public_key``."""
    try:
        if proof.get("format") != PROOF_FORMAT:
            return ProofCheck(False, f"not a pdg inclusion proof ({PROOF_FORMAT})")
        cp = checkpoint_from_json(proof["checkpoint"], "checkpoint")
        leaf_data = str(proof["leaf_data"]).encode()
        record = _record_from_public(proof["record"])
        seq, index, size = _int(proof["seq"]), _int(proof["leaf_index"]), _int(proof["tree_size"])
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        root = bytes.fromhex(proof["merkle_root"])
        algorithm = str(proof["algorithm"])
    except (AuditError, KeyError, TypeError, ValueError) as exc:
        return ProofCheck(False, f"malformed proof: {exc}")
    if not cp.verify(public_key):
        return ProofCheck(False, "the checkpoint's signature does not verify with this key")
    if cp.algorithm != algorithm or root != cp.merkle_root:
        return ProofCheck(False, "the proof's root or algorithm is not the signed checkpoint's")
    if record.get("seq") != seq or record.get("call_id") != proof.get("call_id"):
        return ProofCheck(False, "the record is not the call the proof names")
    if canonical(record) != leaf_data:
        return ProofCheck(False, "the record does not match the proved leaf data")
    if not (cp.first_seq <= seq <= cp.last_seq and index == seq - cp.first_seq):
        return ProofCheck(False, "the record's seq is not at the proved leaf index")
    if size != cp.last_seq - cp.first_seq + 1:
        return ProofCheck(False, "the tree size is not the checkpoint's interval")
    if not Chain(algorithm).verify_inclusion(leaf_data, index, size, path, root):
        return ProofCheck(False, "the audit path does not lead to the signed Merkle root")
    return ProofCheck(
        True,
        f"call {record['call_id']} is record {seq}, inside checkpoint {cp.first_seq}..{cp.last_seq} "
        f"signed by {cp.key_id}",
    )


def proof_key(proof: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    """The key carried in a proof (trust it only if you got it some other way)."""
    pem = (proof.get("public_key") or {}).get("pem")
    if not pem:
        raise AuditError("the proof carries no public key; give --public-key")
    return load_public_key(str(pem).encode(), "the proof's key")


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
