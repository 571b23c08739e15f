"""Serving an application of the gateway's on an address of its own
(``server.metrics_listen``, ``server.admin_listen``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.problems import name_the_server


@contextlib.asynccontextmanager
async def listening(listener: web.Application, address: tuple[str, int], workers: int) -> AsyncIterator[None]:
    """Serve ``listener`` on ``address`` until the block ends; with several
    workers each binds it with ``SO_REUSEPORT``. Its responses name the
    server ``pdg`` like the public port's."""
    listener.on_response_prepare.append(name_the_server)
    runner = web.AppRunner(listener, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address[0], address[1], reuse_port=workers > 1 or None)
        await site.start()
        yield
    finally:
        await runner.cleanup()
