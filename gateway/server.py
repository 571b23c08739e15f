"""``pdg serve``: one process, or a supervisor of ``--workers`` processes that
share the port (``SO_REUSEPORT``).

With several workers the supervisor prepares what must happen once — the
embedded Valkey server, the migrations, the signing key — then starts the
workers (spawned, not forked, so no worker inherits the supervisor's
resources), restarts one that dies, and on SIGTERM / SIGINT stops them all
before stopping Valkey.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import signal
import time
from multiprocessing.context import SpawnProcess
from types import FrameType

from aiohttp import web

from config.settings import Settings
from gateway.app import create_app
from licensing.keys import load_or_create_signing_key
from storage import migrate
from storage.db import create_engine
from storage.redis import EmbeddedValkey

log = logging.getLogger(__name__)


def _configure_logging(settings: Settings) -> None:
    logging.getLogger().setLevel(settings.logging.level)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


#: The cyclic collector's first threshold while serving. Each call makes and
#: frees hundreds of container objects, almost all by reference counting; at
#: the default (700) the collector ran every few dozen calls and took several
#: per cent of the gateway's CPU, scanning objects that were about to go anyway.
GC_YOUNG_THRESHOLD = 20_000


async def _freeze_heap(app: web.Application) -> None:
    # Everything allocated while starting (modules, settings, the catalogue
    # view, connection pools) lives for the whole process: moving it out of
    # the collector's generations keeps full collections, and the latency
    # spikes they cause under load, short.
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _run_one(settings: Settings, reuse_port: bool) -> None:
    _configure_logging(settings)
    _install_uvloop()
    app = create_app(settings)
    app.on_startup.append(_freeze_heap)
    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        reuse_port=reuse_port or None,
        access_log=logging.getLogger("pdg.access") if settings.logging.access_log else None,
        print=None,
        shutdown_timeout=15.0,
        handle_signals=True,
    )


def _worker(settings: Settings) -> None:
    _run_one(settings, reuse_port=True)


async def _prepare(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.server.auto_migrate:
        engine = create_engine(settings.database_url)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()


def serve(settings: Settings) -> int:
    _configure_logging(settings)
    log.warning(
        "pdg listening on http://%s:%d (data %s)",
        settings.server.host,
        settings.server.port,
        settings.data_dir,
    )
    if settings.server.workers == 1:
        _run_one(settings, reuse_port=False)
        return 0
    return _supervise(settings)


def _supervise(settings: Settings) -> int:
    asyncio.run(_prepare(settings))
    load_or_create_signing_key(settings.signing_key_path, settings.tokens.algorithm)
    load_or_create_signing_key(settings.ledger_key_path, "ES256")
    embedded = EmbeddedValkey(settings.data_dir) if settings.embedded_redis else None
    if embedded is not None:
        url = embedded.start_blocking()
        settings = settings.model_copy(
            update={"storage": settings.storage.model_copy(update={"redis_url": url})}
        )
    context = multiprocessing.get_context("spawn")
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers: list[SpawnProcess] = []
    try:
        for _ in range(settings.server.workers):
            proc = context.Process(target=_worker, args=(settings,), daemon=False)
            proc.start()
            workers.append(proc)
        while not stopping:
            time.sleep(0.5)
            for i, proc in enumerate(workers):
                if not proc.is_alive() and not stopping:
                    log.error("worker %s exited with %s; restarting it", proc.pid, proc.exitcode)
                    time.sleep(1.0)
                    workers[i] = context.Process(target=_worker, args=(settings,), daemon=False)
                    workers[i].start()
    finally:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
        for proc in workers:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        if embedded is not None:
            embedded.stop_blocking()
    return 0
