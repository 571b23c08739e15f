"""Verifying a large PostgreSQL ledger on several cores.

One process reads the rows, then hashes them, one after the other (~8 us of
its own CPU per record, and ~2.5 us of the PostgreSQL backend's). So a large
ledger is cut into segments at checkpoint boundaries; child processes
(:func:`ledger.segment.child_main`) verify all but the first, each from the same
snapshot (pg_export_snapshot), starting from the signed chain head of the
checkpoint before its segment. The segment before closes that checkpoint
itself, so together the segments check exactly what one pass would; the
first problem is the lowest-numbered one any segment found.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.audit.common import AuditError, PublicKeys
from ledger.audit.scan import _scan_postgres
from ledger.chain import Checkpoint, Problem, ProblemKind, Verifier
from ledger.segment import NO_END, Scanned
from ledger.store import public_pem

#: Ledgers smaller than this are verified in one process (a child takes ~0.15 s to start).
PARALLEL_MIN_RECORDS: Final = 100_000
MAX_SEGMENTS: Final = 4
#: What a child runs: the entry point by its module path (``sys.path`` is passed on).
_CHILD = "from ledger.segment import child_main; child_main()"


class _ChildFailedError(AuditError):
    """A verifying child process could not do its part (one pass will)."""


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

    async def result(self) -> Scanned:
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
        return Scanned(problem, int(data["last_seq"]), bytes.fromhex(data["head"]))


async def _verify_parallel(
    conn: AsyncConnection,
    algorithm: str,
    cps: list[Checkpoint],
    keys: PublicKeys,
    cuts: list[Checkpoint],
    progress: Callable[[int], None],
) -> Scanned:
    import sys

    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    snapshot = await driver.fetchval("SELECT pg_export_snapshot()")
    dsn = conn.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    pems = {kid: public_pem(key) for kid, key in keys.items()}
    starts = [cut.last_seq + 1 for cut in cuts]
    ends = [*starts[1:], NO_END]
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
                "checkpoints": [cp.as_json() for cp in cps if first <= cp.first_seq and cp.last_seq < until],
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
