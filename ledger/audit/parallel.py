"""Verifying a large PostgreSQL ledger on several cores.

One process reads the rows, then hashes them, one after the other, its own
CPU the bound (the PostgreSQL backend's is a third of it). So a large
ledger is cut into pieces at checkpoint boundaries, each verified on its own
from the signed chain head of the checkpoint before it: the piece before
closes that checkpoint itself, so together the pieces check exactly what one
pass would, and the first problem is the one in the lowest piece.

This process and its children (:func:`ledger.segment.child_main`, one fewer
than the processes asked for, each reading the same snapshot,
pg_export_snapshot) take the pieces in order as they come free, a child always
holding the next one so that it never waits for this process to answer. The
pieces shrink towards the end (a quarter of what is left over the processes,
down to :data:`PIECE_MIN_RECORDS`; guided self-scheduling), so that the processes
finish within a small piece of each other however unevenly the machine ran
them: with two halves fixed in advance, the child, started 0.2 s later, ended
0.1-0.4 s after this process, a tenth of a million records' verify.

A child that fails leaves its pieces to the others (this process takes any);
nothing already verified is done twice.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.audit.common import PublicKeys
from ledger.audit.scan import _scan_postgres
from ledger.chain import GENESIS, Checkpoint, Problem, ProblemKind, Verifier
from ledger.segment import NO_END, Scanned
from ledger.store import public_pem

#: Ledgers smaller than this are verified in one process (a child takes ~0.2 s to start).
PARALLEL_MIN_RECORDS: Final = 100_000
MAX_SEGMENTS: Final = 4
#: The smallest piece (~0.1 s of one core); smaller ledgers are cut finer.
PIECE_MIN_RECORDS: Final = 20_000
#: Pieces a child holds: the one it verifies and the next.
_HELD: Final = 2
#: What a child runs: the entry point by its module path (``sys.path`` is passed on).
_CHILD = "from ledger.segment import child_main; child_main()"

log = logging.getLogger("ledger.audit")


def _split_points(cps: Sequence[Checkpoint], last: int, processes: int) -> list[Checkpoint]:
    """The checkpoints to cut after: pieces of a quarter of what is left over
    ``processes``, at least ``PIECE_MIN_RECORDS`` (or a 32nd of the ledger per
    process, if less), each ending at the first checkpoint that makes it that
    long. None unless the checkpoints tile the ledger (otherwise one pass says
    why)."""
    expected = 1
    for cp in cps:
        if cp.first_seq != expected:
            return []
        expected = cp.last_seq + 1
    inner = [cp for cp in cps if cp.last_seq < last]
    ends = [cp.last_seq for cp in inner]
    smallest = max(1, min(PIECE_MIN_RECORDS, last // (32 * processes)))
    cuts: list[Checkpoint] = []
    done = 0
    while (at := bisect.bisect_left(ends, done + max(smallest, (last - done) // (4 * processes)))) < len(
        ends
    ):
        cuts.append(inner[at])
        done = inner[at].last_seq
    return cuts


@dataclass(frozen=True, slots=True)
class _Piece:
    first: int
    until: int
    prev_hash: bytes
    checkpoints: list[Checkpoint]

    def job(self) -> dict[str, Any]:
        return {
            "first_seq": self.first,
            "until": self.until,
            "prev_hash": self.prev_hash.hex(),
            "checkpoints": [cp.as_json() for cp in self.checkpoints],
        }


def _pieces(cps: Sequence[Checkpoint], cuts: Sequence[Checkpoint]) -> list[_Piece]:
    starts = [1, *(cut.last_seq + 1 for cut in cuts)]
    ends = [*starts[1:], NO_END]
    heads = [GENESIS, *(cut.chain_head for cut in cuts)]
    return [
        _Piece(first, until, head, [cp for cp in cps if first <= cp.first_seq and cp.last_seq < until])
        for first, until, head in zip(starts, ends, heads, strict=True)
    ]


class _Child:
    """One child process, the pieces it holds (in the order it answers them),
    and the rows it has reported."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.held: list[int] = []
        self.rows = 0
        self.said = ""

    def give(self, index: int, piece: _Piece) -> bool:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing() or self.process.returncode is not None:
            return False
        stdin.write(json.dumps(piece.job()).encode() + b"\n")
        self.held.append(index)
        return True

    def release(self) -> None:
        """No more pieces: the child ends after the ones it holds."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()

    async def reason(self) -> str:
        """Why the child stopped, in one line."""
        errors = await self.process.stderr.read() if self.process.stderr is not None else b""
        await self.process.wait()
        lines = errors.decode(errors="replace").strip().splitlines()
        return self.said or (lines[-1] if lines else f"exit status {self.process.returncode}")


def _scanned(answer: str) -> Scanned:
    data = json.loads(answer)
    found = data["problem"]
    problem = None if found is None else Problem(int(found[0]), cast(ProblemKind, found[1]), str(found[2]))
    return Scanned(problem, int(data["last_seq"]), bytes.fromhex(data["head"]))


class _Run:
    """The pieces of one parallel verify: which are waiting, which are done."""

    def __init__(self, pieces: list[_Piece], progress: Callable[[int], None]) -> None:
        self.pieces = pieces
        self.waiting = list(range(len(pieces)))  # a heap: the lowest piece goes first
        self.results: dict[int, Scanned] = {}
        self.changed = asyncio.Event()
        self.children: list[_Child] = []
        self.own_rows = 0
        #: Set when the verdict is in: children still running are stopped, not failed.
        self.over = False
        self._progress = progress

    def report(self) -> None:
        self._progress(self.own_rows + sum(child.rows for child in self.children))

    @property
    def first_problem(self) -> int:
        """The lowest piece known to hold a problem (the number of pieces if none)."""
        return min((i for i, s in self.results.items() if s.problem is not None), default=len(self.pieces))

    def take(self) -> int | None:
        """The next piece worth verifying: none after a piece with a problem."""
        while self.waiting:
            index = heapq.heappop(self.waiting)
            if index < self.first_problem:
                return index
        return None

    def done(self) -> bool:
        return all(i in self.results for i in range(self.first_problem))

    def record(self, index: int, scanned: Scanned) -> None:
        self.results[index] = scanned
        self.changed.set()

    def feed(self, child: _Child) -> None:
        while len(child.held) < _HELD and (index := self.take()) is not None:
            if not child.give(index, self.pieces[index]):
                heapq.heappush(self.waiting, index)
                return
        if not child.held:
            child.release()

    async def listen(self, child: _Child) -> None:
        """Read a child's lines until it ends; what it still held when it ended
        goes back to be verified by another."""
        stdout = child.process.stdout
        try:
            if stdout is not None:
                async for line in stdout:
                    kind, _, rest = line.decode().rstrip("\n").partition(" ")
                    if kind == "P":
                        child.rows += int(rest)
                        self.report()
                    elif kind == "R" and child.held:
                        self.record(child.held.pop(0), _scanned(rest))
                        self.feed(child)
                    elif kind == "E":
                        child.said = rest
        finally:
            if child.held and not self.over:
                for index in child.held:
                    heapq.heappush(self.waiting, index)
                child.held.clear()
                reason = await child.reason()
                log.warning("a verifying child failed, its records are verified here: %s", reason)
            self.changed.set()

    def verdict(self) -> Scanned:
        scanned = self.results[0]
        for index in range(len(self.pieces)):
            theirs = self.results[index]
            if theirs.problem is not None:
                return theirs
            if theirs.last_seq >= self.pieces[index].first:  # an empty last piece leaves the head
                scanned = theirs
        return scanned


async def _verify_parallel(
    conn: AsyncConnection,
    algorithm: str,
    cps: list[Checkpoint],
    keys: PublicKeys,
    cuts: list[Checkpoint],
    progress: Callable[[int], None],
    processes: int,
) -> Scanned:
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    snapshot = await driver.fetchval("SELECT pg_export_snapshot()")
    setup = {
        "dsn": conn.engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
        "snapshot": snapshot,
        "algorithm": algorithm,
        "keys": {kid: public_pem(key) for kid, key in keys.items()},
    }
    # The children import what we imported, from where we imported it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = _Run(_pieces(cps, cuts), progress)
    listening: list[asyncio.Task[None]] = []

    def tick(rows: int) -> bool:
        run.own_rows += rows
        run.report()
        return True

    try:
        for _ in range(min(processes, len(run.pieces)) - 1):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CHILD,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            child = _Child(process)
            if process.stdin is not None:
                process.stdin.write(json.dumps(setup).encode() + b"\n")
            run.children.append(child)
            run.feed(child)
            listening.append(asyncio.create_task(run.listen(child)))
        while not run.done():
            index = run.take()
            if index is None:
                run.changed.clear()
                if not run.done():
                    await run.changed.wait()
                continue
            piece = run.pieces[index]
            verifier = Verifier(
                algorithm,
                checkpoints=piece.checkpoints,
                public_keys=keys,
                first_seq=piece.first,
                prev_hash=piece.prev_hash,
            )
            run.record(index, await _scan_postgres(driver, verifier, piece.first, piece.until, tick))
        return run.verdict()
    finally:
        run.over = True
        for child in run.children:
            if child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
        run.report()
