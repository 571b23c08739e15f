"""Streaming the ``calls`` rows, in ``seq`` order, through a :class:`Verifier`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.audit.common import _CALLS, CHUNK, AuditError, _no_gc
from ledger.chain import Problem, Verifier
from ledger.record import FIELDS, TIME_FIELDS

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
