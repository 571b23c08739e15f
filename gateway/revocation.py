"""Revoked access tokens (RFC 7009), shared by every replica through Redis.

A revocation is appended to a Redis stream (``pdg:revocations``: the token
id and when it expires); every replica reads what is new each
``server.catalogue_refresh_seconds`` and refuses the token from then on (the
replica that revoked it at once), like a suspended licence. Entries older
than the longest token lifetime are trimmed. A revocation that cannot reach
Redis is refused (503): it is never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from core.errors import ServiceUnavailableError
from licensing.tokens import TokenService
from storage.redis import COMMAND_TIMEOUT, REDIS_ERRORS, RedisClient

log = logging.getLogger(__name__)


class RevocationFeed:
    KEY = "pdg:revocations"

    def __init__(self, redis: RedisClient, tokens: TokenService, keep_seconds: int) -> None:
        self._redis = redis
        self._tokens = tokens
        self._keep_ms = keep_seconds * 1000
        self._last = "0-0"

    async def revoke(self, token_id: str, expires_at: float) -> None:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await self._redis.xadd(self.KEY, {"jti": token_id, "exp": str(int(expires_at))})
        except REDIS_ERRORS as exc:
            raise ServiceUnavailableError(
                "the revocation cannot be recorded right now", headers={"Retry-After": "1"}
            ) from exc
        self._tokens.revoked(token_id, expires_at)

    async def poll(self) -> None:
        """Take up the revocations made since the last poll."""
        async with asyncio.timeout(COMMAND_TIMEOUT):
            replies: Any = await self._redis.xread({self.KEY: self._last}, count=10_000)
        now = time.time()
        for _stream, entries in replies or ():
            for entry_id, fields in entries:
                self._last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                jti, exp = fields.get(b"jti"), fields.get(b"exp")
                if jti is None or exp is None:
                    continue
                expires = float(exp)
                if expires + self._tokens.leeway_seconds > now:
                    self._tokens.revoked(jti.decode(), expires)

    async def trim(self) -> None:
        oldest = int(time.time() * 1000) - self._keep_ms
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await self._redis.xtrim(self.KEY, minid=f"{oldest}-0", approximate=True)

    async def watch(self, interval: float) -> None:
        """Poll until cancelled; Redis out of reach: try again next time."""
        polls = 0
        while True:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.poll()
                polls += 1
                if polls % 600 == 0:
                    await self.trim()
            await asyncio.sleep(interval)
