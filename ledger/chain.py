"""The tamper-evident call record: hash chain, Merkle intervals, signed checkpoints.

Pure code: no I/O, no database, no clock. The writer and ``pdg audit`` feed it
rows and keys; this module only derives and checks hashes and signatures.

Constructions (``H`` is SHA-256 or SM3, both 32-byte digests):

* **Record bytes** -- :func:`canonical`: sorted-key compact JSON (orjson), so the
  same record always gives the same bytes, and ``seq``, ``time`` and ``call_id``
  are part of what is hashed (a record cannot be moved or re-timed unnoticed).
* **Leaf hash** -- ``leaf = H(0x00 || record_bytes)`` (RFC 6962 leaf hash). It is
  computed once per record and used by both the chain and the Merkle tree.
* **Chain link** -- ``entry_n = H(0x02 || entry_{n-1} || leaf_n)``, genesis
  ``entry_0 = 32 zero bytes``. The 0x02 prefix keeps a chain link from ever being
  read as a Merkle leaf (0x00) or interior node (0x01); the input is fixed-length
  (1 + 32 + 32 bytes), so it has exactly one parse.
* **Merkle tree** -- RFC 6962 §2.1 over the leaves of one checkpoint interval:
  ``MTH({}) = H("")``, ``MTH({d}) = H(0x00 || d)``, else split at the largest power
  of two below ``n``: ``H(0x01 || MTH(left) || MTH(right))``. Inclusion proofs are
  RFC 6962 §2.1.1 audit paths, checked with the RFC 9162 §2.1.3.2 algorithm, so a
  third party can check one call against a signed root with any CT library.
* **Checkpoint** -- ECDSA P-256 with SHA-256 over :meth:`Checkpoint.payload`
  (sorted-key JSON with a type tag), signature DER-encoded (what ``cryptography``
  and ``openssl dgst -sha256 -verify`` produce and accept); or, with an SM2
  ledger key (``ledger.signing_algorithm = "SM2"``), SM2/SM3 with the 64-byte
  ``r || s`` of :mod:`core.sm2`.

Hashing: SHA-256 goes through :mod:`hashlib` -- OpenSSL's implementation, the same
one ``cryptography`` binds -- because a ``hashlib`` call costs much less than a
``cryptography`` ``Hash`` object per small message, and verification hashes
every record. SM3 is not reliably in :mod:`hashlib`, so SM3 goes
through ``cryptography``'s ``hashes.SM3`` (and is refused with a clear error when
this OpenSSL build lacks it).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol

import orjson
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from core import sm2

ALGORITHMS: Final[tuple[str, ...]] = ("sha256", "sm3")
DIGEST_SIZE: Final = 32
#: The chain's predecessor of the first record.
GENESIS: Final = bytes(DIGEST_SIZE)
#: Keys every call record must carry; they are inside the hashed bytes.
REQUIRED_KEYS: Final = ("seq", "time", "call_id")
#: Keys a record gained after ledgers had records: left out of the hashed
#: bytes when null, so the records written before them hash as they did.
LATER_KEYS: Final = ("terms_version", "upstream_target")

_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"
_LINK: Final = b"\x02"
_CHECKPOINT_TYPE: Final = "pdg.checkpoint.v1"
#: Sorted keys; aware UTC datetimes spelled with ``Z``. No ``default``: a value
#: orjson cannot encode natively (Decimal, date, bytes, ...) is refused rather than
#: given an ad hoc spelling a verifier in another language would have to guess.
_OPTIONS: Final = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z
_ZERO: Final = timedelta(0)


def require_utc(value: datetime, what: str) -> None:
    """Refuse naive and non-UTC datetimes: the hashed spelling must not depend on
    the zone a host or a database driver happened to hand back."""
    if value.tzinfo is not UTC and value.utcoffset() != _ZERO:
        raise ValueError(f"{what} must be an aware UTC datetime, got {value!r}")


def rfc3339(value: datetime) -> str:
    """``value`` spelled as in the hashed bytes (UTC, ``Z``)."""
    return orjson.dumps(value, option=orjson.OPT_UTC_Z).decode()[1:-1]


def canonical(record: Mapping[str, Any]) -> bytes:
    """The record's hashed bytes: compact UTF-8 JSON with sorted keys (orjson).

    Integers stay integers, ``None`` is ``null``, strings are UTF-8 unescaped.
    Datetimes are RFC 3339 in UTC with a ``Z``, in orjson's native spelling:
    microseconds as six digits when non-zero, no fraction when zero
    (``2026-01-02T03:04:05.000006Z``, ``2026-01-02T03:04:05Z``) -- one spelling
    per instant. orjson's native encoder is used rather than a ``default`` hook
    because calling back into Python per datetime costs more than the hashing.

    ``seq`` (an integer), ``time`` (an aware UTC datetime) and ``call_id`` must be
    present, so position, time and identity are all covered by the hash. Other
    datetimes must be UTC too; one that is not keeps its offset in the bytes, so a
    store that changes zones makes verification fail (never wrongly pass). Floats
    are encoded in orjson's shortest round-trip form; prefer integers (fen,
    microseconds) for anything that must compare exactly.

    A key of :data:`LATER_KEYS` (``terms_version``, ``upstream_target``)
    whose value is ``None`` is left out: records written before the record had it hash as they were
    written. Any other value of it is hashed like every key.

    Raises ValueError for a missing or ill-typed ``seq``/``time``/``call_id``, and
    TypeError (``orjson.JSONEncodeError``) for a value with no JSON spelling.
    """
    try:
        seq = record["seq"]
        time = record["time"]
        call_id = record["call_id"]
    except KeyError as exc:
        raise ValueError(f"call record has no {exc.args[0]!r}") from None
    if seq.__class__ is not int:
        raise ValueError(f"call record seq must be an integer, got {seq!r}")
    if not isinstance(time, datetime):
        raise ValueError("call record time must be a datetime")
    require_utc(time, "call record time")
    if not isinstance(call_id, str):
        raise ValueError(f"call record call_id must be a string, got {call_id!r}")
    if record.get("terms_version", 0) is None or record.get("upstream_target", 0) is None:
        record = without_null_later_keys(record)
    # orjson encodes only real dicts; copy other mappings.
    return orjson.dumps(record if record.__class__ is dict else dict(record), option=_OPTIONS)


def without_null_later_keys(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` without the keys of :data:`LATER_KEYS` whose value is ``None``."""
    return {k: v for k, v in record.items() if v is not None or k not in LATER_KEYS}


def _sm3_digest(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


class _OneShot(Protocol):
    """A hash of some bytes, in :mod:`hashlib`'s shape."""

    def digest(self) -> bytes: ...


class _SM3:
    """SM3 in :mod:`hashlib`'s one-shot shape, ``_SM3(data).digest()``, so hot
    loops call ``new(data).digest()`` for either algorithm (for SHA-256 that is
    two C calls and no Python frame)."""

    __slots__ = ("_digest",)

    def __init__(self, data: bytes) -> None:
        self._digest = _sm3_digest(data)

    def digest(self) -> bytes:
        return self._digest


def sm3_available() -> bool:
    """Whether this OpenSSL build (as bound by ``cryptography``) can do SM3."""
    try:
        _sm3_digest(b"")
    except UnsupportedAlgorithm:
        return False
    return True


class Chain:
    """One hash algorithm and the constructions built on it (see module docstring)."""

    __slots__ = ("_new", "algorithm")

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm == "sha256":
            self._new: Callable[[bytes], _OneShot] = hashlib.sha256
        elif algorithm == "sm3":
            if not sm3_available():
                raise ValueError(
                    "SM3 is not available in this OpenSSL build; "
                    "use an OpenSSL with SM3 enabled or configure sha256"
                )
            self._new = _SM3
        else:
            raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {ALGORITHMS}")
        self.algorithm = algorithm

    @property
    def new(self) -> Callable[[bytes], _OneShot]:
        """``H`` in :mod:`hashlib`'s shape, ``new(data).digest()``, for hot loops
        (for SHA-256, two C calls and no Python frame)."""
        return self._new

    def digest(self, data: bytes) -> bytes:
        """Plain ``H(data)``."""
        return self._new(data).digest()

    def leaf_hash(self, record_bytes: bytes) -> bytes:
        """``H(0x00 || record_bytes)``: the RFC 6962 leaf hash, shared with the chain."""
        return self._new(_LEAF + record_bytes).digest()

    def node_hash(self, left: bytes, right: bytes) -> bytes:
        """``H(0x01 || left || right)``: an RFC 6962 interior node."""
        return self._new(_NODE + left + right).digest()

    def link_leaf(self, prev_hash: bytes, leaf: bytes) -> bytes:
        """``H(0x02 || prev_hash || leaf)``, for callers that already have the leaf hash."""
        if len(prev_hash) != DIGEST_SIZE or len(leaf) != DIGEST_SIZE:
            raise ValueError("chain hashes are 32 bytes")
        return self._new(_LINK + prev_hash + leaf).digest()

    def link(self, prev_hash: bytes, record_bytes: bytes) -> bytes:
        """The chain entry of a record: ``H(0x02 || prev_hash || H(0x00 || record_bytes))``.

        ``prev_hash`` is the previous record's entry, or :data:`GENESIS`.
        """
        return self.link_leaf(prev_hash, self.leaf_hash(record_bytes))

    # -- Merkle tree over leaf hashes (RFC 6962 §2.1) ------------------------

    def root_of_hashes(self, leaf_hashes: Sequence[bytes]) -> bytes:
        """MTH over already-hashed leaves.

        Built bottom-up, carrying an odd last node up unchanged; that gives the
        same tree as RFC 6962's split at the largest power of two (the tree is
        left-balanced either way), without recursion.
        """
        if not leaf_hashes:
            return self._new(b"").digest()
        new = self._new  # node_hash inlined: verify builds a tree over every record
        level = list(leaf_hashes)
        while len(level) > 1:
            pairs = zip(level[::2], level[1::2], strict=False)
            nxt = [new(_NODE + left + right).digest() for left, right in pairs]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return level[0]

    def path_of_hashes(self, leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
        """RFC 6962 §2.1.1 ``PATH(index, D[n])``, siblings from the leaf upwards."""
        if not 0 <= index < len(leaf_hashes):
            raise IndexError(f"leaf index {index} outside a tree of {len(leaf_hashes)} leaves")
        proof: list[bytes] = []
        lo, hi, m = 0, len(leaf_hashes), index
        # Walk down from the root, collecting the other subtree's root at each
        # split; the recursion's result is that list read bottom-up.
        while hi - lo > 1:
            k = _split(hi - lo)
            if m < k:
                proof.append(self.root_of_hashes(leaf_hashes[lo + k : hi]))
                hi = lo + k
            else:
                proof.append(self.root_of_hashes(leaf_hashes[lo : lo + k]))
                lo, m = lo + k, m - k
        proof.reverse()
        return proof

    def verify_inclusion(
        self, leaf_data: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
    ) -> bool:
        """RFC 9162 §2.1.3.2 (the RFC 6962 audit-path check, spelled out)."""
        return self.verify_leaf_inclusion(self.leaf_hash(leaf_data), index, tree_size, proof, root)

    def verify_leaf_inclusion(
        self, leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
    ) -> bool:
        """:meth:`verify_inclusion` for a leaf already hashed."""
        if not 0 <= index < tree_size or any(len(p) != DIGEST_SIZE for p in proof):
            return False
        fn, sn = index, tree_size - 1
        r = leaf
        for p in proof:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = self.node_hash(p, r)
                if not fn & 1:
                    while not fn & 1 and fn != 0:
                        fn >>= 1
                        sn >>= 1
            else:
                r = self.node_hash(r, p)
            fn >>= 1
            sn >>= 1
        return sn == 0 and hmac.compare_digest(r, root)


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


@functools.cache
def _chain(algorithm: str) -> Chain:
    return Chain(algorithm)


def merkle_root(leaves: Sequence[bytes], algorithm: str = "sha256") -> bytes:
    """RFC 6962 Merkle Tree Hash of the leaf data (e.g. :func:`canonical` records)."""
    c = _chain(algorithm)
    return c.root_of_hashes([c.leaf_hash(d) for d in leaves])


def inclusion_proof(leaves: Sequence[bytes], index: int, algorithm: str = "sha256") -> list[bytes]:
    """The audit path of ``leaves[index]``: what ``pdg audit prove`` hands out."""
    c = _chain(algorithm)
    return c.path_of_hashes([c.leaf_hash(d) for d in leaves], index)


def verify_inclusion(
    leaf_data: bytes,
    index: int,
    tree_size: int,
    proof: Sequence[bytes],
    root: bytes,
    algorithm: str = "sha256",
) -> bool:
    """Whether ``leaf_data`` is leaf ``index`` of the ``tree_size``-leaf tree with ``root``."""
    return _chain(algorithm).verify_inclusion(leaf_data, index, tree_size, proof, root)


# -- Checkpoints -------------------------------------------------------------


def strict_int(value: Any) -> int:
    """``value`` if it is an int proper (not a bool, float or string); TypeError otherwise."""
    if value.__class__ is not int:
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


def _require_p256(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"checkpoint keys are ECDSA P-256, got curve {key.curve.name}")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement about records ``first_seq..last_seq`` (inclusive).

    ``chain_head`` is the chain entry of ``last_seq`` (it commits to every record
    since genesis); ``merkle_root`` is the RFC 6962 root over the leaf hashes of
    this interval only (it makes short inclusion proofs possible).
    """

    first_seq: int
    last_seq: int
    chain_head: bytes
    merkle_root: bytes
    created_at: datetime
    algorithm: str = "sha256"
    key_id: str = ""
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.first_seq <= self.last_seq:
            raise ValueError(f"bad checkpoint interval {self.first_seq}..{self.last_seq}")
        if len(self.chain_head) != DIGEST_SIZE or len(self.merkle_root) != DIGEST_SIZE:
            raise ValueError("checkpoint hashes are 32 bytes")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {self.algorithm!r}")
        require_utc(self.created_at, "checkpoint created_at")

    def payload(self) -> bytes:
        """The signed bytes: every field but the signature, as sorted-key JSON.

        The type tag keeps a checkpoint signature from being valid as anything
        else signed with the same key; hashes are lowercase hex.
        """
        return orjson.dumps(
            {
                "type": _CHECKPOINT_TYPE,
                "first_seq": self.first_seq,
                "last_seq": self.last_seq,
                "chain_head": self.chain_head.hex(),
                "merkle_root": self.merkle_root.hex(),
                "created_at": self.created_at,
                "algorithm": self.algorithm,
                "key_id": self.key_id,
            },
            option=_OPTIONS,
        )

    def as_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (hashes and signature as hex): the form in
        exports, proofs and the jobs of a parallel verify."""
        return {
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "chain_head": self.chain_head.hex(),
            "merkle_root": self.merkle_root.hex(),
            "created_at": rfc3339(self.created_at),
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Checkpoint:
        """The inverse of :meth:`as_json`; ValueError for anything else."""
        try:
            return cls(
                first_seq=strict_int(data["first_seq"]),
                last_seq=strict_int(data["last_seq"]),
                chain_head=bytes.fromhex(data["chain_head"]),
                merkle_root=bytes.fromhex(data["merkle_root"]),
                created_at=datetime.fromisoformat(data["created_at"]),
                algorithm=str(data["algorithm"]),
                key_id=str(data["key_id"]),
                signature=bytes.fromhex(data["signature"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(str(exc)) from exc

    def sign(self, private_key: ec.EllipticCurvePrivateKey | Any, key_id: str) -> Checkpoint:
        """A copy carrying ``key_id`` and a DER ECDSA P-256/SHA-256 signature
        (with an SM2 key: the 64-byte ``r || s`` SM2/SM3 signature of
        :mod:`core.sm2`).

        ``key_id`` is inside the payload, so a signature cannot be re-attributed to
        another key.
        """
        unsigned = replace(self, key_id=key_id, signature=b"")
        if sm2.is_private_key(private_key):
            return replace(unsigned, signature=sm2.sign(private_key, unsigned.payload()))
        _require_p256(private_key)
        sig = private_key.sign(unsigned.payload(), ec.ECDSA(hashes.SHA256()))
        return replace(unsigned, signature=sig)

    def verify(self, public_key: ec.EllipticCurvePublicKey | Any) -> bool:
        """Whether the signature is valid for this payload under ``public_key``
        (ECDSA P-256 or SM2, by the key's type)."""
        if not self.signature:
            return False
        if sm2.is_public_key(public_key):
            return sm2.verify(public_key, self.signature, self.payload())
        _require_p256(public_key)
        try:
            public_key.verify(self.signature, self.payload(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


# -- Writing -----------------------------------------------------------------


class ChainWriter:
    """The writer's side: chains records in order and cuts unsigned checkpoints.

    When to cut (every N records or T seconds) is the caller's policy: it knows
    the clock; :attr:`pending` says how many records the next checkpoint covers.
    """

    def __init__(self, algorithm: str = "sha256", *, next_seq: int = 1, head: bytes = GENESIS) -> None:
        self.chain = Chain(algorithm)
        self.next_seq = next_seq
        self.head = head
        self._leaves: list[bytes] = []

    @classmethod
    def resume(
        cls, algorithm: str, *, next_seq: int, head: bytes, open_leaves: Sequence[bytes]
    ) -> ChainWriter:
        """A writer that carries on a stored chain: ``open_leaves`` are the leaf
        hashes of the records after the last checkpoint, in order."""
        writer = cls(algorithm, next_seq=next_seq, head=head)
        writer._leaves = list(open_leaves)
        return writer

    @property
    def pending(self) -> int:
        return len(self._leaves)

    @property
    def last_leaf(self) -> bytes:
        """The leaf hash of the record appended last (of the open interval)."""
        return self._leaves[-1]

    def append(self, record: Mapping[str, Any]) -> bytes:
        """Chain the next record and return its entry hash (to store with the row)."""
        if record.get("seq") != self.next_seq:
            raise ValueError(f"expected seq {self.next_seq}, got {record.get('seq')!r}")
        leaf = self.chain.leaf_hash(canonical(record))
        self.head = self.chain.link_leaf(self.head, leaf)
        self._leaves.append(leaf)
        self.next_seq += 1
        return self.head

    def checkpoint(self, created_at: datetime) -> Checkpoint:
        """An unsigned checkpoint over the records appended since the last one."""
        if not self._leaves:
            raise ValueError("no records since the last checkpoint")
        cp = Checkpoint(
            first_seq=self.next_seq - len(self._leaves),
            last_seq=self.next_seq - 1,
            chain_head=self.head,
            merkle_root=self.chain.root_of_hashes(self._leaves),
            created_at=created_at,
            algorithm=self.chain.algorithm,
        )
        self._leaves = []
        return cp


# -- Verifying ---------------------------------------------------------------

ProblemKind = Literal["altered", "missing", "inserted", "reordered", "checkpoint"]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with the ledger: where, what kind, and why."""

    seq: int
    kind: ProblemKind
    reason: str


class Verifier:
    """Re-derives the chain from rows fed in ledger order and reports the first problem.

    Use it from a cursor::

        v = Verifier("sha256", checkpoints=cps, public_keys=keys)
        for record, stored_hash in rows:          # ORDER BY seq
            if (problem := v.feed(record, stored_hash)) is not None:
                break
        else:
            problem = v.finish()

    Once a problem is found, :meth:`feed` keeps returning it. Kinds and the seq
    reported:

    * ``altered`` at ``n``: record ``n`` (or its stored hash) does not re-derive.
    * ``missing`` at ``n``: record ``n`` never appears (or a signed checkpoint
      covers records past the end of the rows).
    * ``reordered`` at ``n``: record ``n`` appears, but after a later record.
    * ``inserted`` at ``n``: a second record numbered ``n`` (or lower) appears
      after record ``n`` was verified.
    * ``checkpoint`` at a checkpoint's ``first_seq``: its signature, chain head or
      Merkle root does not match, its key is unknown, or checkpoints do not tile
      the sequence. A writer-side rewrite of the stored hashes shows up only here,
      so the culprit is somewhere in that interval.

    When record ``n`` is not where it should be, the verdict waits: the rest of
    the rows are only scanned for ``seq == n`` (no hashing) to tell ``reordered``
    from ``missing``, and :meth:`finish` reports ``missing``.

    Records after the last checkpoint are checked against their stored hashes
    only; deleting them from the tail is undetectable until a checkpoint covers
    them, which is why checkpoints are also cut on a timer.
    """

    def __init__(
        self,
        algorithm: str = "sha256",
        *,
        checkpoints: Iterable[Checkpoint] = (),
        public_keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
        first_seq: int = 1,
        prev_hash: bytes = GENESIS,
    ) -> None:
        self._chain = Chain(algorithm)
        self._keys = dict(public_keys or {})
        self._head = prev_hash
        self._expected = first_seq
        # Checkpoints wholly before the start were checked by whoever vouched for
        # prev_hash; one straddling the start cannot have its root re-derived.
        self._cps = deque(cp for cp in checkpoints if cp.last_seq >= first_seq)
        if self._cps and self._cps[0].first_seq < first_seq:
            raise ValueError("start verification at a checkpoint boundary")
        self._leaves: list[bytes] = []
        self._problem: Problem | None = None
        self._gap: int | None = None
        self._gap_seen = 0
        if self._cps and self._cps[0].first_seq != first_seq:
            self._fail(first_seq, "checkpoint", f"no checkpoint starts at seq {first_seq}")

    @property
    def last_seq(self) -> int:
        """The last record verified so far."""
        return self._expected - 1

    @property
    def head(self) -> bytes:
        """The chain entry of :attr:`last_seq`."""
        return self._head

    def _fail(self, seq: int, kind: ProblemKind, reason: str) -> Problem:
        self._problem = Problem(seq, kind, reason)
        return self._problem

    def feed(self, record: Mapping[str, Any], stored_hash: bytes) -> Problem | None:
        """Verify the next row; return the first problem found so far, if any."""
        return self.feed_many(((record, stored_hash),))

    def feed_many(self, rows: Iterable[tuple[Mapping[str, Any], bytes]]) -> Problem | None:
        """:meth:`feed` for each ``(record, stored_hash)`` in turn, stopping at
        the first problem. The loop a whole-ledger verify spends its time in:
        the chain state lives in locals, written back when a checkpoint closes
        and on the way out.

        A record is encoded as :func:`canonical` encodes it, without its checks
        of ``time`` and ``call_id`` (a quarter of its cost): they keep a writer
        from hashing a record that lacks them, and a stored record that lacks
        them, or holds them ill-typed, cannot give the bytes its stored hash was
        made from either way."""
        if self._problem is not None:
            return self._problem
        new, head, expected, leaves = self._chain.new, self._head, self._expected, self._leaves
        dumps, options = orjson.dumps, _OPTIONS
        closes = self._cps[0].last_seq if self._cps else -1
        problem = None
        try:
            for record, stored_hash in rows:
                seq = record.get("seq")
                if seq != expected or self._gap is not None or seq.__class__ is not int:
                    problem = self._out_of_place(seq, expected)
                    if problem is not None:
                        break
                    continue
                if record.get("terms_version", 0) is None or record.get("upstream_target", 0) is None:
                    record = without_null_later_keys(record)
                try:
                    data = dumps(record if record.__class__ is dict else dict(record), option=options)
                except (TypeError, ValueError) as exc:
                    problem = self._fail(seq, "altered", f"record {seq} cannot be encoded: {exc}")
                    break
                leaf = new(_LEAF + data).digest()
                entry = new(_LINK + head + leaf).digest()
                if not hmac.compare_digest(entry, stored_hash):
                    problem = self._fail(seq, "altered", f"record {seq} does not match its stored hash")
                    break
                head = entry
                expected = seq + 1
                if closes >= 0:
                    leaves.append(leaf)
                    if seq == closes:
                        self._head, self._expected = head, expected
                        if (problem := self._close_checkpoint()) is not None:
                            break
                        leaves = self._leaves
                        closes = self._cps[0].last_seq if self._cps else -1
        finally:
            self._head, self._expected = head, expected
        return problem

    def _out_of_place(self, seq: Any, expected: int) -> Problem | None:
        """A row that is not record ``expected``: note a gap (and then look only
        for the missing number), or say what is wrong."""
        if self._gap is not None:
            if seq == self._gap:
                return self._fail(
                    self._gap, "reordered", f"record {self._gap} appears after record {self._gap_seen}"
                )
            return None
        if not isinstance(seq, int) or isinstance(seq, bool):
            return self._fail(expected, "altered", f"the record after {expected - 1} has no integer seq")
        if seq > expected:
            self._gap, self._gap_seen = expected, seq
            return None
        if seq == expected:  # an int subclass in its place: canonical() refuses it
            return self._fail(
                seq, "altered", f"record {seq} cannot be encoded: call record seq must be an integer"
            )
        return self._fail(seq, "inserted", f"a second record numbered {seq} after record {expected - 1}")

    def _close_checkpoint(self) -> Problem | None:
        cp = self._cps.popleft()
        leaves, self._leaves = self._leaves, []
        where = f"checkpoint {cp.first_seq}..{cp.last_seq}"
        key = self._keys.get(cp.key_id)
        if key is None:
            return self._fail(cp.first_seq, "checkpoint", f"{where}: unknown key id {cp.key_id!r}")
        if cp.algorithm != self._chain.algorithm:
            return self._fail(cp.first_seq, "checkpoint", f"{where}: algorithm {cp.algorithm!r}")
        if not cp.verify(key):
            return self._fail(cp.first_seq, "checkpoint", f"{where}: bad signature")
        if not hmac.compare_digest(cp.chain_head, self._head):
            return self._fail(cp.first_seq, "checkpoint", f"{where}: chain head does not match")
        if not hmac.compare_digest(cp.merkle_root, self._chain.root_of_hashes(leaves)):
            return self._fail(cp.first_seq, "checkpoint", f"{where}: Merkle root does not match")
        if self._cps and self._cps[0].first_seq != cp.last_seq + 1:
            nxt = self._cps[0]
            return self._fail(
                cp.last_seq + 1,
                "checkpoint",
                f"checkpoint {nxt.first_seq}..{nxt.last_seq} does not follow {where}",
            )
        return None

    def finish(self) -> Problem | None:
        """Call after the last row: settles a pending gap and uncovered checkpoints."""
        if self._problem is not None:
            return self._problem
        if self._gap is not None:
            return self._fail(
                self._gap, "missing", f"record {self._gap} is missing (next record is {self._gap_seen})"
            )
        if self._cps:
            cp = self._cps[0]
            return self._fail(
                self._expected,
                "missing",
                f"records end at {self._expected - 1} but a checkpoint covers up to {cp.last_seq}",
            )
        return None
