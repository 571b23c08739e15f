"""Verifying the ledger in the database: one pass (or segments on several
cores), then what the rows alone cannot show.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.audit.common import (
    _CALLS,
    _CHECKPOINTS,
    _STATE,
    AuditError,
    Progress,
    PublicKeys,
    VerifyReport,
    _checkpoints,
    _count_checked,
    _first,
    _snapshot,
)
from ledger.audit.parallel import MAX_SEGMENTS, PARALLEL_MIN_RECORDS, _split_points, _verify_parallel
from ledger.audit.scan import NO_END, Scanned, _scan_postgres, _scan_sqlite
from ledger.chain import GENESIS, Chain, Problem, Verifier, canonical
from ledger.partitions import PARTITIONS
from ledger.record import FIELDS

#: How far around a misfit record to look for the place it was moved from.
_MOVED_WINDOW: Final = timedelta(minutes=5)
_MOVED_CANDIDATES: Final = 50_000


async def verify(
    engine: AsyncEngine,
    public_keys: PublicKeys,
    *,
    progress: Progress | None = None,
    parallel_min: int = PARALLEL_MIN_RECORDS,
    segments: int | None = None,
    since: int | None = None,
) -> VerifyReport:
    """Re-derive the whole ledger and report the first problem, if any.

    ``since``: start after the checkpoint that ends at this seq, trusting its
    chain head once its signature verifies with ``public_keys``. Without it,
    from seq 1, or after the last archived partition (its records are gone
    from the database; their export verifies on its own).

    ``progress(done, total)`` is called after each chunk of rows. A PostgreSQL
    ledger of ``parallel_min`` records or more is verified in pieces by
    ``segments`` processes (default: one per core, at most :data:`MAX_SEGMENTS`;
    see :mod:`ledger.audit.parallel`).
    """
    started = time.perf_counter()
    async with _snapshot(engine) as conn:
        state = (await conn.execute(select(_STATE))).first()
        cp_rows = (await conn.execute(select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.first_seq))).all()
        algorithm = state.algorithm if state is not None else "sha256"
        last = state.next_seq - 1 if state is not None else 0
        cps, early = _checkpoints(cp_rows, algorithm)
        kept = PARTITIONS.c
        archived = int(
            await conn.scalar(select(func.max(kept.last_seq)).where(kept.archived_at.is_not(None))) or 0
        )
        after = archived if since is None else since
        if after < archived:
            raise AuditError(
                f"the records up to seq {archived} are archived: verify them from their exports "
                f"('pdg audit verify --export'), and here --since {archived} or later"
            )
        prev_hash, anchor_problem = GENESIS, None
        if after:
            anchor = next((cp for cp in cps if cp.last_seq == after), None)
            if anchor is None:
                raise AuditError(
                    f"no checkpoint ends at seq {after}: --since takes the last seq of a checkpoint"
                )
            key = public_keys.get(anchor.key_id)
            if key is None:
                anchor_problem = Problem(
                    after + 1,
                    "checkpoint",
                    f"the checkpoint ending at seq {after}: unknown key id {anchor.key_id!r}",
                )
            elif not anchor.verify(key):
                anchor_problem = Problem(
                    after + 1, "checkpoint", f"the checkpoint ending at seq {after}: bad signature"
                )
            prev_hash = anchor.chain_head
            cps = [cp for cp in cps if cp.first_seq > after]
        try:
            verifier = Verifier(
                algorithm, checkpoints=cps, public_keys=public_keys, first_seq=after + 1, prev_hash=prev_hash
            )
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
        cuts = (
            _split_points(cps, last, parts)
            if postgres and not after and last >= parallel_min and parts > 1
            else []
        )
        if cuts:
            scanned = await _verify_parallel(conn, algorithm, cps, public_keys, cuts, report, parts)
        elif postgres:
            raw = await conn.get_raw_connection()
            scanned = await _scan_postgres(raw.driver_connection, verifier, after + 1, NO_END, tick)
        else:
            scanned = await _scan_sqlite(conn, verifier, tick, after + 1)
        problem = await _tail(conn, scanned, state, last)
        if problem is not None and problem.kind == "altered":
            problem = await _diagnose(conn, problem, scanned.head, last, state)
    problem = _first(early, anchor_problem, problem)
    signed = max((cp.last_seq for cp in cps if cp.last_seq <= last), default=after)
    records = (problem.seq - 1 if problem is not None else scanned.last_seq) - after
    return VerifyReport(
        ok=problem is None,
        source="database",
        algorithm=algorithm,
        records=max(0, records),
        checkpoints=_count_checked(cps, records, problem),
        first_seq=after + 1,
        last_seq=last,
        unsigned_tail=max(0, last - signed),
        problem=problem,
        seconds=time.perf_counter() - started,
    )


async def _tail(conn: AsyncConnection, scanned: Scanned, state: Any, last: int) -> Problem | None:
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
