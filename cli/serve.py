"""``pdg serve``: the gateway in this process, or a supervisor of ``--workers``
processes that share the port (``SO_REUSEPORT``); either way with the ledger
writer in a process of its own beside it (``ledger.process``), one per
``pdg serve``, unless ``ledger.run_writer`` is off.

First what must happen once — the migrations, the signing keys, the embedded
Valkey server — then the writer and the workers are started (spawned, not
forked, so none inherits this process's resources); one that dies is started
again. On SIGTERM / SIGINT the gateway stops being ready, goes on serving for
``server.drain_seconds``, closes its listeners and finishes the calls in
flight (within ``server.shutdown_seconds``), then the writer moves what is
left in the log, then Valkey stops.

With workers, every worker writes its access lines to the one standard error
the supervisor was given (a line is one write, so lines never interleave),
and keeps its metrics in a shared folder that a scrape of any worker sums.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from multiprocessing.context import SpawnContext, SpawnProcess
from types import FrameType

from aiohttp import web

from config.settings import Settings
from core import sm2
from gateway import logs
from gateway.access_log import AccessLogger
from gateway.app import create_app
from gateway.metrics import MULTIPROCESS_DIR
from gateway.state import ACCEPTING, SETTINGS
from ledger import process
from licensing.ids import new_call_id
from licensing.keys import key_store, legacy_key, load_or_create_signing_key
from storage import migrate
from storage.db import create_engine, session_factory
from storage.redis import EmbeddedValkey
from storage.runtime import freeze_heap

log = logging.getLogger(__name__)


def _configure_logging(settings: Settings) -> None:
    logs.configure(settings.logging.level, settings.logging.format)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we ship
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _freeze_heap(app: web.Application) -> None:
    freeze_heap()


def _exit() -> None:
    raise web.GracefulExit


async def _drain_on_signal(app: web.Application) -> None:
    """SIGTERM / SIGINT: stop being ready at once, go on serving for
    ``server.drain_seconds``, then exit gracefully (aiohttp closes the
    listeners, waits for the calls in flight, runs the clean-ups that flush
    the records). Replaces aiohttp's own handlers, which exit at the first
    signal. Another signal while draining changes nothing: with workers, one
    sent to the whole process group reaches a worker twice (directly and
    from the supervisor)."""
    loop = asyncio.get_running_loop()
    drain = app[SETTINGS].server.drain_seconds

    def on_signal() -> None:
        if not app[ACCEPTING][0]:
            return
        app[ACCEPTING][0] = False
        log.warning("stopping: not ready now, exiting in %.1f s", drain)
        loop.call_later(drain, _exit)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)


def _run_one(settings: Settings, reuse_port: bool) -> None:
    _configure_logging(settings)
    _install_uvloop()
    app = create_app(settings)
    app.on_startup.append(_freeze_heap)
    app.on_startup.append(_drain_on_signal)
    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        reuse_port=reuse_port or None,
        access_log=logging.getLogger("pdg.access") if settings.logging.access_log else None,
        access_log_class=AccessLogger,
        print=None,
        shutdown_timeout=settings.server.shutdown_seconds,
        handle_signals=True,
    )


def _worker(settings: Settings) -> None:
    _run_one(settings, reuse_port=True)


async def prepare(settings: Settings) -> None:
    """The data folder, the migrations unless ``server.auto_migrate`` is off,
    and an active shared signing key (made once here, before the workers
    start, which would otherwise each make one)."""
    sm2.start(required=settings.sm2_required)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(settings.database_url)
    try:
        if settings.server.auto_migrate:
            await migrate.upgrade(engine)
        store = key_store(settings, session_factory(engine))
        if store is not None:
            await store.active(first=legacy_key(settings))
    finally:
        await engine.dispose()


#: Seconds between a child's death and its restart.
RESTART_SECONDS = 1.0
#: How long the writer may take to move what is left in the log when stopped.
WRITER_STOP_SECONDS = 20.0


class WriterChild:
    """The ledger writer's process (:func:`ledger.process.child_main`), started
    again by a watching thread if it dies, until :meth:`stop`."""

    def __init__(self, context: SpawnContext, settings: Settings) -> None:
        self._context = context
        self._settings = settings
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: SpawnProcess | None = None
        self._watcher = threading.Thread(target=self._watch, name="pdg-writer-watch", daemon=True)

    def _spawn(self) -> None:
        self._process = self._context.Process(
            target=process.child_main,
            args=(self._settings, f"writer-{new_call_id()}", os.getpid()),
            name="pdg-ledger-writer",
            daemon=False,
        )
        self._process.start()

    def start(self) -> None:
        with self._lock:
            self._spawn()
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                proc = self._process
                if proc is None or proc.is_alive() or self._stopping.is_set():
                    continue
                log.error("the ledger writer (pid %s) exited with %s; restarting it", proc.pid, proc.exitcode)
            if self._stopping.wait(RESTART_SECONDS):
                return
            with self._lock:
                if not self._stopping.is_set():
                    self._spawn()

    def stop(self) -> None:
        """SIGTERM, and wait while it moves what is left in the log."""
        self._stopping.set()
        with self._lock:
            proc = self._process
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
        proc.join(WRITER_STOP_SECONDS)
        if proc.is_alive():
            log.error("the ledger writer did not stop in %.0f s; killing it", WRITER_STOP_SECONDS)
            proc.kill()
            proc.join(5)


def serve(settings: Settings) -> int:
    _configure_logging(settings)
    log.warning(
        "pdg listening on http://%s:%d (data %s)",
        settings.server.host,
        settings.server.port,
        settings.data_dir,
    )
    asyncio.run(prepare(settings))
    if not settings.shared_signing_keys:
        load_or_create_signing_key(settings.signing_key_path, settings.tokens.algorithm)
    load_or_create_signing_key(settings.ledger_key_path, settings.ledger.signing_algorithm)
    load_or_create_signing_key(settings.log_key_path, "EdDSA")
    embedded = (
        EmbeddedValkey(settings.data_dir, settings.storage.embedded_fsync)
        if settings.embedded_redis
        else None
    )
    context = multiprocessing.get_context("spawn")
    writer: WriterChild | None = None
    try:
        if embedded is not None:
            url = embedded.start_blocking()
            settings = settings.model_copy(
                update={"storage": settings.storage.model_copy(update={"redis_url": url})}
            )
        if settings.ledger.run_writer:
            writer = WriterChild(context, settings)
            writer.start()
        # The gateway's own processes leave the writer to that one.
        gateway = settings.model_copy(
            update={"ledger": settings.ledger.model_copy(update={"run_writer": False})}
        )
        if settings.server.workers == 1:
            _run_one(gateway, reuse_port=False)
        else:
            _supervise(context, gateway)
    finally:
        if writer is not None:
            writer.stop()
        if embedded is not None:
            embedded.stop_blocking()
    return 0


def _metrics_folder(settings: Settings) -> None:
    """The folder the workers keep their metrics in (prometheus-client's
    multiprocess mode), emptied first: a scrape of any worker sums what every
    worker of this run counted. Set in the environment the workers are
    spawned with, before they import prometheus-client."""
    folder = settings.data_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROCESS_DIR] = str(folder)


def _supervise(context: SpawnContext, settings: Settings) -> None:
    stopping = False
    _metrics_folder(settings)

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
                    time.sleep(RESTART_SECONDS)
                    workers[i] = context.Process(target=_worker, args=(settings,), daemon=False)
                    workers[i].start()
    finally:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
        # Each drains, lets its calls in flight finish and flushes its records.
        deadline = time.monotonic() + settings.server.drain_seconds + settings.server.shutdown_seconds + 10
        for proc in workers:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %s did not stop in time; killing it", proc.pid)
                proc.kill()
