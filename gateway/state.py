"""Application state, shared through typed ``web.AppKey`` entries."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from config.settings import Settings
from gateway.metrics import Metrics
from licensing.admin_tokens import AdminTokens
from licensing.catalogue import CatalogueCache
from licensing.clients import ClientAuthenticator
from licensing.registry import Registry
from licensing.tokens import TokenService
from metering.quota import QuotaBatcher
from storage.redis import RedisClient

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
QUOTA = web.AppKey("quota", QuotaBatcher)
#: The gateway's clock (UTC, timezone-aware); tests may replace it.
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
CATALOGUE = web.AppKey("catalogue", CatalogueCache)
REGISTRY = web.AppKey("registry", Registry)
ADMIN_TOKENS = web.AppKey("admin_tokens", AdminTokens)
TOKENS = web.AppKey("tokens", TokenService)
CLIENTS = web.AppKey("clients", ClientAuthenticator)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", Metrics)
#: False once shutdown begins, so readiness fails before connections drain.
ACCEPTING = web.AppKey("accepting", list[bool])
