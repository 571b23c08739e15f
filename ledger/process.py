"""The ledger writer in a process of its own: ``pdg worker``, and the child
process that ``pdg serve`` starts beside the gateway.

A gateway's event loop and the writer are different kinds of work: the data
plane is many short calls, the writer a batch of SQL and hashing a few times
a second. In one process they share one interpreter lock; the database
driver's thread and the event loop hand it to each other at every statement,
and the writer's batches hold up calls. In a process of its own the writer
takes a core of its own where there is one, and where there is not, the
operating system interleaves the two more cheaply than the lock does
(``bench/proxy.py`` measures it).

The child of ``pdg serve`` is started with the deployment's settings (the
embedded Valkey's address filled in, so it never starts a server of its
own); it stops on SIGTERM after moving what is in the log (``start_writer``),
ignores SIGINT (a Ctrl-C reaches the whole process group; the gateway
finishes its calls first, then stops the writer), and stops by itself when
its parent is gone (a gateway killed with SIGKILL leaves no writer behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from config.settings import Settings

log = logging.getLogger(__name__)

#: How often a child looks whether its parent is still there.
PARENT_CHECK_SECONDS = 1.0


async def run(settings: Settings, *, owner: str, stop: asyncio.Event, parent: int | None = None) -> None:
    """The writer until ``stop`` is set (or, with ``parent``, that process is gone)."""
    from ledger.writer import start_writer
    from storage.db import create_engine
    from storage.redis import deployment_redis
    from storage.runtime import freeze_heap

    engine = create_engine(settings.database_url)
    try:
        async with (
            deployment_redis(settings) as client,
            start_writer(settings, engine, client, owner=owner),
        ):
            freeze_heap()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PARENT_CHECK_SECONDS):
                        await stop.wait()
                if parent is not None and os.getppid() != parent:
                    log.warning("the gateway that started this ledger writer is gone; stopping")
                    break
    finally:
        await engine.dispose()


def child_main(settings: Settings, owner: str, parent: int) -> None:
    """The entry point of the writer process that ``pdg serve`` starts."""
    logging.getLogger().setLevel(settings.logging.level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await run(settings, owner=owner, stop=stop, parent=parent)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
