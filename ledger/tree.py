"""The whole-log Merkle tree: one RFC 6962 tree over every record's leaf hash
(``H(0x00 || record)``, the leaf the chain links), in ``seq`` order; leaf
index ``i`` is record ``seq = i + 1``. Its signed heads are the C2SP
checkpoints a third party witnesses (``ledger.note``); consistency proofs
(RFC 9162 §2.1.4) show that a later head extends an earlier one, inclusion
proofs (§2.1.3) that a call is in it.

Pure code, like ``ledger.chain``: the writer feeds :class:`LogTree` leaves and
stores the nodes it completes; the prover asks :func:`inclusion_ranges` and
:func:`consistency_ranges` which subtrees a proof needs, and computes each with
:func:`subtree_hash` from stored nodes and leaves.

Storage: the hashes of complete subtrees of ``2**TILE_LEVEL`` (256) leaves and
above are stored (``ledger_tree``: about one row per 128 records); a subtree
below that is recomputed from its records (at most 255 of them), as a
``tlog-tiles`` reader recomputes inside a tile.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from ledger.chain import DIGEST_SIZE, Chain

#: Complete subtrees of ``2**TILE_LEVEL`` leaves and more are stored.
TILE_LEVEL = 8
TILE = 1 << TILE_LEVEL

#: ``(level, index)``: the complete subtree of leaves ``index * 2**level``
#: up to (not including) ``(index + 1) * 2**level``.
Node = tuple[int, int]


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class LogTree:
    """The writer's side: the tree grown one leaf at a time, keeping only the
    leaves of the last, partial tile and the stored nodes still waiting for a
    right sibling (``frontier``: level -> hash)."""

    def __init__(
        self,
        chain: Chain,
        size: int = 0,
        tile_leaves: Sequence[bytes] = (),
        frontier: dict[int, bytes] | None = None,
    ) -> None:
        if len(tile_leaves) != size % TILE:
            raise ValueError(f"a tree of {size} leaves has {size % TILE} in its last tile")
        self.chain = chain
        self.size = size
        self.tile_leaves = list(tile_leaves)
        self.frontier = dict(frontier or {})
        if set(self.frontier) != set(pending_levels(size)):
            raise ValueError(f"a tree of {size} leaves waits at levels {pending_levels(size)}")

    def add(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf; the stored nodes it completes, ``(level, index, hash)``."""
        self.tile_leaves.append(leaf)
        self.size += 1
        if len(self.tile_leaves) < TILE:
            return []
        node = self.chain.root_of_hashes(self.tile_leaves)
        self.tile_leaves = []
        level, index = TILE_LEVEL, (self.size >> TILE_LEVEL) - 1
        done = [(level, index, node)]
        while level in self.frontier:
            node = self.chain.node_hash(self.frontier.pop(level), node)
            level, index = level + 1, index >> 1
            done.append((level, index, node))
        self.frontier[level] = node
        return done

    def root(self) -> bytes:
        """The RFC 6962 Merkle Tree Hash of every leaf so far."""
        parts = [self.frontier[level] for level in sorted(self.frontier, reverse=True)]
        leaves, start = self.tile_leaves, 0
        while start < len(leaves):
            width = 1 << ((len(leaves) - start).bit_length() - 1)
            parts.append(self.chain.root_of_hashes(leaves[start : start + width]))
            start += width
        if not parts:
            return self.chain.digest(b"")
        root = parts[-1]
        for left in reversed(parts[:-1]):
            root = self.chain.node_hash(left, root)
        return root


def pending_levels(size: int) -> list[int]:
    """The stored levels whose last complete node waits for a right sibling
    in a tree of ``size`` leaves: the set bits of ``size`` from TILE_LEVEL up."""
    return [level for level in range(TILE_LEVEL, size.bit_length()) if size >> level & 1]


def frontier_nodes(size: int) -> list[Node]:
    """The stored nodes :class:`LogTree` keeps waiting at ``size``."""
    return [(level, (size >> level) - 1) for level in pending_levels(size)]


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """RFC 9162 §2.1.3.1 ``PATH(index, D[0:size])`` as the leaf ranges
    ``[start, end)`` whose hashes it lists, from the leaf upwards."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return ranges


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """RFC 9162 §2.1.4.1 ``PROOF(old, D[0:new])`` as leaf ranges, in order."""
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from {old} to {new} leaves")
    ranges: list[tuple[int, int]] = []
    lo, hi, m, whole = 0, new, old, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    if not whole:
        ranges.append((lo, hi))
    ranges.reverse()
    return ranges


def complete_nodes(start: int, end: int) -> list[Node]:
    """The complete subtrees whose hashes make ``MTH(D[start:end])`` for a
    range an RFC 6962 split gives (its start a multiple of a power of two at
    least its length's largest), left to right."""
    nodes: list[Node] = []
    while start < end:
        width = end - start
        if width & (width - 1) == 0 and start % width == 0:
            nodes.append((width.bit_length() - 1, start // width))
            break
        k = _split(width)
        nodes.append((k.bit_length() - 1, start // k))
        start += k
    return nodes


def subtree_hash(chain: Chain, start: int, end: int, node: Callable[[int, int], bytes]) -> bytes:
    """``MTH(D[start:end])`` from the hashes of its complete subtrees
    (``node(level, index)``)."""
    parts = [node(level, index) for level, index in complete_nodes(start, end)]
    root = parts[-1]
    for left in reversed(parts[:-1]):
        root = chain.node_hash(left, root)
    return root


def verify_consistency(
    chain: Chain, old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: whether the ``new``-leaf tree with ``new_root``
    extends the ``old``-leaf tree with ``old_root``."""
    if any(len(p) != DIGEST_SIZE for p in proof) or not 0 < old <= new:
        return False
    if old == new:
        return not proof and hmac.compare_digest(old_root, new_root)
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = chain.node_hash(c, fr)
            sr = chain.node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = chain.node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(fr, old_root) and hmac.compare_digest(sr, new_root)
