"""The call-record log in Redis, and each replica's presence there.

Gateways append each record to one Redis stream (``LOG``), in the pipeline
batches they send anyway (``metering.quota.QuotaBatcher``): a response waits
for its record's ``XADD`` to be acknowledged, never for SQL. The ledger writer
moves the stream into SQL (``ledger.writer``). The stream's entry ids give
the log its total order; all ledger keys share the ``{ledger}`` hash tag, so
on a Cluster they live together on one node.

Every replica announces itself once a second (:class:`Presence`): its id and
a deadline in a sorted set, read with the server's clock, so replicas need
not agree on time. The same round trip reads the log's length (the backlog)
and its oldest entry's id, whose milliseconds on the same clock give the
writer's lag.
A replica fails closed (503 ``ledger-unavailable``) while:

- the backlog is over ``ledger.max_backlog`` (the SQL database is down or the
  writer is behind): records would pile up without bound;
- it has not been heard for a third of ``ledger.replica_timeout_seconds``:
  past the whole timeout the writer treats it as dead and ends its unfinished
  calls as ``incomplete``, so it must stop completing calls well before that.
  A call reserved before such a silence is not completed after it either
  (:meth:`Presence.still_valid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

from core.errors import LedgerUnavailableError
from metering import inflight
from storage.redis import COMMAND_TIMEOUT, REDIS_ERRORS, RedisClient, ServerClock
from storage.tasks import cancel_and_wait

log = logging.getLogger(__name__)

LOG: Final = "pdg:{ledger}:log"
REPLICAS: Final = "pdg:{ledger}:replicas"
WRITER_LOCK: Final = "pdg:{ledger}:writer"
#: At most this long between heartbeats (shorter for short timeouts: a third
#: of the timeout always spans several beats).
BEAT_SECONDS: Final = 1.0

_BEAT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest_id = ''
if #oldest > 0 then oldest_id = oldest[1][1] end
return {redis.call('XLEN', KEYS[2]), t[1], t[2], oldest_id}
"""
_LIVE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now_ms, '+inf')
"""


class Presence:
    """This replica in the log's eyes: its heartbeat and the backlog."""

    def __init__(
        self,
        client: RedisClient,
        replica_id: str,
        *,
        timeout: float,
        max_backlog: int,
        clock: ServerClock | None = None,
    ) -> None:
        self.client = client
        #: The server's clock, read at every heartbeat.
        self.clock = clock or ServerClock()
        self.replica_id = replica_id
        self.timeout = timeout
        self.beat_seconds = min(BEAT_SECONDS, timeout / 9)
        self.max_backlog = max_backlog
        self.backlog = 0
        #: How long the oldest record in the log has waited for the writer,
        #: in seconds of the server's clock (0 when none waits).
        self.lag_seconds = 0.0
        #: Moves on after every silence long enough to fail closed.
        self.epoch = 0
        self._heard = float("-inf")
        #: The epoch that began after this replica's entry among the live
        #: ones had expired (the ledger writer may then have ended its calls),
        #: and when the entry expires now: the server's time, microseconds.
        self._revived_epoch = -1
        self._expires_us = 0
        self._task: asyncio.Task[None] | None = None
        #: (licence, call id) of calls this replica could not finish itself.
        self._orphans: list[tuple[str, str]] = []

    @property
    def fresh(self) -> bool:
        return time.monotonic() - self._heard < self.timeout / 3

    async def beat(self) -> None:
        """Announce this replica and read the backlog, or raise."""
        async with asyncio.timeout(COMMAND_TIMEOUT):
            backlog, seconds, microseconds, oldest = await self.client.eval(
                _BEAT, 2, REPLICAS, LOG, self.replica_id, int(self.timeout * 1000)
            )
        self.clock.sample(int(seconds), int(microseconds))
        server_us = int(seconds) * 1_000_000 + int(microseconds)
        if not self.fresh:
            self.epoch += 1
        if server_us >= self._expires_us:
            self._revived_epoch = self.epoch
        self._expires_us = server_us + int(self.timeout * 1000) * 1000
        self.backlog = int(backlog)
        self.lag_seconds = _lag(oldest, server_us)
        self._heard = time.monotonic()

    def orphan(self, licence_id: str, call_id: str) -> None:
        """A call whose record or finish could not be written (the log
        unreachable), or whose reservation was never answered: hand it to the
        ledger writer, which records it (unless its record did land) and
        settles or releases it by that. A call the store holds nothing for
        is left alone (a reservation the store gets to later is refused by
        its deadline, ``metering.quota``)."""
        self._orphans.append((licence_id, call_id))

    async def _hand_over(self) -> None:
        while self._orphans:
            licence_id, call_id = self._orphans[0]
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await self.client.eval(inflight.ORPHAN_SCRIPT, 1, inflight.key(licence_id), call_id)
            self._orphans.pop(0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.beat_seconds)
            try:
                await self.beat()
                await self._hand_over()
            except REDIS_ERRORS as exc:
                log.warning("ledger heartbeat failed: %s", type(exc).__name__)

    async def start(self) -> None:
        """Announce this replica before it serves (so its in-flight calls are
        never taken for a dead replica's), then keep announcing it."""
        try:
            await self.beat()
        except REDIS_ERRORS as exc:
            log.warning("ledger heartbeat failed at start: %s", type(exc).__name__)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop announcing; on a clean stop leave the set at once, so what is
        left in flight (nothing, after a graceful drain) is recovered now."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(*REDIS_ERRORS):
            await self._hand_over()
        with contextlib.suppress(*REDIS_ERRORS):
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await self.client.zrem(REPLICAS, self.replica_id)

    def check(self) -> int:
        """Refuse (503 ``ledger-unavailable``) when records cannot be taken
        now; else the current epoch, for :meth:`still_valid`."""
        if not self.fresh:
            raise LedgerUnavailableError(
                "the call record log cannot be reached; nothing was forwarded", headers={"Retry-After": "1"}
            )
        if self.backlog > self.max_backlog:
            raise LedgerUnavailableError(
                f"{self.backlog} call records are waiting to be stored (the limit is {self.max_backlog}); "
                "nothing was forwarded",
                headers={"Retry-After": "5"},
            )
        return self.epoch

    def never_presumed_dead(self, epoch: int, server_us: int) -> bool:
        """This replica's entry among the live ones has not expired since
        ``epoch`` began, nor by ``server_us`` (the server's time, read with
        what is being judged): the ledger writer cannot have taken it for
        dead and ended its calls, so a call it reserved in ``epoch`` whose
        in-flight entry is gone was finished by this replica. Times are the
        server's, as the entry's expiry is."""
        return self._revived_epoch <= epoch and server_us < self._expires_us

    def still_valid(self, epoch: int) -> bool:
        """A call that began in ``epoch`` may still be completed."""
        return self.epoch == epoch and self.fresh


def _lag(oldest: bytes | str, server_us: int) -> float:
    """Seconds from the stream entry ``oldest`` (``<ms>-<seq>``; empty for
    none) to ``server_us``."""
    entry = oldest.decode() if isinstance(oldest, bytes) else str(oldest)
    if not entry:
        return 0.0
    return max(0.0, server_us / 1e6 - int(entry.partition("-")[0]) / 1e3)


async def live_replicas(client: RedisClient) -> set[str]:
    async with asyncio.timeout(COMMAND_TIMEOUT):
        found = await client.eval(_LIVE, 1, REPLICAS)
    return {x.decode() if isinstance(x, bytes) else str(x) for x in found}
