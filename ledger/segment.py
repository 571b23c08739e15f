"""Re-deriving the ``calls`` rows of a PostgreSQL ledger, in ``seq`` order, fast.

The scan ``pdg audit verify`` runs on PostgreSQL, and the child process that
runs it over one segment of a large ledger (:mod:`ledger.audit.parallel`). It
imports only asyncpg and the pure chain code: a child that imported
:mod:`ledger.audit` (SQLAlchemy and the rest) took half a second to start,
a tenth of a whole verify of a million records.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import asyncpg
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ledger.chain import Checkpoint, Problem, Verifier
from ledger.record import FIELDS, TIME_FIELDS

#: Rows per fetch.
CHUNK: Final = 20_000
#: ``until`` for a scan to the end.
NO_END: Final = 2**63 - 1
#: Scanned columns: the fields in sorted order (orjson's key sort is a third
#: cheaper over a dict already in order), then ``hash``.
SORTED_FIELDS: Final = tuple(sorted(FIELDS))
#: The row stream, ``$1 <= seq < $2``; times as ISO text in UTC (DateStyle ISO
#: is set first), which ``fromisoformat`` reads for a third of what asyncpg's own
#: timestamp decoding costs.
_SCAN: Final = "SELECT {} FROM calls WHERE seq >= $1 AND seq < $2 ORDER BY seq".format(  # noqa: S608
    ", ".join(f"{c}::text || '+00' AS {c}" if c in TIME_FIELDS else c for c in (*SORTED_FIELDS, "hash"))
)
#: Set in the scan's transaction (and reset after it, for the queries that
#: follow in the same transaction): the rows must stream in ``seq`` order from
#: the primary key. Without statistics (a table just loaded, not yet analysed)
#: the planner expects a few hundred rows for ``$1 <= seq < $2`` and picks a
#: bitmap scan and a sort, which for a whole ledger spills to disk and costs
#: the server more than the index scan. Turning those plans off leaves the
#: index scan.
_SETTINGS: Final = "; ".join(
    (
        "SET LOCAL DateStyle = 'ISO, YMD'",
        "SET LOCAL enable_sort = off",
        "SET LOCAL enable_bitmapscan = off",
        "SET LOCAL enable_seqscan = off",
    )
)
_RESET: Final = "RESET enable_sort; RESET enable_bitmapscan; RESET enable_seqscan"
#: What the driver raises when the database or the connection fails.
_DATABASE_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError)
_SNAPSHOT_ID: Final = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")


class ScanError(Exception):
    """The database failed the scan (a one-line reason)."""


@dataclass(frozen=True, slots=True)
class Scanned:
    """How far one scan got: its first problem, or the last seq and chain entry."""

    problem: Problem | None
    last_seq: int
    head: bytes


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Hold the cyclic collector off: a scan makes millions of short-lived
    dicts and no cycles, and generation sweeps would cost a good part of it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _row_builder() -> Callable[[Sequence[Any]], tuple[dict[str, Any], str]]:
    """A function of one scanned row to ``(record, stored hash hex)``, the times
    parsed, written out for :data:`SORTED_FIELDS` (as :mod:`dataclasses` writes
    its ``__init__``): a dict display with constant keys is built presized in
    one step, cheaper than ``dict(zip(...))`` and assignments."""
    names = [f"v{i}" for i in range(len(SORTED_FIELDS))]
    values = ", ".join(
        f"{field!r}: fromiso({name})" if field in TIME_FIELDS else f"{field!r}: {name}"
        for field, name in zip(SORTED_FIELDS, names, strict=True)
    )
    source = f"def build(row):\n    {', '.join(names)}, stored = row\n    return {{{values}}}, stored\n"
    scope: dict[str, Any] = {"fromiso": datetime.fromisoformat}
    exec(compile(source, f"<{__name__} row builder>", "exec"), scope)  # noqa: S102 (source built from constants)
    return cast(Callable[[Sequence[Any]], tuple[dict[str, Any], str]], scope["build"])


_build: Final = _row_builder()


def _slow_record(row: Sequence[Any]) -> dict[str, Any]:
    """A row whose time a datetime cannot hold (a year PostgreSQL can store and
    Python cannot, or no time at all): that time stays as it came, so the record
    cannot re-derive."""
    record = dict(zip(SORTED_FIELDS, row, strict=False))
    for name in TIME_FIELDS:
        with contextlib.suppress(TypeError, ValueError):
            record[name] = datetime.fromisoformat(record[name])
    return record


def _records(rows: Sequence[Sequence[Any]]) -> Iterator[tuple[dict[str, Any], bytes]]:
    """``(record, stored hash)`` of each row, times parsed back into UTC datetimes."""
    build, fromhex = _build, bytes.fromhex
    for row in rows:
        try:
            record, hexed = build(row)
        except (TypeError, ValueError):
            record, hexed = _slow_record(row), row[-1]
        try:
            stored = fromhex(hexed)
        except (TypeError, ValueError):
            stored = b""
        yield record, stored


async def scan_postgres(
    driver: Any, verifier: Verifier, first: int, until: int, tick: Callable[[int], bool]
) -> Scanned:
    """Feed rows ``first <= seq < until`` through an asyncpg cursor (inside the
    caller's transaction). ``tick(rows)`` after each chunk; False stops."""
    problem = None
    try:
        await driver.execute(_SETTINGS)
        cursor = await driver.cursor(_SCAN, first, until)
        with no_gc():
            while rows := await cursor.fetch(CHUNK):
                problem = verifier.feed_many(_records(rows))
                if problem is not None or not tick(len(rows)):
                    break
        await driver.execute(_RESET)
    except _DATABASE_ERRORS as exc:
        raise ScanError(f"database: {exc}") from exc
    return Scanned(problem or verifier.finish(), verifier.last_seq, verifier.head)


def _public_key(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except UnsupportedAlgorithm as exc:
        raise ValueError(f"unsupported key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("ledger keys are EC P-256")
    return key


async def verify_pieces(
    setup: dict[str, Any],
    pieces: Callable[[], Awaitable[dict[str, Any] | None]],
    tick: Callable[[int], bool],
    answer: Callable[[Scanned], None],
) -> None:
    """The pieces of a parallel verify handed to one child, as
    :mod:`ledger.audit.parallel` describes them: ``setup`` names the database,
    the exported snapshot to read, the algorithm and the trusted public keys
    (PEM); each piece from ``pieces()`` (None: no more) its range, the
    checkpoints inside it and the chain entry it starts from. Each piece's
    verdict goes to ``answer`` in the order the pieces came."""
    snapshot = str(setup["snapshot"])
    if not _SNAPSHOT_ID.match(snapshot):
        raise ScanError(f"unexpected snapshot id {snapshot!r}")
    algorithm = setup["algorithm"]
    keys = {kid: _public_key(pem) for kid, pem in setup["keys"].items()}
    try:
        driver = await asyncpg.connect(setup["dsn"])
    except _DATABASE_ERRORS as exc:
        raise ScanError(f"database: {exc}") from exc
    try:
        async with driver.transaction(isolation="repeatable_read", readonly=True):
            await driver.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            while (piece := await pieces()) is not None:
                first, until = int(piece["first_seq"]), int(piece["until"])
                verifier = Verifier(
                    algorithm,
                    checkpoints=[Checkpoint.from_json(cp) for cp in piece["checkpoints"]],
                    public_keys=keys,
                    first_seq=first,
                    prev_hash=bytes.fromhex(piece["prev_hash"]),
                )
                answer(await scan_postgres(driver, verifier, first, until, tick))
    except _DATABASE_ERRORS as exc:
        raise ScanError(f"database: {exc}") from exc
    finally:
        await driver.close()


def child_main() -> None:
    """A child process of a parallel verify: on stdin a line of JSON with the
    setup, then a line per piece; on stdout ``P <rows>`` progress lines and an
    ``R <json>`` line per piece, or ``E <reason>`` and exit status 1. It ends
    when stdin does."""
    read = sys.stdin.buffer.readline

    async def pieces() -> dict[str, Any] | None:
        line = await asyncio.to_thread(read)
        return json.loads(line) if line.strip() else None

    def tick(rows: int) -> bool:
        sys.stdout.write(f"P {rows}\n")
        sys.stdout.flush()
        return True

    def answer(scanned: Scanned) -> None:
        p = scanned.problem
        result = {
            "problem": None if p is None else [p.seq, p.kind, p.reason],
            "last_seq": scanned.last_seq,
            "head": scanned.head.hex(),
        }
        sys.stdout.write(f"R {json.dumps(result)}\n")
        sys.stdout.flush()

    try:
        asyncio.run(verify_pieces(json.loads(read()), pieces, tick, answer))
    except (ScanError, OSError, ValueError, TypeError, KeyError) as exc:
        sys.stdout.write(f"E {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")
        sys.exit(1)
