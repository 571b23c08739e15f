"""Throttling of failed credential checks, for every replica together.

The token endpoint and the admin API count each failed check of a
credential that was presented (unknown client, wrong secret or assertion,
unknown, malformed or revoked admin token; a request with no credential at
all is refused without counting) against
the client id (or admin token id) it named and against the caller's address,
in fixed one-minute windows in Redis. Once either count of the current minute
has reached its limit (``tokens.failures_per_client_per_minute``,
``tokens.failures_per_address_per_minute``), every request for that id or
from that address is refused with 429 ``rate-limited`` and ``Retry-After``
(the seconds left in the minute) before any credential is checked, so a
guess that happens to be right is refused too.

The caller's address is the peer's, or, when the peer is one of
``server.trusted_proxies``, the last address its ``X-Forwarded-For`` names.
Ids are kept as digests (they are caller input). When Redis cannot be
reached the checks go on unthrottled (the admin API must answer without
Redis) and the lapse is counted (``pdg_credential_throttle_unavailable``).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from core.errors import RateLimitedError
from gateway.metrics import Metrics
from storage.redis import COMMAND_TIMEOUT, REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60


def trusted_peer(peer: str | None, trusted: tuple[str, ...]) -> bool:
    """Whether ``peer`` is one of the trusted proxies (CIDR networks)."""
    if not peer or not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in trusted)


def client_address(request: web.Request, trusted: tuple[str, ...]) -> str:
    """The caller's address: the peer's, or behind a trusted proxy the last
    hop its ``X-Forwarded-For`` names."""
    peer = request.remote or ""
    if trusted_peer(peer, trusted):
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
        if hops and hops[-1]:
            return hops[-1][:64]
    return peer


@dataclass(frozen=True, slots=True)
class _Keys:
    subject: str | None
    address: str


class FailureThrottle:
    def __init__(
        self,
        redis: RedisClient,
        *,
        per_client: int,
        per_address: int,
        metrics: Metrics,
    ) -> None:
        self._redis = redis
        self.per_client = per_client
        self.per_address = per_address
        self._metrics = metrics

    @staticmethod
    def _keys(endpoint: str, subject: str | None, address: str, window: int) -> _Keys:
        id_key = None
        if subject:
            digest = hashlib.sha256(subject.encode("utf-8", "replace")).hexdigest()[:32]
            id_key = f"pdg:throttle:{endpoint}:id:{digest}:{window}"
        return _Keys(id_key, f"pdg:throttle:{endpoint}:ip:{address}:{window}")

    async def check(self, endpoint: str, subject: str | None, address: str) -> None:
        """Refuse (429) if the id or the address has used up this minute's failures."""
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        keys = self._keys(endpoint, subject, address, window)
        names = [keys.address] + ([keys.subject] if keys.subject else [])
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                # GETs in a pipeline, not MGET: on a Cluster the keys lie in
                # different slots.
                pipe = self._redis.pipeline(transaction=False)
                for name in names:
                    pipe.get(name)
                counts = await pipe.execute()
        except REDIS_ERRORS:
            self._lapse()
            return
        limits = [self.per_address, self.per_client]
        for count, limit in zip(counts, limits, strict=False):
            if count is not None and int(count) >= limit:
                retry = max(1, int((window + 1) * WINDOW_SECONDS - now) + 1)
                self._metrics.credential_throttled.labels(endpoint).inc()
                raise RateLimitedError(
                    "too many failed credential checks; try again later",
                    headers={"Retry-After": str(retry)},
                )

    async def failed(self, endpoint: str, subject: str | None, address: str) -> None:
        """Count one failed check against the id and the address."""
        self._metrics.credential_failures.labels(endpoint).inc()
        window = int(time.time() // WINDOW_SECONDS)
        keys = self._keys(endpoint, subject, address, window)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                pipe = self._redis.pipeline(transaction=False)
                for key in (keys.address, keys.subject):
                    if key is not None:
                        pipe.incr(key)
                        pipe.expire(key, 2 * WINDOW_SECONDS)
                await pipe.execute()
        except REDIS_ERRORS:
            self._lapse()

    def _lapse(self) -> None:
        self._metrics.credential_throttle_unavailable.inc()
        log.warning("credential failures cannot be counted: Redis is out of reach")
