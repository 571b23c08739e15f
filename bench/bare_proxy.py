"""The baseline of the proxy benchmark: a bare aiohttp pass-through proxy.

It does the honest minimum any gateway does and nothing else: forward the
method, the raw path and query, the request headers (less hop-by-hop ones and
``Host``) and the body to one upstream through one shared ``ClientSession``
with a keep-alive pool, then stream the status, headers and body back. No
authentication, no policy, no metering, no logging. Like ``pdg serve`` it runs
on uvloop when uvloop is installed.

    python bench/bare_proxy.py --port 9002 --upstream http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_UPSTREAM = HOP_BY_HOP | {"host", "content-length"}
NOT_DOWNSTREAM = HOP_BY_HOP | {"content-length", "server"}
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def make_app(upstream: str, pool: int) -> web.Application:
    base = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_UPSTREAM}
        if request.body_exists and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        url = URL(base + request.raw_path, encoded=True)
        async with request.app[SESSION].request(
            request.method,
            url,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
            compress=None,
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason)
            for name, value in upstream_response.headers.items():
                if name.lower() not in NOT_DOWNSTREAM:
                    response.headers.add(name, value)
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9001")
    parser.add_argument("--pool", type=int, default=200, help="upstream connection pool (pdg's default)")
    args = parser.parse_args()
    install_uvloop()
    web.run_app(
        make_app(args.upstream, args.pool), host=args.host, port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
