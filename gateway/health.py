"""Operations endpoints: ``/healthz`` (the process is alive), ``/readyz``
and ``/metrics`` (Prometheus).

They are served on the public port, or, with ``server.metrics_listen``, on an
address of their own (the public port then serves ``/healthz`` and
``/readyz`` only). ``server.metrics_token`` makes ``/metrics`` require a
bearer token (401 ``admin-token-required`` without it).

``/readyz`` answers one of three states, from its components (the database,
Redis, the call-record log — heard from, its backlog within bounds —, the
licence view, not shutting down):

- ``ready`` (200): every component is well;
- ``degraded`` (200): the SQL database is out of reach, and data calls go on
  from the licence view in memory (kept current through Redis) for at most
  ``server.degraded_max_seconds``; the admin API answers 503 meanwhile. A
  load balancer keeps the replica: an outage every replica rides is no
  reason to take the fleet out;
- ``not-ready`` (503): data calls would be refused (Redis or the log out of
  reach, the view too old to trust, the degraded time used up, shutting
  down).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from core.errors import AdminAuthError, ServiceUnavailableError
from gateway.listeners import listening
from gateway.metrics import CONTENT_TYPE_LATEST
from gateway.problems import problems_middleware
from gateway.state import ACCEPTING, CATALOGUE, ENGINE, METRICS, PRESENCE, REDIS, SETTINGS
from ledger.models import CheckpointRow
from storage.tasks import within

_CHECK_TIMEOUT = 2.0


async def _select_one(app: web.Application) -> None:
    async with app[ENGINE].connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _database(app: web.Application) -> bool:
    with contextlib.suppress(SQLAlchemyError, OSError, TimeoutError):
        await within(_select_one(app), _CHECK_TIMEOUT)
        return True
    return False


async def _redis(app: web.Application) -> bool:
    with contextlib.suppress(RedisError, RedisClusterException, OSError, TimeoutError):
        async with asyncio.timeout(_CHECK_TIMEOUT):
            return bool(await app[REDIS].ping())
    return False


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    return await _readiness(request.app.get(GATEWAY) or request.app)


async def _readiness(app: web.Application) -> web.Response:
    database, redis = await asyncio.gather(_database(app), _redis(app))
    catalogue = app[CATALOGUE]
    try:
        catalogue.fresh()
        view = True
    except ServiceUnavailableError:
        view = False
    components = {
        "database": database,
        "redis": redis,
        "ledger": app[PRESENCE].fresh and app[PRESENCE].backlog <= app[PRESENCE].max_backlog,
        "catalogue": view,
        "accepting": app[ACCEPTING][0],
    }
    serving = all(value for name, value in components.items() if name != "database")
    status = ("ready" if database else "degraded") if serving else "not-ready"
    body: dict[str, object] = {"status": status, "components": components}
    if serving and not database:
        # How much longer data calls go on without the database (its loss may
        # not have met the view's poll yet).
        lost = catalogue.degraded_for() or 0.0
        body["degraded_seconds_left"] = round(max(0.0, catalogue.degraded_max_seconds - lost), 1)
    return web.Response(
        body=orjson.dumps(body),
        status=200 if serving else 503,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def metrics(request: web.Request) -> web.Response:
    app = request.app.get(GATEWAY) or request.app
    token = app[SETTINGS].server.metrics_token
    if token:
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), token.encode()):
            raise AdminAuthError(
                "/metrics needs its bearer token (server.metrics_token)",
                headers={"WWW-Authenticate": 'Bearer realm="pdg-metrics"'},
            )
    await _gauges(app)
    return web.Response(body=app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _last_checkpoint_age(app: web.Application) -> float:
    async def read() -> float:
        async with app[ENGINE].connect() as conn:
            newest = await conn.scalar(select(func.max(CheckpointRow.created_at)))
        return (datetime.now(UTC) - newest).total_seconds() if newest is not None else math.nan

    with contextlib.suppress(SQLAlchemyError, OSError, TimeoutError):
        return await within(read(), _CHECK_TIMEOUT)
    return math.nan


async def _gauges(app: web.Application) -> None:
    """The gauges read when scraped: what the gateway depends on, now."""
    state = app[METRICS].state
    database, redis, checkpoint_age = await asyncio.gather(
        _database(app), _redis(app), _last_checkpoint_age(app)
    )
    state.database_up = 1 if database else 0
    state.redis_up = 1 if redis else 0
    state.ledger_backlog = app[PRESENCE].backlog
    state.writer_lag = round(app[PRESENCE].lag_seconds, 3)
    state.last_checkpoint_age = checkpoint_age
    state.view_age = round(time.monotonic() - app[CATALOGUE].confirmed_at, 3)


#: On the operations listener's own application: the gateway it reports on.
GATEWAY = web.AppKey("gateway", web.Application)


async def _operations_listener(app: web.Application) -> AsyncIterator[None]:
    """``server.metrics_listen``: the operations endpoints on an address of
    their own, served by a small application that reads this one's state."""
    settings = app[SETTINGS]
    address = settings.server.metrics_address
    assert address is not None  # noqa: S101 - only registered with one
    operations = web.Application(middlewares=[problems_middleware])
    operations[GATEWAY] = app
    operations.router.add_get("/healthz", healthz)
    operations.router.add_get("/readyz", readyz)
    operations.router.add_get("/metrics", metrics)
    async with listening(operations, address, settings.server.workers):
        yield


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if app[SETTINGS].server.metrics_address is None:
        app.router.add_get("/metrics", metrics)
    else:
        app.cleanup_ctx.append(_operations_listener)
