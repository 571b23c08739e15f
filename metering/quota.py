"""Quotas: the free public-interest allowance, the paid industrial pool and
the per-app burst limit, exact across any number of replicas (DESIGN §4).

Each call is *reserved* before it is forwarded and *settled* (served: stays
charged) or *released* (upstream failure: never charged) afterwards, by Lua
scripts that run atomically in Redis (``metering/lua/*.lua``). The scripts'
keys share the licence's ``{hash tag}``, so each touches one Redis Cluster
slot and the same code runs on a single server and on a Cluster.

Pools:

- ``free``: ``public-interest`` calls, per licence, dataset and period, up to
  the licence's ``free_monthly_calls`` override, else the dataset's;
- ``prepaid``: ``industrial`` calls, per licence, a balance of calls that
  does not reset; a top-up raises the limit, the counter is never rewritten;
- ``credit``: ``industrial`` calls, per licence and period, in 1/10000 fen:
  a reservation holds the call's worst case (the dearest tier it can still
  land in, plus its records' most at ``max_records_per_call``), settlement
  keeps its actual charge;
- ``none``: an industrial call on a licence without paid terms: 402.

Paid calls (prepaid and credit) are priced when they are settled, at the next
position of the dataset's graduated tiers (per licence, dataset and period):
the n-th charged call of a period is priced at position n, whatever fails, is
released or is replayed in between, on any number of replicas
(``finish.lua``).

No call pays a round trip of its own: reservations, finishes (settle or
release) and call-record appends of all calls in flight are sent together,
one pipeline per event-loop turn (``QuotaBatcher``), each kind as one script
run for the whole batch on a single server.

Every run carries a deadline in the server's time (``storage.redis.ServerClock``,
kept by the replica's heartbeat), half a second short of the time its caller
waits (``COMMAND_TIMEOUT``): a server that stalls and then resumes does
nothing for the calls that stopped waiting (they were answered 503). A call
whose reservation or finish was not answered is handed to the ledger writer
by its call id (``ledger.log.Presence.orphan``): whatever the server made of
it before the deadline is released (or settled, if its record says served),
so counters always equal the served calls.

A reservation enters the call in its licence's in-flight hash in the same
script run that counts it, with the cost it took and a marker (the replica,
the keys, the record so far); the finish removes it in the run that settles
or releases. A replica killed in between leaves the entry, and the ledger
writer uses it to release the call and record it as ``incomplete``
(``ledger.writer``).

A call with an Idempotency-Key holds the key's record (per app) in the same
runs: the reservation binds it to the request's fingerprint while the call
is in flight, the settlement marks it done for 24 h with the served response
when the gateway keeps one, a release frees it. A retry is judged by it
before any pool: another request (422), still in flight (409), served (the
kept response, or 409 when none was kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from ledger.record import with_charge
from metering import inflight
from metering.periods import Period
from storage.redis import COMMAND_TIMEOUT, RedisClient, ServerClock, execute_raw

RESERVED, RATE_LIMITED, EXHAUSTED, REPLAYED, IN_FLIGHT = 0, 1, 2, 3, 4
#: The Idempotency-Key was first used for another request; a retry of a
#: served call whose response was not kept (``reserve.lua``).
IDEMPOTENCY_MISMATCH, NOT_KEPT = 5, 6
#: The script ran past the reservation's deadline: it did nothing
#: (``reserve.lua``); a finish or append past its deadline (``finish.lua``).
LATE, PAST_DEADLINE = 7, -2
#: A reservation must be made this long before its caller stops waiting
#: (``COMMAND_TIMEOUT`` after its batch is sent), in the server's time.
DEADLINE_MARGIN = 0.5
#: How long a call whose finish went unanswered waits, past the run's
#: deadline, for the store to say whether the run happened.
RESOLVE_SECONDS = 5.0
#: Whether a call is in flight, and the server's time.
_IN_FLIGHT = """
local t = redis.call('TIME')
return {redis.call('HEXISTS', KEYS[1], ARGV[1]), t[1], t[2]}
"""
#: Pipelines in flight at once. Calls that arrive meanwhile wait for one to
#: come back and then go together: an idle gateway sends each call at once,
#: a busy one sends larger batches (group commit), so the cost per call falls
#: as the load rises.
MAX_BATCHES_IN_FLIGHT = 2


class QuotaStoreError(Exception):
    """The quota store cannot be reached or answered nonsense."""


def _script(name: str) -> str:
    return resources.files("metering").joinpath("lua", name).read_text(encoding="utf-8")


class Scripts:
    """The Lua scripts, loaded once per server (again after a restart)."""

    names = ("reserve", "finish")

    def __init__(self) -> None:
        self.source = {name: _script(f"{name}.lua") for name in self.names}
        self.sha = {
            name: hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest()
            for name, src in self.source.items()
        }

    async def load(self, client: RedisClient) -> None:
        for source in self.source.values():
            # On a Cluster, redis-py sends SCRIPT LOAD to every primary.
            await client.script_load(source)


@dataclass(frozen=True, slots=True)
class LicenceKeys:
    """The Redis keys of one licence. All share the licence's hash tag, so
    every script touches one Cluster slot."""

    licence_id: str

    @property
    def prefix(self) -> str:
        return f"pdg:{{{self.licence_id}}}"

    def free(self, dataset_id: str, period: Period) -> str:
        return f"{self.prefix}:free:{dataset_id}:{period.name}"

    def prepaid(self) -> str:
        return f"{self.prefix}:prepaid"

    def credit(self, period: Period) -> str:
        return f"{self.prefix}:credit:{period.name}"

    def no_paid_terms(self) -> str:
        return f"{self.prefix}:paid-none"

    def paid_calls(self, dataset_id: str, period: Period) -> str:
        return f"{self.prefix}:paidcalls:{dataset_id}:{period.name}"

    def burst(self, app_id: str, dataset_id: str) -> str:
        return f"{self.prefix}:burst:{app_id}:{dataset_id}"

    def idempotency(self, app_id: str, key: str | None) -> str:
        # A hash (``reserve.lua``): "idempotency", not the "idem" that named
        # the plain strings of earlier versions, so the two never meet.
        digest = hashlib.sha256(key.encode()).hexdigest()[:32] if key else "-"
        return f"{self.prefix}:idempotency:{app_id}:{digest}"

    def inflight(self) -> str:
        return inflight.key(self.licence_id)


@dataclass(frozen=True, slots=True)
class Pool:
    kind: str  # free | prepaid | credit | none
    limit: int
    counter_key: str
    name: str  # as shown in RateLimit headers: "free" or "paid"
    window_seconds: int | None  # None: a balance that does not reset
    reset_seconds: int | None


@dataclass(frozen=True, slots=True)
class Reservation:
    """One call's reservation request; built by ``plan_reservation``."""

    licence_id: str
    call_id: str
    #: burst, pool counter, paid calls of the dataset, idempotency record,
    #: the licence's in-flight hash
    keys: tuple[str, str, str, str, str]
    args: tuple[Any, ...]
    pool: Pool
    burst_capacity: int
    burst_window: float
    idempotent: bool
    #: The price list a paid call is priced from when it is settled
    #: (``finish.lua``'s ``prices``): ``"<per call>;<up_to>:<price>;..."``.
    prices: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    used: int
    #: What the pool took: calls, or the call's worst case in 1/10000 fen on
    #: a credit pool.
    cost: int
    retry_after_ms: int = 0
    #: The call that first used the Idempotency-Key (a replay, a call in
    #: flight, a mismatch, a response not kept).
    first_call_id: str = ""
    #: A replay: the response kept for the key (``Charge.keep``'s form).
    response: bytes | None = None


@dataclass(frozen=True, slots=True)
class Terms:
    """What a call draws on: the numbers from the licence and the dataset."""

    licence_id: str
    app_id: str
    dataset_id: str
    purpose: str
    free_limit: int
    prepaid_calls: int | None
    credit_limit_fen: int | None
    per_call_e4: int
    tiers: Sequence[tuple[int | None, int]] = field(default_factory=tuple)
    burst_per_second: float = 100.0
    burst_capacity: int = 100
    #: The most a call's records can cost (1/10000 fen): the per-record price
    #: times the dataset's ``max_records_per_call``.
    worst_records_e4: int = 0


def pool_kind(terms: Terms) -> str:
    """The pool a call on these terms draws on: free | prepaid | credit | none."""
    if terms.purpose == "public-interest":
        return "free"
    if terms.prepaid_calls is not None:
        return "prepaid"
    if terms.credit_limit_fen is not None:
        return "credit"
    return "none"


@dataclass(frozen=True, slots=True)
class ReservationPlan:
    """What every reservation of one app's calls to one dataset under one
    licence in one period shares: keys, script arguments and prices, made
    once (:func:`plan`) and used for each call (:meth:`reservation`)."""

    licence_id: str
    period: Period
    #: The period's end (UTC): a reservation's reset is counted to it.
    end: datetime
    kind: str
    limit: int
    name: str
    window_seconds: int | None
    keys: tuple[str, str, str, str, str]
    #: The script's arguments before the call's own (interval, tolerance, kind, limit).
    head: tuple[Any, ...]
    per_call_e4: int
    worst_records_e4: int
    tiers: tuple[int, ...]
    burst_capacity: int
    burst_window: float
    prices: str
    app_id: str
    replica: str
    #: The in-flight marker of a call without an Idempotency-Key, before its record.
    marker_head: bytes

    def reservation(
        self,
        now: datetime,
        call_id: str,
        idempotency_key: str | None,
        *,
        record: bytes = b"[]",
        fingerprint: str = "",
    ) -> Reservation:
        """The reservation of one call at ``now`` (within the period)."""
        idempotent = idempotency_key is not None
        keys = self.keys
        if idempotent:
            idem_key = LicenceKeys(self.licence_id).idempotency(self.app_id, idempotency_key)
            keys = (*keys[:3], idem_key, keys[4])
            entry = inflight.marker(self.replica, self.kind, True, *keys[1:4], record)
        else:
            entry = self.marker_head + record
        reset = max(1, int((self.end - now).total_seconds() + 0.999999)) if self.window_seconds else None
        pool = Pool(self.kind, self.limit, keys[1], self.name, self.window_seconds, reset)
        args = (
            *self.head,
            call_id,
            1 if idempotent else 0,
            self.per_call_e4,
            entry,
            fingerprint if idempotent else "",
            self.worst_records_e4,
            *self.tiers,
        )
        return Reservation(
            self.licence_id,
            call_id,
            keys,
            args,
            pool,
            self.burst_capacity,
            self.burst_window,
            idempotent,
            self.prices,
        )


def plan(terms: Terms, period: Period, *, replica: str = "-") -> ReservationPlan:
    """The :class:`ReservationPlan` of calls on ``terms`` in ``period``,
    served by ``replica``."""
    k = LicenceKeys(terms.licence_id)
    start, end = period.start, period.end
    window = int((end - start).total_seconds())
    kind = pool_kind(terms)
    if kind == "free":
        limit, counter, name, windowed = terms.free_limit, k.free(terms.dataset_id, period), "free", True
    elif kind == "prepaid":
        limit, counter, name, windowed = terms.prepaid_calls or 0, k.prepaid(), "paid", False
    elif kind == "credit":
        limit, counter, name, windowed = (terms.credit_limit_fen or 0) * 10000, k.credit(period), "paid", True
    else:
        limit, counter, name, windowed = 0, k.no_paid_terms(), "paid", False
    keys = (
        k.burst(terms.app_id, terms.dataset_id),
        counter,
        k.paid_calls(terms.dataset_id, period),
        k.idempotency(terms.app_id, None),
        k.inflight(),
    )
    interval_us = max(1, int(1_000_000 / terms.burst_per_second))
    tiers: list[int] = []
    for up_to, price in terms.tiers:
        tiers.extend((up_to or 0, price))
    prices = ""
    if kind in ("prepaid", "credit"):
        prices = ";".join((str(terms.per_call_e4), *(f"{u or 0}:{p}" for u, p in terms.tiers)))
    return ReservationPlan(
        licence_id=terms.licence_id,
        period=period,
        end=end,
        kind=kind,
        limit=limit,
        name=name,
        window_seconds=window if windowed else None,
        keys=keys,
        head=(interval_us, interval_us * terms.burst_capacity, kind, limit),
        per_call_e4=terms.per_call_e4,
        worst_records_e4=terms.worst_records_e4,
        tiers=tuple(tiers),
        burst_capacity=terms.burst_capacity,
        burst_window=terms.burst_capacity / terms.burst_per_second,
        prices=prices,
        app_id=terms.app_id,
        replica=replica,
        marker_head=inflight.marker(replica, kind, False, *keys[1:4], b""),
    )


def plan_reservation(
    terms: Terms,
    period: Period,
    now: datetime,
    call_id: str,
    idempotency_key: str | None,
    *,
    replica: str = "-",
    record: bytes = b"[]",
    fingerprint: str = "",
) -> Reservation:
    """The reservation of one call. While it is in flight the call is entered
    in the licence's in-flight hash with a marker: the ``replica`` serving it,
    its pool and keys, and ``record`` (the call record so far, as
    ``ledger.record.opening`` spells it), which is what the ledger writer
    needs to end it if the replica dies.

    With an ``idempotency_key``, ``fingerprint`` names the request (method,
    path, query and body digest): the key is bound to it."""
    return plan(terms, period, replica=replica).reservation(
        now, call_id, idempotency_key, record=record, fingerprint=fingerprint
    )


@dataclass
class _Pending:
    script: str
    keys: Sequence[str]
    args: Sequence[Any]
    future: asyncio.Future[Any]
    #: A finish that appends the call's record: the log's key.
    log: str | None = None


@dataclass(frozen=True, slots=True)
class _Command:
    args: tuple[Any, ...]
    #: Indexes of the batch's calls this run answers, in the order of its
    #: reply (a list, one answer per call).
    answers: list[int]
    #: A plain command answering one call: its reply is that call's answer.
    single: bool = False


class QuotaBatcher:
    """Sends the script calls of all calls in flight in one pipeline per
    event-loop turn. A Redis failure fails every call of the batch (fail
    closed); the next batch tries again on a fresh connection."""

    def __init__(
        self, client: RedisClient, scripts: Scripts | None = None, *, clock: ServerClock | None = None
    ) -> None:
        self.client = client
        #: The server's clock (kept by the replica's heartbeat): reservations
        #: carry a deadline in it.
        self.clock = clock or ServerClock()
        self._cluster = isinstance(client, aioredis.RedisCluster)
        self.scripts = scripts or Scripts()
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _submit(
        self, script: str, keys: Sequence[str], args: Sequence[Any], log: str | None = None
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Pending(script, keys, args, future, log))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._pending and len(self._tasks) < MAX_BATCHES_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Calls that arrived while the batches were in flight go now, together.
        self._schedule(asyncio.get_running_loop())

    def _commands(self, batch: Sequence[_Pending], *, one_per_call: bool, deadline: int) -> list[_Command]:
        """The script runs that answer ``batch``: all its reservations in one
        run; all its finishes in another, with the records they append and the
        records appended alone, one run per log. On a Cluster a run's keys
        share one slot: one run per reservation and per finish, and the
        records appended alone in one run per log. No run does anything past
        ``deadline`` (server time, µs; 0: none)."""
        sha = self.scripts.sha
        commands = []
        reserves = [i for i, item in enumerate(batch) if item.script == "reserve"]
        for group in [[i] for i in reserves] if one_per_call else [reserves] if reserves else []:
            keys = [key for i in group for key in batch[i].keys]
            args: list[Any] = [len(group), deadline]
            for i in group:
                # A reservation's argument count varies with its tiers.
                args += [len(batch[i].args), *batch[i].args]
            commands.append(_Command(("EVALSHA", sha["reserve"], len(keys), *keys, *args), group))
        # By log: (finishes, records appended alone); a finish without a log
        # appends nothing.
        runs: dict[str | None, tuple[list[int], list[int]]] = {}
        for i, item in enumerate(batch):
            if item.script == "finish":
                if one_per_call:
                    runs[f"#{i}"] = ([i], [])
                else:
                    runs.setdefault(item.log, ([], []))[0].append(i)
            elif item.script == "append":
                runs.setdefault(item.keys[0], ([], []))[1].append(i)
        for finishes, alone in runs.values():
            log = batch[finishes[0]].log if finishes else batch[alone[0]].keys[0]
            keys = [] if log is None else [log]
            args = [len(finishes), 0 if log is None else 1, deadline, len(alone)]
            args += [batch[i].args[0] for i in alone]
            for i in finishes:
                keys += batch[i].keys
                args += batch[i].args
            commands.append(_Command(("EVALSHA", sha["finish"], len(keys), *keys, *args), finishes + alone))
        for i, item in enumerate(batch):
            if item.script == "once":
                command = ("SET", item.keys[0], b"1", "NX", "EX", item.args[0])
                commands.append(_Command(command, [i], single=True))
        return commands

    async def _execute(self, batch: Sequence[_Pending], deadline: int) -> list[Any]:
        """One answer per call of ``batch``, in order (an exception for a call
        whose script failed)."""
        commands = self._commands(batch, one_per_call=self._cluster, deadline=deadline)
        if isinstance(self.client, aioredis.RedisCluster):
            # The Cluster client routes each run to the node of its slot.
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command.args)
            replies = list(await pipe.execute(raise_on_error=False))
        else:
            replies = await execute_raw(self.client, [command.args for command in commands])
        answers: list[Any] = [None] * len(batch)
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception) or command.single:
                for i in command.answers:
                    answers[i] = reply
            else:
                for i, one in zip(command.answers, reply, strict=True):
                    answers[i] = one
        return answers

    @staticmethod
    def _fail(batch: Sequence[_Pending], error: QuotaStoreError) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    async def _send(self, batch: list[_Pending]) -> None:
        # Whatever the server gets to after the batch stopped waiting must not
        # count: a reservation nobody is told of would never be given back.
        # So a reservation is refused by the script past a deadline short of
        # the wait, in the server's time; and a call whose reservation was
        # never answered is handed to the ledger writer by its call id
        # (``gateway.call``), which releases what did land before it.
        server_now = self.clock.now_us()
        deadline = 0 if server_now is None else server_now + int((COMMAND_TIMEOUT - DEADLINE_MARGIN) * 1e6)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await self._send_within(batch, deadline)
        except TimeoutError:
            self._fail(batch, QuotaStoreError("quota store did not answer in time"))

    async def _send_within(self, batch: list[_Pending], deadline: int) -> None:
        try:
            results = await self._execute(batch, deadline)
            if any(isinstance(r, NoScriptError) for r in results):
                # A restarted (or new) server, or a Cluster primary that
                # never saw the scripts (a failover, a new node): load them on
                # every primary and run the calls that found none. Scripts
                # are idempotent per call id.
                await self.scripts.load(self.client)
                retry = [item for item, r in zip(batch, results, strict=True) if isinstance(r, NoScriptError)]
                again = iter(await self._execute(retry, deadline))
                results = [next(again) if isinstance(r, NoScriptError) else r for r in results]
        except (RedisError, RedisClusterException, OSError) as exc:
            # RedisClusterException is no RedisError (a slot no node owns, a
            # Cluster no node of which answers): fail closed on it all the same.
            self._fail(batch, QuotaStoreError(f"quota store unreachable: {type(exc).__name__}"))
            return
        except BaseException:
            # Anything else is a bug, and is raised; but no call waits forever
            # for an answer from this batch.
            self._fail(batch, QuotaStoreError("quota store failed"))
            raise
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(QuotaStoreError(f"quota script failed: {result}"))
            elif result == PAST_DEADLINE:
                item.future.set_exception(
                    QuotaStoreError("the quota store got to the call past its deadline")
                )
            else:
                item.future.set_result(result)

    async def reserve(self, reservation: Reservation) -> Outcome:
        result = await self._submit("reserve", reservation.keys, reservation.args)
        status = int(result[0])
        if status == LATE:
            raise QuotaStoreError("the quota store got to the reservation past its deadline")
        if status == RATE_LIMITED:
            return Outcome(status, 0, 0, retry_after_ms=int(result[1]))
        if len(result) <= 4:
            return Outcome(status, int(result[1]), int(result[2]))
        response = bytes(result[5]) if len(result) > 5 else None
        return Outcome(status, int(result[1]), int(result[2]), 0, bytes(result[4]).decode(), response)

    async def finish(
        self,
        reservation: Reservation,
        action: str,
        extra_e4: int = 0,
        *,
        record: tuple[str, bytes] | None = None,
        charge_at: int = 0,
        response: bytes = b"",
    ) -> bool:
        """Settle (``"settle"``: served, stays charged) or release
        (``"release"``: not charged) a reserved call. Only the first finish of
        a call acts; the answer says whether this one did.

        A paid call settled takes its tier position now and is priced from
        ``reservation.prices``; its charge is that price plus ``extra_e4``
        (what its records cost). ``record`` (a stream and an entry: the call
        record and its log) is appended first: on a single server in the same
        script run, so one round trip makes the record durable and finishes
        the call, its charge written in at byte ``charge_at`` of the entry
        (``ledger.record.to_log_uncharged``; 0: the entry is whole). On a
        Cluster, where the log has a slot of its own, a paid call is priced
        first, its record appended with the charge, then it is settled.

        ``response``: a settled idempotent call's response, kept for its
        key's retries (empty: none kept)."""
        log, entry = record if record is not None else (None, b"")
        settle = action == "settle"
        extra, prices = (extra_e4, reservation.prices) if settle else (0, "")
        if log is not None and self._cluster:
            if settle and charge_at and prices:
                price = int(await self._finish_run(reservation, "price", 0, b"", 0, prices, b"", None))
                # -1: the call was finished already (by the ledger writer).
                extra, prices = (extra + price, "") if price >= 0 else (0, "")
                entry = with_charge(entry, charge_at, extra)
            elif charge_at:
                entry = with_charge(entry, charge_at, 0)
            await self.append(log, entry)
            log, entry, charge_at = None, b"", 0
        result = await self._finish_run(reservation, action, extra, entry, charge_at, prices, response, log)
        return bool(int(result) > 0)

    async def finished(
        self, reservation: Reservation, within: float = RESOLVE_SECONDS
    ) -> tuple[bool | None, int]:
        """After a finish whose answer was lost (the connection dropped, the
        wait ran out), whether its run happened: ``True`` if the call's
        in-flight entry is gone, ``False`` if it is there, ``None`` if the
        store cannot say within ``within`` seconds; and the server's time
        of the answer (microseconds; 0 without one). Asked once the run's
        deadline has passed (``COMMAND_TIMEOUT`` from now is past it: the
        failure came at most that long after the batch was sent), so the
        answer holds: a run the server gets to later does nothing.

        Only the call's own replica finishes it while it is heard from, so a
        missing entry means its finish ran (the caller checks the replica was
        never taken for dead meanwhile: ``Presence.never_presumed_dead``)."""
        await asyncio.sleep(COMMAND_TIMEOUT)
        inflight_key = reservation.keys[4]
        end = asyncio.get_running_loop().time() + within
        while True:
            try:
                async with asyncio.timeout(min(COMMAND_TIMEOUT, within)):
                    there, seconds, micro = await self.client.eval(
                        _IN_FLIGHT, 1, inflight_key, reservation.call_id
                    )
                return not bool(int(there)), int(seconds) * 1_000_000 + int(micro)
            except (RedisError, RedisClusterException, OSError, TimeoutError):
                if asyncio.get_running_loop().time() >= end:
                    return None, 0
                await asyncio.sleep(0.1)

    def _finish_run(
        self,
        reservation: Reservation,
        action: str,
        extra: int,
        entry: bytes,
        charge_at: int,
        prices: str,
        response: bytes,
        log: str | None,
    ) -> asyncio.Future[Any]:
        _burst, pool, paid, idem, inflight = reservation.keys
        idempotent = 1 if reservation.idempotent else 0
        return self._submit(
            "finish",
            (pool, paid, idem, inflight),
            (
                action,
                extra,
                reservation.pool.kind,
                idempotent,
                reservation.call_id,
                entry,
                charge_at,
                prices,
                response,
            ),
            log,
        )

    async def settle(self, reservation: Reservation, extra_e4: int = 0) -> bool:
        return await self.finish(reservation, "settle", extra_e4)

    async def release(self, reservation: Reservation) -> bool:
        return await self.finish(reservation, "release")

    async def first_use(self, key: str, ttl: int) -> bool:
        """True the first time ``key`` is offered within ``ttl`` seconds, on
        any replica: a set-if-absent sent with the batch (a proof's ``jti``).
        Fails closed (:class:`QuotaStoreError`) when the store cannot answer."""
        return await self._submit("once", (key,), (ttl,)) is not None

    async def append(self, stream: str, data: bytes) -> None:
        """Append ``data`` to the stream (the call-record log); returns once
        the server has it."""
        await self._submit("append", (stream,), (data,))

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
