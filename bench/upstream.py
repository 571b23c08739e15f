"""The fixed upstream of the proxy benchmark.

A small aiohttp server that answers every method and path with the same JSON
array (about 1 KB, built once at start-up) and an ``X-Record-Count`` header, so
the upstream's own cost is as small and as constant as aiohttp allows.

    python bench/upstream.py --port 9001 [--records 12]

``bench/proxy.py`` starts it; it is runnable on its own for manual checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


def records_body(count: int) -> bytes:
    """The fixed body: ``count`` weather-like records, about 85 bytes each."""
    rows = [
        {
            "id": i,
            "station": f"WH-{1000 + i:05d}",
            "observed_at": "2025-01-01T08:00:00Z",
            "temp_c": round(3.5 + i * 0.25, 2),
            "rain_mm": round(i * 0.1, 1),
        }
        for i in range(count)
    ]
    return json.dumps(rows, separators=(",", ":")).encode()


def install_uvloop() -> None:
    """Use uvloop when it is installed: the gateway does, so the baseline must too."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def make_app(records: int) -> web.Application:
    body = records_body(records)
    headers = {"X-Record-Count": str(records)}

    async def handle(request: web.Request) -> web.Response:
        if request.body_exists:
            await request.read()
        return web.Response(body=body, content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--records", type=int, default=11, help="records in the body (11 -> ~1 KB)")
    args = parser.parse_args()
    install_uvloop()
    web.run_app(make_app(args.records), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
