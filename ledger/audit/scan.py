"""Streaming the ``calls`` rows, in ``seq`` order, through a :class:`Verifier`
(PostgreSQL: :mod:`ledger.segment`; SQLite: here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.audit.common import _CALLS, AuditError
from ledger.chain import Verifier
from ledger.segment import CHUNK, NO_END, SORTED_FIELDS, ScanError, Scanned, no_gc, scan_postgres

__all__ = ["NO_END", "Scanned", "_scan_postgres", "_scan_sqlite"]

#: Scanned columns: the fields in sorted order, then ``hash``.
_SCANNED: Final = (*SORTED_FIELDS, "hash")


async def _scan_postgres(
    driver: Any, verifier: Verifier, first: int, until: int, tick: Callable[[int], bool]
) -> Scanned:
    try:
        return await scan_postgres(driver, verifier, first, until, tick)
    except ScanError as exc:
        raise AuditError(str(exc)) from exc


def _records(rows: Sequence[Sequence[Any]]) -> Any:
    fromhex, fields = bytes.fromhex, SORTED_FIELDS
    for row in rows:
        try:
            stored = fromhex(row[-1])
        except (TypeError, ValueError):
            stored = b""
        yield dict(zip(fields, row, strict=False)), stored


async def _scan_sqlite(
    conn: AsyncConnection, verifier: Verifier, tick: Callable[[int], bool], first: int = 1
) -> Scanned:
    problem = None
    result = await conn.stream(
        select(*(_CALLS.c[c] for c in _SCANNED)).where(_CALLS.c.seq >= first).order_by(_CALLS.c.seq)
    )
    with no_gc():
        async for rows in result.partitions(CHUNK):
            problem = verifier.feed_many(_records(rows))
            if problem is not None or not tick(len(rows)):
                break
    await result.close()
    return Scanned(problem or verifier.finish(), verifier.last_seq, verifier.head)
