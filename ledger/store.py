"""The SQL ledger: append chained records and signed checkpoints, exactly once.

:class:`LedgerStore` is the writer's half: it keeps the chain state
(``ledger_state``) and appends a batch of records in one transaction, with
their ``seq`` and chain ``hash``, a checkpoint when one is due, and the log
position the batch came from. A record whose ``call_id`` is already in the
ledger is skipped, so a log entry appended or moved twice lands once: batches
go in without a look-up first, and one that meets a stored call id (the
unique index refuses it) is rolled back and written again with one. Two
writers fence each other on ``next_seq``: the loser's transaction rolls back
(:class:`FencedError`). A checkpoint or signed tree head already stored is
kept when it is the one this batch would store (the same records and hashes),
and refused as an inconsistent ledger (:class:`LedgerError`) when it is not:
neither is a database error to retry.

On PostgreSQL rows go in with ``COPY`` (asyncpg), on SQLite with multi-row
``INSERT`` statements; both take plain tuples, bound once by the columns' own
types.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

from asyncpg.exceptions import UniqueViolationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Dialect, Table, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core import sm2
from ledger.chain import GENESIS, Chain, ChainWriter, Checkpoint, canonical, require_utc
from ledger.models import CallRow, CheckpointRow, LedgerKeyRow, LedgerStateRow, LogCheckpointRow, TreeNodeRow
from ledger.note import Checkpoint as LogCheckpoint
from ledger.note import Signer
from ledger.note import sign as sign_note
from ledger.partitions import OpenPartition, close_open, cuts, load_open, period_of_time, record_open
from ledger.record import FIELDS, hashed
from ledger.tree import TILE, TILE_LEVEL, LogTree, frontier_nodes
from licensing.keys import SigningKey
from storage.db import UTCDateTime

log = logging.getLogger(__name__)

_CALLS = cast(Table, CallRow.__table__)
_STATE = cast(Table, LedgerStateRow.__table__)
_CHECKPOINTS = cast(Table, CheckpointRow.__table__)
_KEYS = cast(Table, LedgerKeyRow.__table__)
_TREE = cast(Table, TreeNodeRow.__table__)
_LOG_CHECKPOINTS = cast(Table, LogCheckpointRow.__table__)
#: Records read per transaction while a ledger from before the whole-log tree
#: gets its tree (``LedgerStore.load``).
_TREE_CATCH_UP_BATCH = 64 * TILE
_COLUMNS = (*FIELDS, "hash")
_STATE_ID = 1
#: A call id already stored: SQLAlchemy's error, or asyncpg's own from COPY
#: (which goes to the driver directly).
_DUPLICATE = (IntegrityError, UniqueViolationError)


class LedgerError(Exception):
    """The ledger cannot be written as configured (one line, for humans)."""


class FencedError(LedgerError):
    """Another writer moved the ledger on: this writer's batch was not written."""


@dataclass(frozen=True, slots=True)
class Appended:
    """What one append did."""

    written: int
    skipped: int
    checkpoints: list[Checkpoint]

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The last checkpoint cut, if any."""
        return self.checkpoints[-1] if self.checkpoints else None


def checkpoint_of(row: Any) -> Checkpoint:
    return Checkpoint(
        first_seq=row.first_seq,
        last_seq=row.last_seq,
        chain_head=bytes.fromhex(row.chain_head),
        merkle_root=bytes.fromhex(row.merkle_root),
        created_at=row.created_at,
        algorithm=row.algorithm,
        key_id=row.key_id,
        signature=bytes.fromhex(row.signature),
    )


def public_pem(key: ec.EllipticCurvePublicKey | Any) -> str:
    """SubjectPublicKeyInfo PEM of a ledger key (P-256 or SM2)."""
    if sm2.is_public_key(key):
        return sm2.public_pem(key).decode()
    return str(
        key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    )


class LedgerStore:
    """The writer's view of the SQL ledger. Not safe for two tasks at once."""

    def __init__(
        self,
        engine: AsyncEngine,
        signing_key: SigningKey,
        *,
        algorithm: str = "sha256",
        checkpoint_records: int = 1000,
        checkpoint_seconds: float = 10.0,
        time_zone: str = "Asia/Shanghai",
        log_signer: Signer | None = None,
    ) -> None:
        if signing_key.alg not in ("ES256", sm2.ALG):
            raise LedgerError("the ledger signing key must be an EC P-256 (ES256) or SM2 key")
        self.engine = engine
        self.key = signing_key
        self.private_key: ec.EllipticCurvePrivateKey | Any = signing_key.private_key
        self.algorithm = algorithm
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self.writer: ChainWriter | None = None
        #: The whole-log tree (``ledger.tree``) and the key that signs its
        #: checkpoints (none: the tree grows, no checkpoint is signed).
        self.tree: LogTree | None = None
        self.log_signer = log_signer
        self.position = "0-0"
        self._last_checkpoint = datetime.now(UTC)
        self._postgres = engine.dialect.name == "postgresql"
        self._binders = _binders(engine.dialect)
        #: Partitions are periods in the billing time zone (``ledger.partitions``).
        self._zone = ZoneInfo(time_zone)
        #: The open partition (PostgreSQL), read on first use.
        self._open: OpenPartition | None = None

    # -- state --------------------------------------------------------------

    async def load(self) -> None:
        """Read the chain state (creating it on first use) and the leaves of
        the interval not yet covered by a checkpoint."""
        self._open = None
        async with self.engine.begin() as conn:
            state = (await conn.execute(select(_STATE))).first()
            if state is None:
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            insert(_STATE).values(
                                id=_STATE_ID,
                                next_seq=1,
                                head=GENESIS.hex(),
                                algorithm=self.algorithm,
                                log_position="0-0",
                                checkpointed_seq=0,
                                updated_at=datetime.now(UTC),
                            )
                        )
                except IntegrityError:
                    pass
                state = (await conn.execute(select(_STATE))).one()
            if state.algorithm != self.algorithm:
                raise LedgerError(
                    f"the ledger is chained with {state.algorithm}; "
                    f"ledger.hash_algorithm ({self.algorithm}) cannot change once records exist"
                )
            await self._register_key(conn)
            chain = Chain(self.algorithm)
            open_rows = await conn.execute(
                select(_CALLS).where(_CALLS.c.seq > state.checkpointed_seq).order_by(_CALLS.c.seq)
            )
            leaves = [chain.leaf_hash(canonical(hashed(dict(row._mapping)))) for row in open_rows]
        if len(leaves) != state.next_seq - 1 - state.checkpointed_seq:
            raise LedgerError(
                f"the ledger holds {len(leaves)} records after seq {state.checkpointed_seq}, "
                f"its state says {state.next_seq - 1 - state.checkpointed_seq}: run 'pdg audit verify'"
            )
        # The open interval's leaves make the next checkpoint's Merkle root.
        self.writer = ChainWriter.resume(
            self.algorithm, next_seq=state.next_seq, head=bytes.fromhex(state.head), open_leaves=leaves
        )
        self.tree = await self._load_tree(state.next_seq - 1)
        self.position = state.log_position

    async def _load_tree(self, size: int) -> LogTree:
        """The whole-log tree at ``size`` records: its waiting nodes and the
        leaves of its last tile; first, the tree of records that have none
        yet (a ledger written before it existed)."""
        chain = Chain(self.algorithm)
        whole = size - size % TILE
        async with self.engine.connect() as conn:
            tiles = await conn.scalar(
                select(func.count()).select_from(_TREE).where(_TREE.c.level == TILE_LEVEL)
            )
        covered = int(tiles or 0) * TILE
        if covered < whole:
            log.warning("building the whole-log tree of records %d..%d", covered + 1, whole)
            tree = await self._tree_at(chain, covered)
            while tree.size < whole:
                end = min(whole, tree.size + _TREE_CATCH_UP_BATCH)
                async with self.engine.begin() as conn:
                    done = []
                    for leaf in await self._leaves(conn, chain, tree.size + 1, end):
                        done.extend(tree.add(leaf))
                    await self._insert_nodes(conn, done)
        return await self._tree_at(chain, size)

    async def _tree_at(self, chain: Chain, size: int) -> LogTree:
        whole = size - size % TILE
        async with self.engine.connect() as conn:
            frontier: dict[int, bytes] = {}
            for level, idx in frontier_nodes(whole):
                stored = await conn.scalar(
                    select(_TREE.c.hash).where(_TREE.c.level == level, _TREE.c.idx == idx)
                )
                if stored is None:
                    raise LedgerError(f"the whole-log tree lacks node {level}/{idx}: run 'pdg audit verify'")
                frontier[level] = bytes.fromhex(stored)
            tile = await self._leaves(conn, chain, whole + 1, size)
        return LogTree(chain, size, tile, frontier)

    @staticmethod
    async def _leaves(conn: AsyncConnection, chain: Chain, first: int, last: int) -> list[bytes]:
        """The leaf hashes of records ``first..last``, recomputed from their columns."""
        if last < first:
            return []
        rows = await conn.execute(
            select(_CALLS).where(_CALLS.c.seq.between(first, last)).order_by(_CALLS.c.seq)
        )
        leaves = [chain.leaf_hash(canonical(hashed(dict(row._mapping)))) for row in rows]
        if len(leaves) != last - first + 1:
            raise LedgerError(f"records {first}..{last} are not all in the ledger: run 'pdg audit verify'")
        return leaves

    async def _insert_nodes(self, conn: AsyncConnection, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        """Store completed tree nodes; one already stored (the same hash: the
        tree is a function of the records) is left as it is."""
        if not nodes:
            return
        statement = _insert_ignoring_duplicates(self.engine.dialect.name, _TREE)
        await conn.execute(statement, [{"level": lv, "idx": idx, "hash": h.hex()} for lv, idx, h in nodes])

    async def _register_key(self, conn: AsyncConnection) -> None:
        known = await conn.scalar(select(LedgerKeyRow.key_id).where(LedgerKeyRow.key_id == self.key.kid))
        if known is None:
            public = self.private_key.public_key()
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(_KEYS).values(
                            key_id=self.key.kid, public_pem=public_pem(public), created_at=datetime.now(UTC)
                        )
                    )
            except IntegrityError:
                pass

    # -- appending ----------------------------------------------------------

    def checkpoint_due(self, now: datetime) -> bool:
        writer = self.writer
        if writer is None or not writer.pending:
            return False
        return (
            writer.pending >= self.checkpoint_records
            or (now - self._last_checkpoint).total_seconds() >= self.checkpoint_seconds
        )

    async def append(
        self, records: Sequence[dict[str, Any]], position: str, *, force_checkpoint: bool = False
    ) -> Appended:
        """Chain and store ``records`` (log order) read up to log entry
        ``position``, in one transaction. On any failure the in-memory state is
        reloaded from the database, so a retry starts from what was committed."""
        if self.writer is None:
            await self.load()
        try:
            try:
                # Log entries are moved once in the normal course: insert
                # without looking for them first, and look only when the
                # database says a call id is already there.
                return await self._append(records, position, force_checkpoint, check=False)
            except _DUPLICATE:
                await self.load()
                return await self._append(records, position, force_checkpoint, check=True)
        except BaseException:
            self.writer = None
            self._open = None
            raise

    async def _append(
        self, records: Sequence[dict[str, Any]], position: str, force: bool, *, check: bool
    ) -> Appended:
        writer = self.writer
        if writer is None:
            raise LedgerError("the ledger state is not loaded")
        start_seq, start_head = writer.next_seq, writer.head
        async with self.engine.begin() as conn:
            part = None
            if self._postgres:
                if self._open is None:
                    self._open = await load_open(conn)
                part = self._open
                # A repeat of a call written in a closed partition is not
                # caught by the open one's unique index: look those up.
                check = check or any(part.may_repeat(r["started_at"]) for r in records)
            fresh = await self._unseen(conn, records) if check else records
            cut_at = cuts(part, fresh, self._zone) if part is not None else []
            cut_here = {index for index, _ in cut_at}
            rows: list[dict[str, Any]] = []
            now = datetime.now(UTC)
            checkpoints: list[Checkpoint] = []
            tree = self.tree
            if tree is None:
                raise LedgerError("the ledger state is not loaded")
            nodes: list[tuple[int, int, bytes]] = []
            for index, record in enumerate(fresh):
                if index in cut_here and writer.pending:
                    # A partition ends at a checkpoint, so it verifies alone.
                    checkpoints.append(writer.checkpoint(now).sign(self.private_key, self.key.kid))
                # A copy: a batch written again (see append) starts from the
                # records as they were read.
                row = {**record, "seq": writer.next_seq}
                row["hash"] = writer.append(row).hex()
                nodes.extend(tree.add(writer.last_leaf))
                rows.append(row)
                # Every N records exactly, however large the batch.
                if writer.pending >= self.checkpoint_records:
                    checkpoints.append(writer.checkpoint(now).sign(self.private_key, self.key.kid))
            if writer.pending and (force or self.checkpoint_due(now)):
                checkpoints.append(writer.checkpoint(now).sign(self.private_key, self.key.kid))
            checkpoint = checkpoints[-1] if checkpoints else None
            # The head of the whole-log tree is signed with the last checkpoint
            # of the batch (witnesses need no more than the newest).
            log_checkpoint = None
            if checkpoint is not None and self.log_signer is not None:
                head = LogCheckpoint(self.log_signer.name, tree.size, tree.root())
                log_checkpoint = {
                    "size": head.size,
                    "root": head.root.hex(),
                    "note": sign_note(head.text, self.log_signer),
                    "created_at": now,
                }
            values: dict[str, Any] = {
                "next_seq": writer.next_seq,
                "head": writer.head.hex(),
                "log_position": position,
                "updated_at": now,
            }
            if checkpoint is not None:
                values["checkpointed_seq"] = checkpoint.last_seq
            # The state first: it fences another writer out before any row
            # goes in, and as the transaction's first statement it opens the
            # transaction that COPY, sent straight to the driver, then joins
            # (the driver begins one lazily, on SQLAlchemy's first statement;
            # a COPY sent before that would commit on its own).
            moved = await conn.execute(
                update(_STATE)
                .where(LedgerStateRow.id == _STATE_ID, LedgerStateRow.next_seq == start_seq)
                .where(LedgerStateRow.head == start_head.hex())
                .values(**values)
            )
            if moved.rowcount != 1:
                raise FencedError("another ledger writer moved the ledger on; this batch was not written")
            if rows and part is not None and (cut_at or part.period is None):
                await self._insert_partitioned(conn, part, rows, cut_at, now)
            elif rows:
                await self._insert(conn, rows)
            if checkpoints:
                await self._insert_checkpoints(conn, checkpoints)
            await self._insert_nodes(conn, nodes)
            if log_checkpoint is not None:
                await self._insert_log_checkpoint(conn, log_checkpoint)
        if checkpoint is not None:
            self._last_checkpoint = now
        self.position = position
        return Appended(len(rows), len(records) - len(rows), checkpoints)

    async def _insert_checkpoints(self, conn: AsyncConnection, checkpoints: Sequence[Checkpoint]) -> None:
        """Store signed checkpoints. One already stored over the same records
        with the same chain head and Merkle root is the same checkpoint (kept
        with its own signature); any other stored in the way is an
        inconsistent ledger (:class:`LedgerError`), never a retry."""
        statement = _insert_ignoring_duplicates(self.engine.dialect.name, _CHECKPOINTS)
        result = await conn.execute(
            statement.returning(_CHECKPOINTS.c.first_seq),
            [
                {
                    "first_seq": cp.first_seq,
                    "last_seq": cp.last_seq,
                    "chain_head": cp.chain_head.hex(),
                    "merkle_root": cp.merkle_root.hex(),
                    "created_at": cp.created_at,
                    "algorithm": cp.algorithm,
                    "key_id": cp.key_id,
                    "signature": cp.signature.hex(),
                }
                for cp in checkpoints
            ],
        )
        written = set(result.scalars())
        kept = [cp for cp in checkpoints if cp.first_seq not in written]
        if not kept:
            return
        rows = await conn.execute(
            select(_CHECKPOINTS).where(
                _CHECKPOINTS.c.first_seq.in_([cp.first_seq for cp in kept])
                | _CHECKPOINTS.c.last_seq.in_([cp.last_seq for cp in kept])
            )
        )
        stored = {(r.first_seq, r.last_seq, r.chain_head, r.merkle_root) for r in rows}
        for cp in kept:
            if (cp.first_seq, cp.last_seq, cp.chain_head.hex(), cp.merkle_root.hex()) not in stored:
                raise LedgerError(
                    f"a different checkpoint over records {cp.first_seq}..{cp.last_seq} "
                    "is already stored: run 'pdg audit verify'"
                )
            log.warning("the checkpoint of records %d..%d was already stored", cp.first_seq, cp.last_seq)

    async def _insert_log_checkpoint(self, conn: AsyncConnection, head: dict[str, Any]) -> None:
        """Store a signed head of the whole-log tree. A head of the same size
        is already there when the tree has not grown since the last one (a
        checkpoint cut inside a batch signs the tree as the batch leaves it,
        and a timer checkpoint of that batch's tail finds it the same size):
        it is kept, once its root is found the same."""
        statement = _insert_ignoring_duplicates(self.engine.dialect.name, _LOG_CHECKPOINTS)
        if (await conn.execute(statement, head)).rowcount == 1:
            return
        stored = await conn.scalar(
            select(_LOG_CHECKPOINTS.c.root).where(_LOG_CHECKPOINTS.c.size == head["size"])
        )
        if stored != head["root"]:
            raise LedgerError(
                f"a different head of the whole-log tree at {head['size']} records "
                "is already stored: run 'pdg audit verify'"
            )

    async def _unseen(self, conn: AsyncConnection, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` without those already in the ledger or repeated in the batch."""
        ids = [r["call_id"] for r in records]
        if not ids:
            return []
        stored: set[str] = set()
        if self._postgres:
            # One array parameter, planned for its values: a cached generic
            # plan of this query was seen to scan the table.
            await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
            result = await conn.execute(
                text("SELECT call_id FROM calls WHERE call_id = ANY(:ids)"), {"ids": ids}
            )
            stored.update(result.scalars())
        else:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                result = await conn.execute(select(_CALLS.c.call_id).where(_CALLS.c.call_id.in_(chunk)))
                stored.update(result.scalars())
        fresh = []
        for record in records:
            if record["call_id"] in stored:
                continue
            stored.add(record["call_id"])
            fresh.append(record)
        return fresh

    async def _insert_partitioned(
        self,
        conn: AsyncConnection,
        part: OpenPartition,
        rows: list[dict[str, Any]],
        cut_at: list[tuple[int, str]],
        now: datetime,
    ) -> None:
        """Insert ``rows``, closing the open partition before each row that
        opens a new one (``ledger.partitions``)."""
        if part.period is None:
            await record_open(conn, part, period_of_time(rows[0]["time"], self._zone), rows[0]["time"])
        start = 0
        for index, period in cut_at:
            if index > start:
                await self._insert(conn, rows[start:index])
            await close_open(conn, part, rows[index]["seq"], period, rows[index]["time"], now)
            log.info("ledger partition %s opened at seq %d", period, rows[index]["seq"])
            start = index
        await self._insert(conn, rows[start:])

    async def _insert(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        if self._postgres:
            values = [tuple(self._bound(row)) for row in rows]
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            await driver.copy_records_to_table("calls", records=values, columns=_COLUMNS)  # type: ignore[union-attr]
            return
        # Many rows per statement: the driver lets go of the GIL once per
        # statement step, and a gateway's event loop shares this process. The
        # statement's parameters are the rows' values one after the other.
        start = 0
        for size in _statement_sizes(len(rows)):
            flat: list[Any] = []
            for row in rows[start : start + size]:
                flat += self._bound(row)
            start += size
            await conn.exec_driver_sql(_sqlite_insert(size), tuple(flat))

    def _bound(self, row: dict[str, Any]) -> list[Any]:
        """The row's column values, bound here by the columns' own types (times
        as UTCDateTime stores them, naive UTC): SQLAlchemy's per-row parameter
        handling cost more than the database's own work."""
        one = list(_COLUMN_VALUES(row))
        for i, bind in self._binders:
            one[i] = bind(one[i])
        return one


_COLUMN_VALUES = operator.itemgetter(*_COLUMNS)
#: Most rows per INSERT on SQLite (within its 32,766 parameters per
#: statement): a power of two.
_SQLITE_ROWS = 512


def _statement_sizes(rows: int) -> list[int]:
    """``rows`` cut into statements of :data:`_SQLITE_ROWS` rows, then of
    smaller powers of two: the few shapes of INSERT there are stay in the
    driver's statement cache, where one shape per batch size grew the
    writer's memory by hundreds of megabytes under a steady load."""
    sizes = [_SQLITE_ROWS] * (rows // _SQLITE_ROWS)
    rest = rows % _SQLITE_ROWS
    size = _SQLITE_ROWS // 2
    while rest:
        if rest >= size:
            sizes.append(size)
            rest -= size
        size //= 2
    return sizes


@functools.cache
def _sqlite_insert(rows: int) -> str:
    one = "({})".format(", ".join("?" * len(_COLUMNS)))
    return "INSERT INTO calls ({}) VALUES {}".format(  # noqa: S608 - fixed column names
        ", ".join(_COLUMNS), ", ".join([one] * rows)
    )


def _binders(dialect: Dialect) -> list[tuple[int, Callable[[Any], Any]]]:
    """The bind processors of the ``calls`` columns that have one on
    ``dialect``, by column position (times on SQLite: :func:`sqlite_utc`)."""
    found: list[tuple[int, Callable[[Any], Any] | None]] = []
    for i, name in enumerate(_COLUMNS):
        kind = _CALLS.c[name].type
        if dialect.name == "sqlite" and isinstance(kind, UTCDateTime):
            found.append((i, sqlite_utc))
        else:
            found.append((i, kind.bind_processor(dialect)))
    return [(i, bind) for i, bind in found if bind is not None]


def sqlite_utc(value: datetime) -> str:
    """An aware UTC datetime as a ``UTCDateTime`` column stores it in SQLite
    (naive UTC, which the driver spells ``value.isoformat(" ")``): its own
    ``isoformat(" ")`` less the ``+00:00`` that :func:`require_utc` vouches
    for, in one C call rather than through the column's processor and the
    driver's adapter."""
    require_utc(value, "a call record time")
    return value.isoformat(" ")[:-6]


def _insert_ignoring_duplicates(dialect: str, table: Table) -> Any:
    """``INSERT`` that skips rows whose primary key is already there."""
    if dialect == "postgresql":
        return postgresql_insert(table).on_conflict_do_nothing()
    return sqlite_insert(table).on_conflict_do_nothing()
