"""The whole-log tree, read: signed C2SP checkpoints, RFC 9162 consistency
and inclusion proofs served from ``ledger_tree`` and the records
(``ledger.tree``), and the check ``pdg audit verify --witness`` runs, which
recomputes the tree from the records alone.

Every proof is read in one snapshot. A node of 256 leaves or more is read
from ``ledger_tree``; a smaller one is recomputed from its records. A proof
built from stored nodes that were tampered with does not verify against a
signed checkpoint, so serving them costs a verifier nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import Table, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.audit.common import _CALLS, _STATE, AuditError, _snapshot
from ledger.chain import Chain, canonical
from ledger.models import LogCheckpointRow, TreeNodeRow
from ledger.note import Checkpoint, NoteError, Verifier, b64, open_note
from ledger.record import hashed
from ledger.tree import (
    TILE,
    TILE_LEVEL,
    Node,
    complete_nodes,
    consistency_ranges,
    inclusion_ranges,
    subtree_hash,
)

_TREE = cast(Table, TreeNodeRow.__table__)
_LOG = cast(Table, LogCheckpointRow.__table__)
#: Records streamed per query while the tree is recomputed.
_STREAM = 5000


async def _algorithm(conn: AsyncConnection) -> str:
    algorithm = await conn.scalar(select(_STATE.c.algorithm))
    return str(algorithm or "sha256")


async def latest_checkpoint(engine: AsyncEngine) -> dict[str, Any] | None:
    """The newest signed checkpoint: ``size``, ``root`` (bytes), ``note``."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(_LOG).order_by(_LOG.c.size.desc()).limit(1))).first()
    if row is None:
        return None
    return {"size": int(row.size), "root": bytes.fromhex(row.root), "note": str(row.note)}


class _Nodes:
    """The complete subtrees a proof needs, read in one go."""

    def __init__(self, conn: AsyncConnection, chain: Chain) -> None:
        self.conn = conn
        self.chain = chain
        self.known: dict[Node, bytes] = {}

    async def load(self, nodes: Iterable[Node]) -> None:
        wanted = set(nodes) - set(self.known)
        stored = [n for n in wanted if n[0] >= TILE_LEVEL]
        if stored:
            rows = await self.conn.execute(
                select(_TREE).where(or_(*(and_(_TREE.c.level == lv, _TREE.c.idx == ix) for lv, ix in stored)))
            )
            for row in rows:
                self.known[(int(row.level), int(row.idx))] = bytes.fromhex(row.hash)
            missing = [n for n in stored if n not in self.known]
            if missing:
                raise AuditError(f"the whole-log tree lacks node {missing[0]}: run 'pdg audit verify'")
        small = [n for n in wanted if n[0] < TILE_LEVEL]
        for tile in sorted({(ix << lv) // TILE for lv, ix in small}):
            ends = [(ix + 1) << lv for lv, ix in small if (ix << lv) // TILE == tile]
            first = tile * TILE
            leaves = await self._leaves(first + 1, max(ends))
            for lv, ix in small:
                start = ix << lv
                if start // TILE == tile:
                    lo = start - first
                    self.known[(lv, ix)] = self.chain.root_of_hashes(leaves[lo : lo + (1 << lv)])

    async def _leaves(self, first_seq: int, last_seq: int) -> list[bytes]:
        rows = await self.conn.execute(
            select(_CALLS).where(_CALLS.c.seq.between(first_seq, last_seq)).order_by(_CALLS.c.seq)
        )
        leaves = [self.chain.leaf_hash(canonical(hashed(dict(r._mapping)))) for r in rows]
        if len(leaves) != last_seq - first_seq + 1:
            raise AuditError(f"records {first_seq}..{last_seq} are not all in the ledger")
        return leaves

    async def hashes(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        await self.load(n for start, end in ranges for n in complete_nodes(start, end))
        return [
            subtree_hash(self.chain, start, end, lambda lv, ix: self.known[(lv, ix)]) for start, end in ranges
        ]


async def _signed_size(conn: AsyncConnection) -> int:
    size = await conn.scalar(select(_LOG.c.size).order_by(_LOG.c.size.desc()).limit(1))
    return int(size or 0)


async def consistency(engine: AsyncEngine, old: int, new: int) -> list[bytes]:
    """RFC 9162 §2.1.4.1: the proof that the ``new``-record tree extends the
    ``old``-record one; both at most the newest signed checkpoint's size."""
    async with _snapshot(engine) as conn:
        signed = await _signed_size(conn)
        if not 0 < old <= new <= signed:
            raise AuditError(f"a consistency proof goes between sizes 1 <= from <= to <= {signed}")
        nodes = _Nodes(conn, Chain(await _algorithm(conn)))
        return await nodes.hashes(consistency_ranges(old, new))


async def inclusion(engine: AsyncEngine, seq: int) -> dict[str, Any] | None:
    """Record ``seq`` in the newest signed checkpoint: its leaf index, the
    tree size, the RFC 9162 audit path and the signed note (``None`` while
    no signed checkpoint covers it yet)."""
    async with _snapshot(engine) as conn:
        row = (await conn.execute(select(_LOG).order_by(_LOG.c.size.desc()).limit(1))).first()
        if row is None or int(row.size) < seq:
            return None
        size = int(row.size)
        nodes = _Nodes(conn, Chain(await _algorithm(conn)))
        path = await nodes.hashes(inclusion_ranges(seq - 1, size))
    return {"tree_size": size, "leaf_index": seq - 1, "path": [b64(p) for p in path], "checkpoint": row.note}


async def tree_root(engine: AsyncEngine, size: int) -> tuple[bytes | None, int]:
    """The root of the tree of records ``1..size``, recomputed from the
    records alone (no stored node is read), and how many records the ledger
    holds in all (``None`` as the root when it holds fewer than ``size``)."""
    async with _snapshot(engine) as conn:
        chain = Chain(await _algorithm(conn))
        held = int(await conn.scalar(select(_STATE.c.next_seq)) or 1) - 1
        if held < size:
            return None, held
        # The RFC 6962 root, streamed: complete subtrees kept on a stack.
        stack: list[tuple[int, bytes]] = []
        seq = 0
        while seq < size:
            last = min(size, seq + _STREAM)
            rows = await conn.execute(
                select(_CALLS).where(_CALLS.c.seq.between(seq + 1, last)).order_by(_CALLS.c.seq)
            )
            for row in rows:
                if int(row.seq) != seq + 1:
                    raise AuditError(f"record {seq + 1} is missing: run 'pdg audit verify'")
                seq += 1
                node, width = chain.leaf_hash(canonical(hashed(dict(row._mapping)))), 1
                while stack and stack[-1][0] == width:
                    node, width = chain.node_hash(stack.pop()[1], node), width * 2
                stack.append((width, node))
            if seq != last:
                raise AuditError(f"record {seq + 1} is missing: run 'pdg audit verify'")
    if not stack:
        return chain.digest(b""), held
    root = stack[-1][1]
    for _width, left in reversed(stack[:-1]):
        root = chain.node_hash(left, root)
    return root, held


async def check_witnessed(engine: AsyncEngine, state: dict[str, Any]) -> str | None:
    """``pdg audit verify --witness``: the problem (``None``: none) of a
    ledger against a witness's state — behind the witnessed checkpoint (cut
    back) or beside it (another tree at its size)."""
    try:
        verifier = Verifier.parse(str(state["log_vkey"]))
        text = open_note(str(state["checkpoint"]), verifier)
        witnessed = Checkpoint.parse(text)
    except (KeyError, TypeError, NoteError) as exc:
        raise AuditError(f"the witness state cannot be used: {exc}") from exc
    root, held = await tree_root(engine, witnessed.size)
    if root is None:
        return (
            f"the ledger holds {held} records, behind the {witnessed.size} a witness saw signed: "
            "it was cut back"
        )
    if root != witnessed.root:
        return (
            f"the ledger's first {witnessed.size} records are not the ones a witness saw signed "
            "(another tree at that size): the log forked"
        )
    return None
