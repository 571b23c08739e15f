"""What a DPoP call costs the gateway, against a Bearer call in the same run.

    .venv/bin/python bench/dpop.py                # 3 rounds of 10 s each way (~2 min)
    .venv/bin/python bench/dpop.py -d 5 -r 2 -c 16

1. starts the upstream of ``bench/proxy.py`` and one ``pdg serve`` on the
   embedded defaults, pinned as ``bench/proxy.py``'s ``sut-alone`` layout does
   (the gateway and its embedded Valkey on the last core; this process, the
   load client, and the upstream on the others);
2. provisions a dataset, licence and app, and gets a Bearer token and a
   DPoP-bound token (``cnf.jkt`` of an ES256 key held here);
3. runs rounds that alternate: ``--duration`` seconds of Bearer calls, then
   as long of DPoP calls, each with a fresh proof (``htm``, ``htu``, ``iat``,
   ``ath``, a new ``jti``). The proofs of a round are made before it starts,
   so signing them does not compete with the gateway while it is measured;
4. reports, per mode, the median over rounds of calls/s and of the gateway's
   CPU per call (its process group: the gateway, its ledger writer and its
   embedded Valkey, from ``/proc``), and the DPoP cost per call: the
   difference of the medians, in µs and as a share of the Bearer call.

Results go to ``bench/results/dpop.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from jwt.algorithms import ECAlgorithm  # noqa: E402

from bench import proxy  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "dpop.json"


class Holder:
    """The client's ES256 key and the proofs it makes."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.headers = {"typ": "dpop+jwt", "jwk": ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)}

    def proof(self, method: str, url: str, token: str | None = None) -> str:
        claims: dict[str, Any] = {
            "jti": str(uuid.uuid4()),
            "htm": method,
            "htu": url,
            "iat": int(time.time()),
        }
        if token is not None:
            digest = hashlib.sha256(token.encode()).digest()
            claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return jwt.encode(claims, self.key, "ES256", headers=self.headers)


def dpop_token(world: proxy.Gateway, holder: Holder) -> str:
    basic = base64.b64encode(f"{world.client_id}:{world.client_secret}".encode()).decode()
    url = f"{world.base}/oauth/token"
    reply = proxy.http(
        "POST",
        url,
        headers={"Authorization": f"Basic {basic}", "DPoP": holder.proof("POST", url)},
        form={
            "grant_type": "client_credentials",
            "scope": f"purpose:public-interest dataset:{proxy.DATASET}",
        },
    )
    body = reply.json()
    if reply.status != 200 or not isinstance(body, dict) or body.get("token_type") != "DPoP":
        raise proxy.BenchError(f"POST /oauth/token with a DPoP proof -> {reply.status} {reply.body[:300]!r}")
    return str(body["access_token"])


async def load(
    url: str, connections: int, duration: float, authorization: str, proofs: list[str] | None
) -> tuple[int, int, float]:
    """Closed-loop calls for ``duration`` seconds (or until the proofs run
    out): (answered 200, other answers, seconds)."""
    ok = failed = 0
    taken = 0
    deadline = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, failed, taken
        while time.monotonic() < deadline:
            headers = {"Authorization": authorization}
            if proofs is not None:
                if taken >= len(proofs):
                    return
                headers["DPoP"] = proofs[taken]
                taken += 1
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    ok += 1
                else:
                    failed += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        return ok, failed, time.monotonic() - started


def measure(
    pgid: int, url: str, connections: int, duration: float, authorization: str, proofs: list[str] | None
) -> dict[str, Any]:
    cpu0 = proxy.group_cpu_seconds(pgid)
    ok, failed, seconds = asyncio.run(load(url, connections, duration, authorization, proofs))
    cpu = proxy.group_cpu_seconds(pgid) - cpu0
    if failed or not ok:
        raise proxy.BenchError(f"{failed} calls failed and {ok} succeeded in a round; see the gateway log")
    return {
        "calls": ok,
        "seconds": round(seconds, 3),
        "calls_per_second": round(ok / seconds, 1),
        "gateway_cpu_us_per_call": round(1e6 * cpu / ok, 1),
    }


def describe(run: dict[str, Any]) -> str:
    return f"{run['calls_per_second']:.0f}/s {run['gateway_cpu_us_per_call']:.0f} µs/call"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-c", "--connections", type=int, default=16, help="concurrent connections (16)")
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds per round and mode (10)")
    parser.add_argument("-r", "--rounds", type=int, default=3, help="rounds, each mode once per round (3)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--pdg", default=None, help="the pdg executable (default: beside python, or PATH)")
    opts = parser.parse_args(argv)

    pdg = proxy.find_pdg(opts.pdg)
    layout = proxy.plan_layout("sut-alone")
    procs = proxy.Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="pdg-bench-dpop-") as tmp:
            data_dir = Path(tmp)
            up_port = proxy.free_port()
            upstream = procs.start(
                "upstream",
                [sys.executable, str(HERE / "upstream.py"), "--port", str(up_port), "--records", "11"],
                layout.upstream,
                log=data_dir / "upstream.log",
            )
            up_base = f"http://127.0.0.1:{up_port}"
            if not proxy.wait_ready(up_base + "/", upstream, 30):
                raise proxy.BenchError("the upstream did not start")
            gateway, port = proxy.start_gateway(procs, pdg, data_dir, layout.proxy, 3, 60.0)
            world = proxy.provision(pdg, data_dir, f"http://127.0.0.1:{port}", up_base)
            if layout.load is not None and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, layout.load)
            url = f"{world.base}/data/{proxy.DATASET}{proxy.CALL_PATH}"
            proof_url = url.partition("?")[0]
            holder = Holder()
            bearer, bound = world.token(), dpop_token(world, holder)
            rounds: list[dict[str, Any]] = []
            # Warm both paths up (caches, connections) before measuring.
            warm = [holder.proof("GET", proof_url, bound) for _ in range(500)]
            measure(gateway.pid, url, opts.connections, 2.0, f"Bearer {bearer}", None)
            measure(gateway.pid, url, opts.connections, 2.0, f"DPoP {bound}", warm)
            for number in range(1, opts.rounds + 1):
                plain = measure(gateway.pid, url, opts.connections, opts.duration, f"Bearer {bearer}", None)
                wanted = int(plain["calls_per_second"] * opts.duration * 1.5) + 100
                proofs = [holder.proof("GET", proof_url, bound) for _ in range(wanted)]
                proven = measure(gateway.pid, url, opts.connections, opts.duration, f"DPoP {bound}", proofs)
                rounds.append({"round": number, "bearer": plain, "dpop": proven})
                proxy.console.print(f"round {number}: Bearer {describe(plain)}; DPoP {describe(proven)}")
    finally:
        procs.stop_all()

    def median(mode: str, key: str) -> float:
        return float(statistics.median(r[mode][key] for r in rounds))

    cpu_bearer, cpu_dpop = (
        median("bearer", "gateway_cpu_us_per_call"),
        median("dpop", "gateway_cpu_us_per_call"),
    )
    report = {
        "connections": opts.connections,
        "duration_seconds": opts.duration,
        "layout": layout.describe(),
        "rounds": rounds,
        "median": {
            "bearer_calls_per_second": median("bearer", "calls_per_second"),
            "dpop_calls_per_second": median("dpop", "calls_per_second"),
            "bearer_cpu_us_per_call": cpu_bearer,
            "dpop_cpu_us_per_call": cpu_dpop,
            "dpop_cost_us_per_call": round(cpu_dpop - cpu_bearer, 1),
            "dpop_cost_share": round((cpu_dpop - cpu_bearer) / cpu_bearer, 3),
        },
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    m = report["median"]
    bearer_text = f"{m['bearer_calls_per_second']:.0f} calls/s, {cpu_bearer:.0f} µs CPU/call"
    dpop_text = f"{m['dpop_calls_per_second']:.0f} calls/s, {cpu_dpop:.0f} µs CPU/call"
    cost = f"{m['dpop_cost_us_per_call']:+.0f} µs ({100 * m['dpop_cost_share']:+.0f} %)"
    proxy.console.print(
        f"[bold]medians over {opts.rounds} rounds[/]: Bearer {bearer_text}; DPoP {dpop_text}; "
        f"a DPoP call costs the gateway {cost}. Written to {opts.output}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except proxy.BenchError as error:
        proxy.console.print(f"[red]error:[/] {error}")
        sys.exit(1)
