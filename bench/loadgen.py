"""The built-in load client of the proxy benchmark (used when ``wrk`` is not on PATH).

A closed-loop client like ``wrk``: ``--connections`` workers share one aiohttp
session whose pool holds exactly that many keep-alive connections; each worker
sends a request, reads the whole body, records the latency and sends the next,
until ``--duration`` seconds have passed or ``--max-requests`` were sent. It
prints one JSON object on stdout: requests, errors, requests/s and latency
percentiles in milliseconds.

With ``--rate R`` it paces instead (the soak's load): request ``n`` is due at
``n / R`` seconds after the start, the workers take the requests in turn, and
a request's latency counts from when it was due, so a gateway that falls
behind shows it in the percentiles (no coordinated omission).

    python bench/loadgen.py --url http://127.0.0.1:9002/records -c 64 -d 10 -H 'Authorization: Bearer x'

A Python client costs far more CPU per request than ``wrk``; give it a core of
its own (``bench/proxy.py`` pins it) and prefer ``wrk`` for numbers you quote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from array import array

import aiohttp


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def percentile(ordered: array[float] | list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


async def run(
    url: str,
    connections: int,
    duration: float,
    headers: dict[str, str],
    max_requests: int,
    request_timeout: float,
    rate: float = 0.0,
) -> dict[str, object]:
    latencies: array[float] = array("d")
    counters = {"sent": 0, "ok": 0, "non_2xx": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    started = time.perf_counter()
    deadline = started + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        clock = time.perf_counter
        while counters["sent"] < max_requests:
            t0 = clock()
            if rate > 0:
                due = started + counters["sent"] / rate
                if due >= deadline:
                    return
                if due > t0:
                    counters["sent"] += 1
                    await asyncio.sleep(due - t0)
                else:
                    counters["sent"] += 1
                t0 = due
            else:
                if t0 >= deadline:
                    return
                counters["sent"] += 1
            try:
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError):
                counters["errors"] += 1
                await asyncio.sleep(0.01)  # a refused connection must not spin the loop
                continue
            latencies.append(clock() - t0)
            if 200 <= status < 300:
                counters["ok"] += 1
            else:
                counters["non_2xx"] += 1

    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout, auto_decompress=False
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    done = len(ordered)
    return {
        "tool": "python",
        "rate": rate,
        "url": url,
        "connections": connections,
        "duration_s": duration,
        "elapsed_s": elapsed,
        "requests": done,
        "ok": counters["ok"],
        "non_2xx": counters["non_2xx"],
        "errors": counters["errors"],
        "requests_per_s": done / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(ordered, 0.50) * 1e3,
            "p90": percentile(ordered, 0.90) * 1e3,
            "p99": percentile(ordered, 0.99) * 1e3,
            "max": (ordered[-1] if ordered else 0.0) * 1e3,
            "mean": (sum(ordered) / done if done else 0.0) * 1e3,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--max-requests", type=int, default=5_000_000, help="hard cap on requests sent")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    parser.add_argument("--rate", type=float, default=0.0, help="requests per second, paced (0: closed loop)")
    args = parser.parse_args()
    headers: dict[str, str] = {}
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep:
            parser.error(f"bad header {raw!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    install_uvloop()
    result = asyncio.run(
        run(args.url, args.connections, args.duration, headers, args.max_requests, args.timeout, args.rate)
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
