"""The call record in partitions, one per period, on PostgreSQL.

``calls`` is partitioned by range of ``seq``. The records the writer is
adding go into the open partition (``calls_open``, the default partition);
the first record whose ``time`` falls in a later period (in the billing time
zone) closes it: the batch is cut there, a checkpoint signs every record
before it, and the open partition becomes ``calls_pYYYY_MM`` with the range
of seqs it holds, attached in the same transaction as the records after the
cut. So a partition is a contiguous run of seqs that starts and ends at a
checkpoint: it can be exported, verified and archived alone.

Partition ``P`` holds the records from the first one timed in ``P`` (or the
first record of the ledger) up to the first one timed after ``P``. Records
are ordered by when the writer took them, not by their times, so a call that
ended a few milliseconds before midnight on one replica may be written just
after the first call of the new period: it then lies in the next partition.
Every record of partition ``P`` is of a billing period up to ``P``.

Closing a partition validates its range with one scan of it (``CHECK``),
under a lock that holds other writers and readers of ``calls`` for that
time: a few seconds a month for millions of records.

``ledger_partitions`` lists them: period, seq range, when each was closed and
archived (:mod:`ledger.audit.archive`). SQLite ledgers are not partitioned.

A record's ``call_id`` is unique in its partition (a unique index on the
open one); the writer looks up the earlier partitions for the records that
could repeat one written there: those whose call started before the open
partition began (plus a margin for clock skew between replicas).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.models import LedgerPartitionRow

PARTITIONS: Final = cast(Table, LedgerPartitionRow.__table__)
OPEN: Final = "calls_open"
#: A repeat of a call already written can only come this long after the
#: open partition began (calls are bounded in time; the margin covers skew).
TWIN_MARGIN: Final = timedelta(minutes=15)
_PERIOD: Final = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


_PARTITION_TABLE: Final = re.compile(r"^calls_(open|p\d{4}_\d{2})$")


def in_models(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic's ``include_object`` for comparing the database with the
    models: the partitions of ``calls`` (and their indexes) are made by the
    writer, and on PostgreSQL a call id is unique per partition, not on the
    parent."""
    if type_ == "table" and name and _PARTITION_TABLE.match(name):
        return False
    table = getattr(obj, "table", None)
    if type_ in ("index", "unique_constraint") and table is not None and _PARTITION_TABLE.match(table.name):
        return False
    return not (type_ == "unique_constraint" and name == "uq_calls_call_id" and compare_to is None)


def table_of(period: str) -> str:
    """The table of a closed partition: ``calls_p2026_11``."""
    if not _PERIOD.match(period):
        raise ValueError(f"not a period: {period!r}")
    return "calls_p" + period.replace("-", "_")


def period_of_time(at: datetime, zone: ZoneInfo) -> str:
    return at.astimezone(zone).strftime("%Y-%m")


@dataclass(slots=True)
class OpenPartition:
    #: The period it is for (``None``: not known yet, no record written).
    period: str | None
    first_seq: int
    #: When the first record in it was made (its ``time``).
    opened_at: datetime | None
    #: Whether closed partitions precede it.
    after_others: bool

    def may_repeat(self, started_at: datetime) -> bool:
        """Whether a record of a call started then could repeat one written
        in an earlier partition."""
        return self.after_others and (self.opened_at is None or started_at < self.opened_at + TWIN_MARGIN)


async def load_open(conn: AsyncConnection) -> OpenPartition:
    """The open partition, as ``ledger_partitions`` and the records say."""
    p = PARTITIONS.c
    row = (await conn.execute(select(p.period, p.first_seq, p.opened_at).where(p.last_seq.is_(None)))).first()
    closed = (await conn.scalar(select(func.max(p.last_seq)))) or 0
    if row is not None:
        return OpenPartition(row.period, int(row.first_seq), row.opened_at, closed > 0)
    return OpenPartition(None, int(closed) + 1, None, closed > 0)


def cuts(open_: OpenPartition, rows: Sequence[dict[str, Any]], zone: ZoneInfo) -> list[tuple[int, str]]:
    """Where ``rows`` (in seq order) close partitions: ``(index, period)``
    of each row that opens a new one. The first row of a ledger names the
    open partition's period without a cut."""
    found: list[tuple[int, str]] = []
    current = open_.period
    for index, row in enumerate(rows):
        period = period_of_time(row["time"], zone)
        if current is None:
            current = period
        elif period > current:
            found.append((index, period))
            current = period
    return found


async def record_open(conn: AsyncConnection, open_: OpenPartition, period: str, opened_at: datetime) -> None:
    """Name the open partition's period (its first record is being written)."""
    await conn.execute(
        insert(PARTITIONS).values(period=period, first_seq=open_.first_seq, opened_at=opened_at)
    )
    open_.period, open_.opened_at = period, opened_at


async def close_open(
    conn: AsyncConnection,
    open_: OpenPartition,
    until_seq: int,
    period: str,
    opened_at: datetime,
    now: datetime,
) -> None:
    """Close the open partition at ``until_seq`` (its last record is
    ``until_seq - 1``) and open the next one, for ``period``."""
    closing = open_.period
    if closing is None:
        raise ValueError("the open partition has no period yet")
    table = table_of(closing)
    first = open_.first_seq
    for statement in (
        f"ALTER TABLE calls DETACH PARTITION {OPEN}",
        f"ALTER TABLE {OPEN} ADD CONSTRAINT {table}_seq CHECK (seq >= {first} AND seq < {until_seq})",
        f"ALTER TABLE {OPEN} RENAME TO {table}",
        f"ALTER TABLE calls ATTACH PARTITION {table} FOR VALUES FROM ({first}) TO ({until_seq})",
        f"CREATE TABLE {OPEN} PARTITION OF calls DEFAULT",
        f"CREATE UNIQUE INDEX ON {OPEN} (call_id)",
    ):
        await conn.execute(text(statement))
    await conn.execute(
        update(PARTITIONS).where(PARTITIONS.c.period == closing).values(last_seq=until_seq - 1, closed_at=now)
    )
    await conn.execute(insert(PARTITIONS).values(period=period, first_seq=until_seq, opened_at=opened_at))
    open_.period, open_.first_seq, open_.opened_at, open_.after_others = period, until_seq, opened_at, True
