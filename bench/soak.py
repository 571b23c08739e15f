"""Soak: the gateway held at a share of its measured capacity for a long time.

    python -m bench.soak                       # 70 % of capacity for 10 minutes
    python -m bench.soak --share 0.7 --minutes 10 --connections 32

1. starts the fixed upstream (``bench/upstream.py``) and ``pdg serve`` on the
   embedded defaults (its Valkey and its ledger writer beside it), provisioned as
   ``bench/proxy.py`` does (access tokens live an hour);
2. measures capacity: a closed-loop run (``bench/loadgen.py``) of
   ``--capacity-seconds`` against the gateway, after a warm-up;
3. paces ``--share`` of that rate for ``--minutes``, in one-minute pieces (a
   fresh token each), sampling the resident memory of the gateway's process
   group (gateway, Valkey, writer) every ``--sample-seconds``;
4. waits for the ledger writer to move the log, then checks the record: the SQL
   ledger holds one record per call sent, and ``pdg audit verify`` passes;
5. prints and writes (``bench/results/soak.json``) the achieved rate, errors
   and non-2xx answers, latency percentiles per minute (from when each request
   was due), and memory: after the first minute, at the end, and the growth
   between them.

Nothing is pinned: the load client, the upstream and the gateway's group share
the machine, as they would any small host.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.proxy import (
    CALL_PATH,
    DATASET,
    GATEWAY_SETTINGS,
    HERE,
    BenchError,
    Processes,
    console,
    find_pdg,
    free_port,
    gateway_env,
    group_members,
    log_tail,
    provision,
    start_gateway,
    wait_ready,
)

RESULTS = HERE / "results" / "soak.json"


def group_rss(pgid: int) -> dict[str, int]:
    """Resident memory of each process of the group (``/proc/PID/statm``),
    by process name (the gateway, its Valkey, its ledger writer)."""
    page = os.sysconf("SC_PAGE_SIZE")
    found: dict[str, int] = {}
    for pid in group_members(pgid):
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        words = [w.decode(errors="replace") for w in cmdline if w]
        name = (
            "valkey"
            if any("valkey" in w for w in words[:1])
            else " ".join(w.rsplit("/", 1)[-1] for w in words[:3])
        )
        found[f"{name} ({pid})"] = rss
    return found


def group_rss_bytes(pgid: int) -> int:
    return sum(group_rss(pgid).values())


def loadgen(url: str, token: str, connections: int, seconds: float, rate: float = 0.0) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "loadgen.py"),
        "--url",
        url,
        "-c",
        str(connections),
        "-d",
        str(seconds),
        "-H",
        f"Authorization: Bearer {token}",
    ]
    if rate:
        argv += ["--rate", f"{rate:.1f}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    try:
        return dict(json.loads(done.stdout))
    except ValueError as exc:
        raise BenchError(f"loadgen failed ({done.returncode}): {done.stderr[-500:]}") from exc


def ledger_records(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "pdg.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM calls").fetchone()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--share", type=float, default=0.7, help="share of measured capacity (0.7)")
    parser.add_argument("--minutes", type=int, default=10, help="length of the soak (10)")
    parser.add_argument("-c", "--connections", type=int, default=32, help="connections (32)")
    parser.add_argument("--capacity-seconds", type=float, default=20.0, help="capacity run length (20)")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="memory sampling period (10)")
    parser.add_argument("--pdg", default=None, help="the pdg executable (default: beside python, or PATH)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    procs = Processes()
    data_dir = Path(tempfile.mkdtemp(prefix="pdg-soak-"))
    try:
        report = soak(args, procs, data_dir)
    except BenchError as exc:
        console.print(f"[red]soak failed:[/] {exc}")
        return 1
    finally:
        procs.stop_all()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print_json(json.dumps(report["summary"]))
    return 0 if report["summary"]["held"] else 1


def soak(args: argparse.Namespace, procs: Processes, data_dir: Path) -> dict[str, Any]:
    pdg = find_pdg(args.pdg)
    # Tokens live an hour: each minute's piece gets a fresh one anyway.
    GATEWAY_SETTINGS["PDG_ACCESS_TOKEN_TTL_SECONDS"] = "3600"  # noqa: S105 (a lifetime)
    up_port = free_port()
    upstream = procs.start(
        "upstream",
        [sys.executable, str(HERE / "upstream.py"), "--port", str(up_port), "--records", "11"],
        None,
        log=data_dir / "upstream.log",
    )
    up_base = f"http://127.0.0.1:{up_port}"
    if not wait_ready(up_base + "/", upstream, 30):
        raise BenchError(f"the upstream did not start:\n{log_tail(data_dir / 'upstream.log')}")
    env = gateway_env(data_dir)
    gateway, port = start_gateway(procs, pdg, data_dir, None, 3, 60.0)
    base = f"http://127.0.0.1:{port}"
    world = provision(pdg, data_dir, base, up_base)
    url = f"{base}/data/{DATASET}{CALL_PATH}"
    warm_up = loadgen(url, world.token(), args.connections, 3)
    sent = int(warm_up["requests"]) + int(warm_up["errors"])
    capacity_run = loadgen(url, world.token(), args.connections, args.capacity_seconds)
    capacity = float(capacity_run["requests_per_s"])
    sent += int(capacity_run["requests"]) + int(capacity_run["errors"])
    rate = capacity * args.share
    console.print(f"capacity {capacity:,.0f} calls/s; soaking at {rate:,.0f} calls/s for {args.minutes} min")
    samples: list[tuple[float, int]] = []
    by_process: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            parts = group_rss(gateway.pid)
            samples.append((time.monotonic() - started, sum(parts.values())))
            by_process.append((time.monotonic() - started, parts))
            stop.wait(args.sample_seconds)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    minutes = []
    try:
        for minute in range(args.minutes):
            piece = loadgen(url, world.token(), args.connections, 60.0, rate)
            sent += int(piece["requests"]) + int(piece["errors"])
            minutes.append(piece)
            console.print(
                f"minute {minute + 1}: {piece['requests_per_s']:,.0f}/s, "
                f"p99 {piece['latency_ms']['p99']:.1f} ms, "
                f"errors {piece['errors']}, non-2xx {piece['non_2xx']}, "
                f"memory {group_rss_bytes(gateway.pid) / 2**20:,.1f} MiB"
            )
    finally:
        stop.set()
        sampler.join()
    # Every call sent with a token is recorded (warm-up and capacity runs too).
    deadline = time.monotonic() + 120
    recorded = ledger_records(data_dir)
    while time.monotonic() < deadline:
        recorded = ledger_records(data_dir)
        if recorded >= sent:
            break
        time.sleep(2)
    verify = subprocess.run(
        [pdg, "audit", "verify", "--json"], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    verdict = json.loads(verify.stdout) if verify.stdout.strip().startswith("{") else {"ok": False}
    after_first = [rss for t, rss in samples if t >= 60.0]
    first, last = (after_first[0], after_first[-1]) if after_first else (0, 0)
    growth = (last - first) / first if first else 0.0
    errors = sum(int(m["errors"]) for m in minutes)
    non_2xx = sum(int(m["non_2xx"]) for m in minutes)
    achieved = statistics.median(float(m["requests_per_s"]) for m in minutes) if minutes else 0.0
    summary = {
        "capacity_per_s": round(capacity),
        "share": args.share,
        "target_per_s": round(rate),
        "achieved_per_s_median_minute": round(achieved),
        "minutes": args.minutes,
        "calls": sum(int(m["requests"]) for m in minutes),
        "errors": errors,
        "non_2xx": non_2xx,
        "p50_ms_median_minute": round(statistics.median(m["latency_ms"]["p50"] for m in minutes), 2),
        "p99_ms_worst_minute": round(max(m["latency_ms"]["p99"] for m in minutes), 2),
        "memory_after_first_minute_mib": round(first / 2**20, 1),
        "memory_at_end_mib": round(last / 2**20, 1),
        "memory_growth": round(growth, 4),
        "calls_sent_in_all": sent,
        "records_in_the_ledger": recorded,
        "ledger_verifies": bool(verdict.get("ok")),
        "held": errors == 0
        and non_2xx == 0
        and growth < 0.10
        and bool(verdict.get("ok"))
        and recorded == sent,
    }
    first_parts = next((parts for t, parts in by_process if t >= 60.0), {})
    last_parts = by_process[-1][1] if by_process else {}
    summary["memory_by_process_mib"] = {
        name: [round(first_parts.get(name, 0) / 2**20, 1), round(rss / 2**20, 1)]
        for name, rss in last_parts.items()
    }
    return {
        "summary": summary,
        "minutes": minutes,
        "memory_samples": samples,
        "memory_by_process": by_process,
        "capacity_run": capacity_run,
    }


if __name__ == "__main__":
    sys.exit(main())
