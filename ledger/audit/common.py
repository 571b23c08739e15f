"""What the audit modules share: tables, the error, reports, snapshots and
the public (JSON) forms of records and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.errors import BadRequestError
from ledger.chain import GENESIS, LATER_KEYS, Checkpoint, Problem, rfc3339
from ledger.models import CallRow, CheckpointRow, LedgerKeyRow, LedgerStateRow
from ledger.record import FIELDS, TIME_FIELDS, public
from ledger.store import checkpoint_of

_CALLS = cast(Table, CallRow.__table__)
_STATE = cast(Table, LedgerStateRow.__table__)
_CHECKPOINTS = cast(Table, CheckpointRow.__table__)
_KEYS = cast(Table, LedgerKeyRow.__table__)

Progress = Callable[[int, int], None]
#: Ledger keys by id: ECDSA P-256 or SM2 public keys.
PublicKeys = Mapping[str, Any]


class AuditError(BadRequestError):
    """The audit tools cannot do what was asked (a one-line reason)."""


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


# -- records in their public form ------------------------------------------------


def public_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored record as the API and exports show it, JSON-ready."""
    data = public(row)
    for name in TIME_FIELDS:
        data[name] = rfc3339(data[name])
    return data


# -- checkpoints and records as JSON ----------------------------------------------


def checkpoint_from_json(data: Any, where: str) -> Checkpoint:
    try:
        return Checkpoint.from_json(data)
    except ValueError as exc:
        raise AuditError(f"{where}: not a checkpoint ({exc})") from exc


def _record_from_public(data: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed record back from its public (exported or proved) form."""
    # An export or proof from before a later key has none: it was not hashed.
    record: dict[str, Any] = {name: data.get(name) if name in LATER_KEYS else data[name] for name in FIELDS}
    for name in TIME_FIELDS:
        record[name] = datetime.fromisoformat(record[name])
    expected_fen = public({**record, "hash": ""})["charge_fen"]
    if data.get("charge_fen", expected_fen) != expected_fen:
        raise ValueError(f"charge_fen {data.get('charge_fen')!r} does not match charge_e4")
    return record


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
