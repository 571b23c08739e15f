"""The ledger writer: moves the log (a Redis stream) into the SQL ledger, and
ends the calls that dead replicas left unfinished.

One writer runs at a time: it holds a lock in Redis (renewed while it works)
and, should two ever overlap, the SQL state row fences them
(``ledger.store``). Each batch is read from the position stored with the last
committed batch, written in one transaction with the new position, then
trimmed from the stream. A writer killed anywhere re-reads from the stored
position; records already in the ledger are skipped by call id. So every log
entry lands exactly once, with no gap. Batches are grouped in time
(``ledger.writer_linger_seconds``): a batch costs the same fixed work whatever
its size, so under load the writer moves a few large batches a second rather
than many small ones.

If SQL is down the writer retries with backoff and the records wait in the
stream; gateways fail closed once the backlog passes ``ledger.max_backlog``.

**Recovery** (every couple of seconds): a reserved call's in-flight entry
names its replica. Entries of replicas that are no longer heard from
(``ledger.log.Presence``) are ended here. First the log is drained, so the
ledger holds whatever those replicas appended before they died; a call with
no record then gets one, ``incomplete`` (appended to the log like any other,
so it takes its place in the order); finally each call is settled or
released by what its record says, by the same script a gateway uses, which
acts only if the entry is still there. A served call stays charged; any
other is released and never charged.

**Catching up for a close** (:meth:`LedgerWriter.catch_up`): a billing close
runs a writer of its own (its own lock owner) that does the same steps on
demand -- recovery, then the log up to its newest entry, once no call of the
period is in flight -- or, while another writer holds the lock, waits for that
writer to move the log past that entry; what is still missing after a bounded
wait is answered (:class:`Waiting`) for the close to refuse or list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from config.settings import Settings
from core import sm2
from ledger.chain import rfc3339
from ledger.log import LOG, REPLICAS, WRITER_LOCK, live_replicas
from ledger.models import CallRow, LedgerStateRow
from ledger.note import NoteError, signer_from_file
from ledger.record import INCOMPLETE, SERVED, RecordError, from_log, from_opening, to_log
from ledger.store import FencedError, LedgerError, LedgerStore
from licensing.keys import load_or_create_signing_key
from metering import inflight
from metering.quota import Scripts
from storage.redis import COMMAND_TIMEOUT, REDIS_ERRORS, RedisClient, execute_raw
from storage.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: How long the writer lock lasts unless renewed.
LOCK_SECONDS = 10.0
RECOVERY_SECONDS = 2.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Forget replicas dead for a whole extra timeout (their calls are ended by then).
_PRUNE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now_ms - tonumber(ARGV[1])))
"""


def _entries(reply: Any) -> list[Any]:
    """The entries in ``XREAD``'s reply for one stream, ``[id, fields]`` each
    (the reply is a map in RESP3, a list of ``[stream, entries]`` in RESP2)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values())))
    return list(reply[0][1])


def _after(entry_id: str) -> str:
    """The smallest stream id after ``entry_id`` (for ``XTRIM MINID``)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


@dataclass(frozen=True, slots=True)
class _Batch:
    """Log entries read after ``after``: the records among them, the last
    entry's id (``None``: there were none) and how many there were."""

    after: str
    records: list[dict[str, Any]]
    last: str | None
    count: int


@dataclass(frozen=True, slots=True)
class Unfinished:
    """An in-flight entry of a call whose replica is gone: what its
    reservation took and where, and the opening fields of its record."""

    licence_id: str
    call_id: str
    cost: int
    kind: str
    idempotent: bool
    #: Its pool counter, paid calls and idempotency record (``reserve.lua``).
    keys: tuple[str, str, str]
    record: dict[str, Any]


def _in_flight(licence_id: str, call_id: str, value: bytes) -> tuple[str, Unfinished]:
    """An in-flight entry (``metering.inflight``), and the replica that holds it."""
    entry = inflight.parse(value)
    return entry.replica, Unfinished(
        licence_id, call_id, entry.cost, entry.kind, entry.idempotent, entry.keys, from_opening(entry.record)
    )


def stream_id(entry_id: str) -> tuple[int, int]:
    """A log entry id (``"ms-seq"``) as a pair that sorts as the log does."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


#: At most this many calls are listed in :class:`Waiting` (all are counted).
WAITING_LISTED = 1000


@dataclass(frozen=True, slots=True)
class Waiting:
    """What of a period (and the periods before it) has not reached the
    ledger after :meth:`LedgerWriter.catch_up`: its records still in the log
    and its calls still in flight. ``reason`` says why, in one line. Counts
    are ``None`` when the log could not be read at all."""

    period: str
    reason: str | None = None
    log_records: int | None = 0
    in_flight: int | None = 0
    #: Up to :data:`WAITING_LISTED` of them: ``where`` is ``log`` or ``in-flight``.
    calls: tuple[dict[str, Any], ...] = ()
    #: The reply should be 409 (calls still in flight) rather than 503.
    busy: bool = False

    def __bool__(self) -> bool:
        return self.reason is not None

    @property
    def truncated(self) -> bool:
        return len(self.calls) < (self.log_records or 0) + (self.in_flight or 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "log_records": self.log_records,
            "in_flight": self.in_flight,
            "calls": list(self.calls),
            "truncated": self.truncated,
        }


def _listed(where: str, record: dict[str, Any]) -> dict[str, Any]:
    started = record["started_at"]
    return {
        "call_id": record["call_id"],
        "where": where,
        "licensee_id": record["licensee_id"],
        "licence_id": record["licence_id"],
        "dataset_id": record["dataset_id"],
        "purpose": record["purpose"],
        "period": record["period"],
        "started_at": started if isinstance(started, str) else rfc3339(started),
        "outcome": record.get("outcome"),
    }


def incomplete_record(opened: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The record of a call its replica never finished: what was known when it
    was reserved, no response."""
    record = dict(opened)
    started = datetime.fromisoformat(record["started_at"])
    record.update(
        time=now,
        status=0,
        upstream_status=None,
        outcome=INCOMPLETE,
        problem=None,
        records=0,
        bytes=0,
        latency_us=max(0, int((now - started).total_seconds() * 1_000_000)),
        charge_e4=0,
        response_digest=None,
        upstream_target=None,
    )
    return record


class LedgerWriter:
    def __init__(
        self,
        client: RedisClient,
        store: LedgerStore,
        *,
        owner: str,
        batch: int = 5000,
        linger: float = 0.0,
        replica_timeout: float = 15.0,
        licences: Callable[[], Awaitable[Sequence[str]]],
    ) -> None:
        self.client = client
        self.store = store
        self.owner = owner
        self.batch = batch
        self.linger = linger
        self.replica_timeout = replica_timeout
        self.licences = licences
        self.scripts = Scripts()
        self.holding = False
        self._ahead: asyncio.Task[_Batch] | None = None
        self._renewed = float("-inf")
        self._stopping = asyncio.Event()
        #: Records moved and calls recovered since start (for metrics and tests).
        self.moved = 0
        self.recovered = 0

    # -- the lock -----------------------------------------------------------

    async def hold_lock(self) -> bool:
        """Take or keep the writer lock; ``False`` while another writer has it."""
        if self.holding and time.monotonic() - self._renewed < LOCK_SECONDS / 5:
            return True
        async with asyncio.timeout(COMMAND_TIMEOUT):
            got = await self.client.eval(_RENEW, 1, WRITER_LOCK, self.owner, int(LOCK_SECONDS * 1000))
        holding = bool(got)
        if holding and not self.holding:
            # Another writer may have moved the ledger on meanwhile.
            self.store.writer = None
        self.holding = holding
        if holding:
            self._renewed = time.monotonic()
        return holding

    async def let_go(self) -> None:
        if self.holding:
            self.holding = False
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    await self.client.eval(_RELEASE, 1, WRITER_LOCK, self.owner)

    # -- moving the log -----------------------------------------------------

    async def _read(self, after: str, block_ms: int | None) -> _Batch:
        """Up to a batch of log entries after ``after``, parsed."""
        async with asyncio.timeout(COMMAND_TIMEOUT + (block_ms or 0) / 1000):
            if isinstance(self.client, aioredis.RedisCluster):
                reply: Any = await self.client.xread({LOG: after}, count=self.batch, block=block_ms)
                entries = [(entry_id, [b"r", fields.get(b"r")]) for entry_id, fields in _entries(reply)]
            else:
                # As the server sent it: redis-py would build a dict per entry.
                block = ("BLOCK", block_ms) if block_ms is not None else ()
                command = ("XREAD", "COUNT", self.batch, *block, "STREAMS", LOG, after)
                (reply,) = await execute_raw(self.client, (command,))
                if isinstance(reply, Exception):
                    raise reply
                entries = _entries(reply)
        records = []
        for entry_id, fields in entries:
            try:
                records.append(from_log(fields[1]))
            except (RecordError, IndexError, TypeError) as exc:
                log.error("log entry %s is not a call record (%s); it is skipped", entry_id, exc)
        last = None
        if entries:
            entry_id = entries[-1][0]
            last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return _Batch(after, records, last, len(entries))

    async def _next(self, block_ms: int | None) -> _Batch:
        """The batch after the ledger's position: the one read ahead, if it
        still follows on, else a fresh read."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            current = asyncio.current_task()
            try:
                batch = await ahead
            except asyncio.CancelledError:
                if current is not None and current.cancelling():
                    raise
            except REDIS_ERRORS:
                pass  # read again below, where a failure counts
            else:
                if batch.after == self.store.position and batch.last is not None:
                    return batch
        return await self._read(self.store.position, block_ms)

    async def _discard_ahead(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(Exception):
                await cancel_and_wait(ahead)

    async def step(self, block_ms: int | None = None) -> int:
        """Move one batch from the log into the ledger; the number of log
        entries consumed (0 when the log is drained)."""
        if self.store.writer is None:
            await self.store.load()
        batch = await self._next(block_ms)
        if batch.last is None:
            if self.store.checkpoint_due(datetime.now(UTC)):
                await self.store.append([], self.store.position)
            # Entries moved by a writer that died before trimming them (or
            # whose trim failed) still count in the backlog: trim them now.
            if self.store.position != "0-0":
                with contextlib.suppress(*REDIS_ERRORS):
                    async with asyncio.timeout(COMMAND_TIMEOUT):
                        await self.client.xtrim(LOG, minid=_after(self.store.position), approximate=False)
            return 0
        if batch.count == self.batch:
            # A backlog: read and parse the next batch while this one is
            # written (the database works meanwhile). A batch read ahead is
            # used only if this one lands.
            self._ahead = asyncio.get_running_loop().create_task(self._read(batch.last, None))
        done = await self.store.append(batch.records, batch.last)
        self.moved += done.written
        # Trimmed by whole stream nodes here (cheap; a node holds ~100
        # entries), exactly once the log is drained.
        with contextlib.suppress(*REDIS_ERRORS):
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await self.client.xtrim(LOG, minid=_after(batch.last), approximate=True)
        return batch.count

    async def drain(self) -> int:
        moved = 0
        while n := await self.step():
            moved += n
        return moved

    # -- recovery -----------------------------------------------------------

    async def _in_flight(self) -> list[tuple[str, Unfinished]]:
        """Every call in flight on any replica, with the replica that holds it."""
        licences = list(await self.licences())
        if not licences:
            return []
        found: list[tuple[str, Unfinished]] = []
        async with asyncio.timeout(COMMAND_TIMEOUT * 2):
            pipe = self.client.pipeline(transaction=False)
            for licence_id in licences:
                pipe.hgetall(inflight.key(licence_id))
            replies = await pipe.execute()
        for licence_id, entries in zip(licences, replies, strict=True):
            for call_id, value in entries.items():
                if call_id.endswith(inflight.PRICE_SUFFIX.encode()):
                    continue  # a call's price (finish.lua), beside its entry
                try:
                    found.append(_in_flight(licence_id, bytes(call_id).decode(), bytes(value)))
                except (ValueError, UnicodeDecodeError):  # RecordError is a ValueError
                    log.error("in-flight entry %s of licence %s is unreadable", call_id, licence_id)
        return found

    async def _unfinished(self) -> list[Unfinished]:
        live = await live_replicas(self.client)
        return [call for replica, call in await self._in_flight() if replica not in live]

    async def _recorded(self, call_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        calls = CallRow.__table__
        async with self.store.engine.connect() as conn:
            query = select(calls.c.call_id, calls.c.outcome, calls.c.charge_e4)
            rows = await conn.execute(query.where(calls.c.call_id.in_(call_ids)))
            return {row.call_id: (row.outcome, row.charge_e4) for row in rows}

    async def recover(self) -> int:
        """End the calls of dead replicas; the number ended."""
        unfinished = await self._unfinished()
        if not unfinished:
            await self._prune()
            return 0
        await self.drain()
        recorded = await self._recorded([u.call_id for u in unfinished])
        missing = [u for u in unfinished if u.call_id not in recorded]
        if missing:
            now = datetime.now(UTC)
            async with asyncio.timeout(COMMAND_TIMEOUT * 2):
                pipe = self.client.pipeline(transaction=False)
                for u in missing:
                    pipe.xadd(LOG, {"r": to_log(incomplete_record(u.record, now))})
                await pipe.execute()
            await self.drain()
            recorded = await self._recorded([u.call_id for u in unfinished])
        ended = 0
        source = self.scripts.source["finish"]
        for u in unfinished:
            outcome, charge = recorded.get(u.call_id, (INCOMPLETE, 0))
            pool, paid, idem = u.keys
            # A served call keeps the charge its record holds (finish.lua
            # gives a credit pool back what its worst case held beyond it).
            action, extra = ("settle", charge) if outcome == SERVED else ("release", 0)
            async with asyncio.timeout(COMMAND_TIMEOUT):
                result = await self.client.eval(
                    source,
                    4,
                    pool,
                    paid,
                    idem,
                    inflight.key(u.licence_id),
                    1,  # one call,
                    0,  # no log,
                    0,  # no deadline,
                    0,  # no record alone
                    action,
                    extra,
                    u.kind,
                    1 if u.idempotent else 0,
                    u.call_id,
                    "",
                    0,
                    "",
                    "",  # no response kept: a retry gets 409 conflict
                )
            ended += int(result[0])
        self.recovered += ended
        if ended:
            log.warning("ended %d call(s) left unfinished by replicas that stopped", ended)
        await self._prune()
        return ended

    async def _prune(self) -> None:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await self.client.eval(_PRUNE, 1, REPLICAS, int(self.replica_timeout * 1000))

    # -- catching up for a close ---------------------------------------------

    async def _newest(self) -> str | None:
        """The id of the log's newest entry (``None``: the log is empty)."""
        async with asyncio.timeout(COMMAND_TIMEOUT):
            last = await self.client.xrevrange(LOG, count=1)
        if not last:
            return None
        entry_id = last[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _stored_position(self) -> str:
        """The log position the ledger has moved to (whichever writer moved it)."""
        async with self.store.engine.connect() as conn:
            position = await conn.scalar(select(LedgerStateRow.log_position))
        return str(position) if position is not None else "0-0"

    async def _drain_through(self, target: str) -> None:
        """Move the log into the ledger until ``target`` (a log entry id) is in."""
        if self.store.writer is None:
            await self.store.load()
        while stream_id(self.store.position) < stream_id(target):
            if not await self.step():
                break

    async def catch_up(self, period: str) -> Waiting:
        """Bring the ledger up to date for closing ``period``: end the calls
        of dead replicas, wait for the calls of ``period`` (or before) still in
        flight, and move the log into the ledger up to its newest entry -- with
        this writer's own steps when it can take the lock, else by waiting for
        the writer that holds it. What is still missing after a bounded wait
        is answered (empty when nothing is).

        The bounds: calls in flight, ``replica_timeout`` plus a recovery
        round (a killed replica's calls are ended by then: only a live
        replica's long call is still in flight); the log, once the lock is
        held by another writer that does not move it, the lock's lifetime
        (a killed writer's lock lapses by then). Redis and SQL errors are
        raised; this writer lets go of the lock either way."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        calls_until = start + self.replica_timeout + RECOVERY_SECONDS + 1.0
        log_until = start + LOCK_SECONDS + 2.0
        #: The log entry the ledger must reach: the newest once no call of the
        #: period is in flight (entries after it are of later periods).
        goal: str | None = None
        try:
            while True:
                holding = await self.hold_lock()
                if holding:
                    try:
                        await self.recover()
                    except FencedError:
                        self.store.writer = None
                        continue
                # In this order: a call leaves the in-flight hash in the
                # script run that appends its record, so a call not in
                # flight now has its record at or before the newest entry.
                calls = [u for _replica, u in await self._in_flight() if u.record["period"] <= period]
                newest = await self._newest()
                if calls:
                    goal = None
                elif goal is None:
                    goal = newest or "0-0"
                target = goal or newest or "0-0"
                if holding:
                    try:
                        await self._drain_through(target)
                    except FencedError:
                        self.store.writer = None
                        continue
                position = self.store.position if holding else await self._stored_position()
                moved = stream_id(position) >= stream_id(target)
                if moved and not calls:
                    return Waiting(period)
                now = loop.time()
                if not ((calls and now < calls_until) or (not moved and now < log_until)):
                    return await self._waiting(period, position, target, calls, holding=holding)
                await asyncio.sleep(0.2)
        finally:
            await self._discard_ahead()
            await self.let_go()

    async def _waiting(
        self, period: str, position: str, target: str, calls: list[Unfinished], *, holding: bool
    ) -> Waiting:
        """What of ``period`` (or before) is in the log after ``position`` up
        to ``target``, and in flight."""
        listed = [_listed("in-flight", u.record) for u in sorted(calls, key=lambda u: u.record["started_at"])]
        in_log = 0
        after = position
        while stream_id(after) < stream_id(target):
            batch = await self._read(after, None)
            for record in batch.records:
                if record["period"] <= period:
                    in_log += 1
                    if len(listed) < WAITING_LISTED:
                        listed.append(_listed("log", record))
            if batch.last is None:
                break
            after = batch.last
        if calls:
            oldest = listed[0]
            reason = (
                f"{len(calls)} call(s) of {period} or before are still in flight "
                f"(the oldest, {oldest['call_id']}, since {oldest['started_at']})"
            )
            if in_log:
                reason += f", and {in_log} record(s) of it still wait in the call-record log"
        elif in_log:
            why = "they could not be moved" if holding else "the writer that holds it has not moved them"
            reason = f"{in_log} record(s) of {period} or before still wait in the call-record log: {why}"
        else:
            return Waiting(period)
        return Waiting(period, reason, in_log, len(calls), tuple(listed[:WAITING_LISTED]), busy=bool(calls))

    # -- the loop -----------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return after the step it is in."""
        self._stopping.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def run(self) -> None:
        """Work while holding the lock; stand by otherwise; until :meth:`stop`."""
        backoff = 0.5
        next_recovery = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if not await self.hold_lock():
                        await self._pause(1.0)
                        continue
                    started = time.monotonic()
                    moved = await self.step(block_ms=200)
                    if 0 < moved < self.batch and self.linger:
                        # Let the next batch gather (see ledger.writer_linger_seconds).
                        await self._pause(self.linger - (time.monotonic() - started))
                    if time.monotonic() >= next_recovery:
                        await self.recover()
                        next_recovery = time.monotonic() + RECOVERY_SECONDS
                    backoff = 0.5
                except FencedError as exc:
                    log.warning("%s", exc)
                    self.store.writer = None
                except LedgerError as exc:
                    log.error("ledger writer: %s", exc)
                    await self._pause(5.0)
                except (SQLAlchemyError, *REDIS_ERRORS) as exc:
                    log.warning("ledger writer: %s; retrying in %.1f s", _why(exc), backoff)
                    await self._pause(backoff)
                    backoff = min(5.0, backoff * 2)
        finally:
            await self._discard_ahead()
            await self.let_go()

    async def finish(self, within: float = 5.0) -> None:
        """On a clean stop: move what is in the log now, if this writer may."""
        try:
            with contextlib.suppress(SQLAlchemyError, LedgerError, *REDIS_ERRORS):
                async with asyncio.timeout(within):
                    if await self.hold_lock():
                        await self.drain()
                        await self.store.append([], self.store.position, force_checkpoint=True)
        finally:
            await self._discard_ahead()


def _why(exc: BaseException) -> str:
    """The error's type and, for a database error, the driver's first line
    (which constraint failed): never the statement or its parameters."""
    orig = getattr(exc, "orig", None)
    detail = str(orig).splitlines()[0][:200] if orig is not None and str(orig) else ""
    return f"{type(exc).__name__} ({detail})" if detail else type(exc).__name__


def _licence_lister(engine: AsyncEngine) -> Callable[[], Awaitable[Sequence[str]]]:
    from licensing.models import LicenceRow

    async def licences() -> Sequence[str]:
        async with engine.connect() as conn:
            return list((await conn.execute(select(LicenceRow.id))).scalars())

    return licences


def build_writer(settings: Settings, engine: AsyncEngine, client: RedisClient, *, owner: str) -> LedgerWriter:
    """The writer of a deployment, as its settings say."""
    sm2.start(required=settings.ledger.signing_algorithm == sm2.ALG)
    key = load_or_create_signing_key(settings.ledger_key_path, settings.ledger.signing_algorithm)
    try:
        log_signer = signer_from_file(settings.log_key_path, settings.log_origin)
    except NoteError as exc:
        raise LedgerError(str(exc)) from exc
    ledger = settings.ledger
    store = LedgerStore(
        engine,
        key,
        algorithm=ledger.hash_algorithm,
        checkpoint_records=ledger.checkpoint_records,
        checkpoint_seconds=ledger.checkpoint_seconds,
        time_zone=settings.billing.time_zone,
        log_signer=log_signer,
    )
    return LedgerWriter(
        client,
        store,
        owner=owner,
        batch=ledger.writer_batch,
        linger=ledger.writer_linger_seconds,
        replica_timeout=ledger.replica_timeout_seconds,
        licences=_licence_lister(engine),
    )


@contextlib.asynccontextmanager
async def start_writer(
    settings: Settings, engine: AsyncEngine, client: RedisClient, *, owner: str
) -> AsyncIterator[LedgerWriter]:
    """Run a writer in the background for the life of the block; on the way
    out, move what is left in the log (bounded) and let go of the lock."""
    writer = build_writer(settings, engine, client, owner=owner)
    task = asyncio.get_running_loop().create_task(writer.run(), name="ledger-writer")
    try:
        yield writer
    finally:
        writer.stop()
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT * 3):
                await asyncio.shield(task)
        except TimeoutError:
            await cancel_and_wait(task)
        await writer.finish()
        await writer.let_go()
