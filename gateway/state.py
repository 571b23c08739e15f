"""Application state, shared through typed ``web.AppKey`` entries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from config.settings import Settings
from gateway.call import CallContext
from gateway.metrics import Metrics
from gateway.revocation import RevocationFeed
from gateway.throttle import FailureThrottle
from gateway.tracing import Tracing
from gateway.upstreams import Pools
from ledger.log import Presence
from licensing.admin_tokens import AdminTokens
from licensing.catalogue import CatalogueCache
from licensing.clients import ClientAuthenticator
from licensing.dpop import ProofChecker
from licensing.keys import KeyStore
from licensing.registry import Registry
from licensing.tokens import TokenService
from metering.quota import QuotaBatcher
from storage.db import utcnow
from storage.redis import RedisClient

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
QUOTA = web.AppKey("quota", QuotaBatcher)
PRESENCE = web.AppKey("presence", Presence)
#: This process's id among the replicas (in-flight markers, the writer lock).
REPLICA_ID = web.AppKey("replica_id", str)


@dataclass
class Clock:
    """The gateway's clock, UTC and timezone-aware. Periods and quota windows
    are read from it; tests move it by replacing ``source``."""

    source: Callable[[], datetime] = utcnow

    def now(self) -> datetime:
        return self.source()


CLOCK = web.AppKey("clock", Clock)
CATALOGUE = web.AppKey("catalogue", CatalogueCache)
REGISTRY = web.AppKey("registry", Registry)
ADMIN_TOKENS = web.AppKey("admin_tokens", AdminTokens)
TOKENS = web.AppKey("tokens", TokenService)
#: Revoked access tokens, shared through Redis (``gateway.revocation``).
REVOCATIONS = web.AppKey("revocations", RevocationFeed)
#: The signing keys shared through the database (absent with a key file).
KEYS = web.AppKey("keys", KeyStore)
CLIENTS = web.AppKey("clients", ClientAuthenticator)
#: Checks DPoP proofs (RFC 9449) at the token endpoint and on the data plane.
DPOP = web.AppKey("dpop", ProofChecker)
#: Failed credential checks, throttled per id and per address (``gateway.throttle``).
THROTTLE = web.AppKey("throttle", FailureThrottle)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", Metrics)
#: OpenTelemetry spans of data calls, or a no-op (``gateway.tracing``).
TRACING = web.AppKey("tracing", Tracing)
#: How calls to each dataset are forwarded (``gateway.proxy.upstream_of``), by dataset id.
UPSTREAMS: web.AppKey[dict[str, Any]] = web.AppKey("upstreams")
#: Every dataset's upstream targets and their health (``gateway.upstreams``).
POOLS = web.AppKey("pools", Pools)
#: What every data call works with (``gateway.call``), made once.
CALLS = web.AppKey("calls", CallContext)
#: False once shutdown begins, so readiness fails before connections drain.
ACCEPTING = web.AppKey("accepting", list[bool])
