"""Operations endpoints: ``/healthz`` (the process is alive), ``/readyz``
(the AND of its components: database, Redis, the call-record log — heard
from and its backlog within bounds —, the catalogue view, and not shutting
down) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from gateway.metrics import CONTENT_TYPE_LATEST
from gateway.state import ACCEPTING, CATALOGUE, ENGINE, METRICS, PRESENCE, REDIS

_CHECK_TIMEOUT = 2.0


async def _database(app: web.Application) -> bool:
    with contextlib.suppress(SQLAlchemyError, OSError, TimeoutError):
        async with asyncio.timeout(_CHECK_TIMEOUT), app[ENGINE].connect() as conn:
            await conn.execute(text("SELECT 1"))
            return True
    return False


async def _redis(app: web.Application) -> bool:
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        async with asyncio.timeout(_CHECK_TIMEOUT):
            return bool(await app[REDIS].ping())
    return False


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    database, redis = await asyncio.gather(_database(app), _redis(app))
    components = {
        "database": database,
        "redis": redis,
        "ledger": app[PRESENCE].fresh and app[PRESENCE].backlog <= app[PRESENCE].max_backlog,
        "catalogue": app[CATALOGUE].healthy,
        "accepting": app[ACCEPTING][0],
    }
    ready = all(components.values())
    body = {"status": "ready" if ready else "not-ready", "components": components}
    return web.Response(
        body=orjson.dumps(body),
        status=200 if ready else 503,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
