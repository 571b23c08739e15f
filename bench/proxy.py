"""Proxy benchmark: the whole ``pdg`` pipeline against a bare aiohttp pass-through proxy.

DESIGN.md §8 asks for the per-call checks to be cheap; this measures how cheap,
as a ratio against the honest minimum any gateway does. One run of

    python bench/proxy.py            # 64 connections, 10 s per run, 3 runs (~1.5 min)
    python bench/proxy.py --quick    # 3 s, 1 run: a smoke check

1. starts a fixed upstream (``bench/upstream.py``: the same ~1 KB JSON array and
   ``X-Record-Count`` for every call);
2. starts the baseline (``bench/bare_proxy.py``: aiohttp server + one shared
   ``ClientSession``, forwards method/path/query/headers/body, streams the answer);
3. starts ``pdg serve --data-dir <tmp> --port <free>`` with the embedded defaults
   (SQLite + embedded Valkey; inherited ``PDG_*`` variables are dropped), creates an
   admin token with ``pdg admin-token create``, registers a dataset pointing at the
   upstream (free allowance 1e9 calls; burst 1e6/s, capacity 1e6), a licensee, a
   licence for both purposes with 1e8 prepaid calls, and an app, and gets an access
   token from ``/oauth/token``;
4. checks that both paths answer 200 with the upstream's exact body, then drives the
   same load at both: ``wrk -t1`` when it is on PATH, else ``bench/loadgen.py`` (aiohttp,
   closed loop, N connections, fixed duration) in its own process. Each target gets a
   warm-up run first; then the measured runs alternate bare, gateway, bare, gateway...
   and the report gives the median of each figure over the runs;
5. prints a ``rich`` table (requests/s, p50, p99, the proxy's CPU use, errors) and the
   gateway/bare throughput ratio, and writes the same figures, per-run details and the
   machine facts to ``bench/results/proxy.json`` (git-ignored);
6. with ``--against PDG`` (another build's ``pdg``, e.g. an earlier commit checked out
   in a worktree with its own venv), starts that gateway too, provisioned the same way
   in its own data folder, and measures it in the same runs: bare, gateway, against in
   odd rounds, bare, against, gateway in even ones (so neither build always runs right
   after the bare proxy: a build was once seen to lose 15 % in that slot and gain 5 % in
   the other against the same rival; use an even ``--runs``). Both gateways then meet
   the same machine, and the report gives each one's ratio to the bare proxy and the
   difference in points -- the way to compare builds on a machine whose speed drifts
   between runs;
7. stops everything it started - each process is the leader of its own process group,
   and the whole group is stopped (SIGTERM, then SIGKILL) on success, error, Ctrl-C or
   SIGTERM.

CPU pinning (``--layout``). The machine this was written for has 2 cores, and three
Python event loops plus the load client must share them. The default, ``sut-alone``,
gives the system under test (the bare proxy or the gateway, with the gateway's embedded
Valkey, which inherits the affinity) the last core to itself and puts the load client
and the upstream together on the other core(s). Rationale: each proxy is one
single-threaded process, so with a core of its own it is the bottleneck and the ratio
compares what each proxy costs per call. ``wrk`` needs little CPU, so the upstream has
most of its core. The alternative ``client-alone`` (load client on the first core,
upstream and proxy on the other) makes the proxy share its core with the upstream,
which adds the upstream's constant cost to both sides and flattens the ratio towards
100 %; ``none`` leaves scheduling to the kernel. The affinity is set with
``os.sched_setaffinity`` (Linux) on this process just around each ``Popen``, so children
and grandchildren inherit it; where it is unavailable, or with one usable CPU, nothing is
pinned. The report includes each core's busy time per run: if the load core is near
100 % during the bare runs, the baseline is client-bound (typical of ``--client python``)
and the ratio overstates the gateway.

Every load loop is bounded: by ``--duration`` (wrk ``-d``, the Python client's deadline),
by ``--max-requests`` (Python client) and by a subprocess timeout of duration + 60 s.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUTPUT = HERE / "results" / "proxy.json"
DATASET = "bench"
UPSTREAM_PREFIX = "/records"
CALL_PATH = "/items?page=1"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
console = Console() if sys.stdout.isatty() else Console(width=120)


class BenchError(Exception):
    """The benchmark could not run (a process did not start, a call failed...)."""


# --------------------------------------------------------------------------- processes


@dataclass
class Layout:
    name: str
    load: frozenset[int] | None = None
    upstream: frozenset[int] | None = None
    proxy: frozenset[int] | None = None

    def text(self) -> str:
        def cpus(s: frozenset[int] | None) -> str:
            return ",".join(f"cpu{c}" for c in sorted(s)) if s is not None else "any"

        if self.load is None:
            return f"{self.name} (not pinned)"
        return (
            f"{self.name}: load client {cpus(self.load)}, upstream {cpus(self.upstream)}, "
            f"proxy/gateway {cpus(self.proxy)}"
        )

    def describe(self) -> dict[str, Any]:
        def cpus(s: frozenset[int] | None) -> list[int] | None:
            return sorted(s) if s is not None else None

        return {
            "layout": self.name,
            "load_client": cpus(self.load),
            "upstream": cpus(self.upstream),
            "proxy_or_gateway": cpus(self.proxy),
        }


def plan_layout(name: str) -> Layout:
    if name == "none" or not hasattr(os, "sched_getaffinity"):
        return Layout("none")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Layout("none")
    first, last, rest = frozenset(cpus[:1]), frozenset(cpus[-1:]), frozenset(cpus[:-1])
    if name == "client-alone":
        servers = frozenset(cpus[1:])
        return Layout(name, load=first, upstream=servers, proxy=servers)
    return Layout("sut-alone", load=rest, upstream=rest, proxy=last)


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the body with this process pinned to ``cpus``: a child started inside inherits it."""
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def group_members(pgid: int) -> list[int]:
    """Live pids in process group ``pgid`` (Linux /proc; empty elsewhere)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds used so far by the live members of a process group."""
    total = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def core_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat (empty when unavailable)."""
    out: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if m:
                values = [int(v) for v in m.group(2).split()]
                idle = values[3] + (values[4] if len(values) > 4 else 0)
                out[int(m.group(1))] = (sum(values[:8]) - idle, sum(values[:8]))
    return out


def sample_busy(seconds: float = 0.5) -> float:
    """Busy CPU over a short sample, in % of one core summed over all cores."""
    before = core_times()
    time.sleep(seconds)
    return sum(core_busy(before, core_times()).values())


def wait_quiet(limit_s: float, threshold_pct: float = 30.0) -> tuple[bool, float]:
    """Wait (at most ``limit_s``) until the machine is nearly idle: other sessions may be
    running tests on a shared box. Returns (quiet, last busy sample)."""
    deadline = time.monotonic() + limit_s
    busy = sample_busy()
    while busy > threshold_pct and time.monotonic() < deadline:
        busy = sample_busy()
    return busy <= threshold_pct, round(busy, 1)


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[str, float]:
    busy = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        if t1 > t0:
            busy[f"cpu{cpu}"] = round(100.0 * (b1 - b0) / (t1 - t0), 1)
    return busy


class Processes:
    """Every process this run starts, each the leader of a new process group."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: frozenset[int] | None,
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        capture: bool = False,
    ) -> subprocess.Popen[bytes]:
        stdout: Any = subprocess.PIPE if capture else subprocess.DEVNULL
        log_file = None
        if log is not None:
            log_file = log.open("ab")
            stdout = log_file
        try:
            with pinned(cpus):
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=subprocess.PIPE if capture else subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        finally:
            if log_file is not None:
                log_file.close()
        self.started.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        pgid = proc.pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        # The leader may be gone while a child (e.g. the embedded Valkey) lingers.
        deadline = time.monotonic() + grace
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None or group_members(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def stop_all(self) -> None:
        for _name, proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- HTTP


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def http(
    method: str,
    url: str,
    *,
    json_body: Any = None,
    form: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    data = None
    hdrs = dict(headers or {})
    if json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs["Content-Type"] = "application/json"
    elif form is not None:
        data = urllib.parse.urlencode(form).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=data, method=method, headers=hdrs)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
            return Reply(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers.items()), exc.read())


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """True once ``url`` answers with any HTTP status; False if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            http("GET", url, timeout=2.0)
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)
            continue
        return True
    return False


def credit_code(first17: str) -> str:
    """Append the GB 32100-2015 check character (as in the contract smoke test)."""
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    weights = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]
    total = sum(alphabet.index(ch) * w for ch, w in zip(first17, weights, strict=True))
    return first17 + alphabet[(31 - total % 31) % 31]


# --------------------------------------------------------------------------- gateway


def find_pdg(explicit: str | None) -> str:
    if explicit:
        return explicit
    sibling = Path(sys.executable).parent / "pdg"
    if sibling.exists():
        return str(sibling)
    found = shutil.which("pdg")
    if found:
        return found
    raise BenchError("no `pdg` found: run with the project's venv python or pass --pdg")


#: Settings given to the gateway (``--set NAME=VALUE``), e.g. the ledger
#: writer moved out of the gateway's process.
GATEWAY_SETTINGS: dict[str, str] = {}
#: Settings for the ``--against`` gateway only, over those (``--against-set``),
#: e.g. ``PDG_WORKERS=1`` against a gateway run with ``--set PDG_WORKERS=2``.
AGAINST_SETTINGS: dict[str, str] = {}


def gateway_env(data_dir: Path, name: str = "gateway") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDG_")}
    env["PDG_DATA_DIR"] = str(data_dir)
    env.update(GATEWAY_SETTINGS)
    if name == "against":
        env.update(AGAINST_SETTINGS)
    return env


def log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start_gateway(
    procs: Processes,
    pdg: str,
    data_dir: Path,
    cpus: frozenset[int] | None,
    attempts: int,
    timeout: float,
    name: str = "gateway",
) -> tuple[subprocess.Popen[bytes], int]:
    """``pdg serve`` on a free port; retried a few times (the gateway may be mid-change)."""
    log = data_dir / f"{name}.log"
    for attempt in range(1, attempts + 1):
        port = free_port()
        argv = [pdg, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
        proc = procs.start(name, argv, cpus, log=log, env=gateway_env(data_dir, name))
        if wait_ready(f"http://127.0.0.1:{port}/healthz", proc, timeout):
            return proc, port
        console.print(
            f"[yellow]pdg serve did not come up (attempt {attempt}/{attempts}, "
            f"exit {proc.poll()}); log tail:[/]\n{log_tail(log)}"
        )
        procs.stop(proc)
        if attempt < attempts:
            time.sleep(5.0 * attempt)
    raise BenchError(f"pdg serve did not start after {attempts} attempts; see the log above")


@dataclass
class Gateway:
    base: str
    admin: str
    client_id: str
    client_secret: str

    def token(self) -> str:
        basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        reply = http(
            "POST",
            f"{self.base}/oauth/token",
            headers={"Authorization": f"Basic {basic}"},
            form={"grant_type": "client_credentials", "scope": f"purpose:public-interest dataset:{DATASET}"},
        )
        body = reply.json()
        if reply.status != 200 or not isinstance(body, dict) or "access_token" not in body:
            raise BenchError(f"POST /oauth/token -> {reply.status} {reply.body[:300]!r}")
        return str(body["access_token"])


def provision(pdg: str, data_dir: Path, base: str, upstream: str) -> Gateway:
    """Admin token, dataset, licensee, licence and app through the admin API."""
    done = subprocess.run(
        [pdg, "admin-token", "create", "--role", "licence-admin", "--json"],
        capture_output=True,
        text=True,
        env=gateway_env(data_dir),
        timeout=120,
        check=False,
    )
    try:
        admin = json.loads(done.stdout)["token"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(
            f"pdg admin-token create failed ({done.returncode}): {done.stderr[-500:]} {done.stdout[-200:]}"
        ) from exc
    auth = {"Authorization": f"Bearer {admin}"}

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = http("POST", base + path, json_body=body, headers=auth)
        data = reply.json()
        if reply.status not in (200, 201) or not isinstance(data, dict):
            raise BenchError(f"POST {path} -> {reply.status} {reply.body[:400]!r}")
        return data

    post(
        "/admin/v1/datasets",
        {
            "id": DATASET,
            "name": "Benchmark records",
            "provider": "bench",
            "upstream_url": upstream + UPSTREAM_PREFIX,
            "classification": 1,
            "open_class": "open",
            "free_monthly_calls": 1_000_000_000,
            "price": {"per_call_fen": "1", "per_record_fen": "0"},
            "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
            "burst": {"per_second": 1_000_000, "capacity": 1_000_000},
        },
    )
    licensee = post(
        "/admin/v1/licensees",
        {"name": "Bench Co", "credit_code": credit_code("91420100MA4K8B7J2"), "contact": "bench@example.com"},
    )
    post(
        "/admin/v1/licences",
        {
            "licensee_id": licensee["id"],
            "datasets": [DATASET],
            "max_classification": 2,
            "purposes": ["public-interest", "industrial"],
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2099-01-01T00:00:00Z",
            "security_officer": "Officer Bench",
            "paid": {"prepaid_calls": 100_000_000},
        },
    )
    app = post("/admin/v1/apps", {"licensee_id": licensee["id"], "name": "bench-app"})
    if "client_secret" not in app:
        raise BenchError(f"POST /admin/v1/apps returned no client_secret: {app}")
    return Gateway(base, admin, str(app.get("client_id") or app["id"]), str(app["client_secret"]))


def check_target(name: str, url: str, token: str, expected: bytes) -> None:
    reply = http("GET", url, headers={"Authorization": f"Bearer {token}"})
    if reply.status != 200 or reply.body != expected:
        raise BenchError(
            f"{name}: GET {url} -> {reply.status} {reply.body[:300]!r} (expected the upstream body)"
        )
    if "X-Record-Count" not in reply.headers:
        raise BenchError(f"{name}: GET {url} lost the X-Record-Count header")


# --------------------------------------------------------------------------- load


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and error counts from ``wrk --latency`` output."""

    def num(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise BenchError(f"cannot parse wrk output ({pattern!r}):\n{text}")
        return m

    latency = {}
    for label, pct in (("p50", "50"), ("p75", "75"), ("p90", "90"), ("p99", "99")):
        m = num(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
        latency[label] = float(m.group(1)) * _UNITS[m.group(2)]
    total = num(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors = sum(int(g) for g in sock.groups())
    non2 = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "requests": int(total.group(1)),
        "elapsed_s": float(total.group(2)) * _UNITS[total.group(3)] / 1e3,
        "requests_per_s": float(num(r"Requests/sec:\s+([\d.]+)").group(1)),
        "latency_ms": latency,
        "errors": errors,
        "non_2xx": int(non2.group(1)) if non2 else 0,
    }


@dataclass
class Load:
    tool: str
    connections: int
    duration: int
    max_requests: int
    layout: Layout
    procs: Processes
    timeout_s: int = 10

    def argv(self, url: str, token: str) -> list[str]:
        header = f"Authorization: Bearer {token}"
        if self.tool == "wrk":
            return [
                "wrk",
                "-t1",
                f"-c{self.connections}",
                f"-d{self.duration}s",
                f"--timeout={self.timeout_s}s",
                "--latency",
                "-H",
                header,
                url,
            ]
        return [
            sys.executable,
            str(HERE / "loadgen.py"),
            "--url",
            url,
            "-c",
            str(self.connections),
            "-d",
            str(self.duration),
            "-H",
            header,
            "--max-requests",
            str(self.max_requests),
            "--timeout",
            str(self.timeout_s),
        ]

    def run(
        self, url: str, token: str, proxy_pgid: int, upstream_pgid: int, own: list[int]
    ) -> dict[str, Any]:
        """One load run against ``url``; ``own`` lists every server process group of this
        benchmark, so CPU used by anything else on the machine can be reported."""
        cores0, sut0, up0 = core_times(), group_cpu_seconds(proxy_pgid), group_cpu_seconds(upstream_pgid)
        own0 = sum(group_cpu_seconds(g) for g in own)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.perf_counter()
        proc = self.procs.start("load", self.argv(url, token), self.layout.load, capture=True)
        try:
            out, err = proc.communicate(timeout=self.duration + 60)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"the load client did not finish within {self.duration + 60} s") from exc
        finally:
            self.procs.stop(proc, grace=2.0)
            self.procs.started.remove(("load", proc))
        wall = time.perf_counter() - wall0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sut1, up1, cores1 = group_cpu_seconds(proxy_pgid), group_cpu_seconds(upstream_pgid), core_times()
        own_cpu = sum(group_cpu_seconds(g) for g in own) - own0
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise BenchError(f"load client exited {proc.returncode}: {err.decode(errors='replace')[-800:]}")
        result = parse_wrk(text) if self.tool == "wrk" else json.loads(text)
        requests = max(1, int(result["requests"]))
        sut_cpu = sut1 - sut0
        client_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        busy = core_busy(cores0, cores1)
        foreign = sum(busy.values()) - 100.0 * (own_cpu + client_cpu) / wall
        return {
            "requests_per_s": round(float(result["requests_per_s"]), 1),
            "p50_ms": round(float(result["latency_ms"]["p50"]), 3),
            "p90_ms": round(float(result["latency_ms"]["p90"]), 3),
            "p99_ms": round(float(result["latency_ms"]["p99"]), 3),
            "requests": int(result["requests"]),
            "errors": int(result["errors"]),
            "non_2xx": int(result["non_2xx"]),
            "proxy_cpu_pct": round(100.0 * sut_cpu / wall, 1),
            "proxy_cpu_us_per_request": round(1e6 * sut_cpu / requests, 1),
            "upstream_cpu_pct": round(100.0 * (up1 - up0) / wall, 1),
            "load_client_cpu_pct": round(100.0 * client_cpu / wall, 1),
            "other_processes_cpu_pct": round(max(0.0, foreign), 1),
            "core_busy_pct": busy,
        }


# --------------------------------------------------------------------------- report


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "requests_per_s": med("requests_per_s"),
        "p50_ms": med("p50_ms"),
        "p90_ms": med("p90_ms"),
        "p99_ms": med("p99_ms"),
        "proxy_cpu_pct": med("proxy_cpu_pct"),
        "proxy_cpu_us_per_request": med("proxy_cpu_us_per_request"),
        "other_processes_cpu_pct": med("other_processes_cpu_pct"),
        "errors": sum(r["errors"] + r["non_2xx"] for r in runs),
        "runs": runs,
    }


def ratio_of(g: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """A gateway's medians against the bare proxy's."""
    return {
        "throughput_pct": round(100.0 * g["requests_per_s"] / b["requests_per_s"], 1)
        if b["requests_per_s"]
        else 0.0,
        "p50_x": round(g["p50_ms"] / b["p50_ms"], 2) if b["p50_ms"] else 0.0,
        "p99_x": round(g["p99_ms"] / b["p99_ms"], 2) if b["p99_ms"] else 0.0,
        "cpu_per_request_x": round(g["proxy_cpu_us_per_request"] / b["proxy_cpu_us_per_request"], 2)
        if b["proxy_cpu_us_per_request"]
        else 0.0,
    }


def round_by_round(results: dict[str, Any]) -> dict[str, Any]:
    """The two gateways compared within each round (each against that round's
    bare proxy): the machine's speed drifts between rounds, less within one,
    so the median of these is steadier than the difference of the medians."""
    rounds = zip(
        (r["requests_per_s"] for r in results["bare"]["runs"]),
        (r["requests_per_s"] for r in results["gateway"]["runs"]),
        (r["requests_per_s"] for r in results["against"]["runs"]),
        strict=True,
    )
    points = [round(100.0 * (g - a) / b, 1) if b else 0.0 for b, g, a in rounds]
    return {"points": points, "median_points": round(statistics.median(points), 1) if points else 0.0}


LABELS = {"bare": "bare proxy", "gateway": "pdg gateway", "against": "pdg (--against)"}


def render(report: dict[str, Any]) -> None:
    s = report["settings"]
    table = Table(
        title=(
            f"pdg proxy benchmark - {s['tool']}, {s['connections']} connections, "
            f"{s['duration_s']} s x {s['runs']} run(s), medians"
        )
    )
    table.add_column("target")
    table.add_column("requests/s", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("proxy CPU %", justify="right")
    table.add_column("CPU µs/req", justify="right")
    table.add_column("errors", justify="right")
    for key, r in report["results"].items():
        table.add_row(
            LABELS[key],
            f"{r['requests_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['proxy_cpu_pct']:.0f}",
            f"{r['proxy_cpu_us_per_request']:.0f}",
            str(r["errors"]),
        )
    ratio = report["ratio"]
    table.caption = (
        f"gateway / bare throughput: [bold]{ratio['throughput_pct']:.1f} %[/]   "
        f"p50 x{ratio['p50_x']:.2f}   p99 x{ratio['p99_x']:.2f}   CPU/req x{ratio['cpu_per_request_x']:.2f}"
    )
    if "against" in report:
        other = report["against"]["ratio"]
        table.caption += (
            f"\n--against / bare throughput: [bold]{other['throughput_pct']:.1f} %[/]   "
            f"p50 x{other['p50_x']:.2f}   p99 x{other['p99_x']:.2f}   "
            f"CPU/req x{other['cpu_per_request_x']:.2f}   "
            f"(gateway {ratio['throughput_pct'] - other['throughput_pct']:+.1f} points)"
        )
        rounds = report["against"]["rounds"]
        table.caption += (
            f"\nround by round, gateway - --against: median [bold]{rounds['median_points']:+.1f}[/] points "
            f"({', '.join(f'{p:+.1f}' for p in rounds['points'])})"
        )
    console.print(table)
    m = report["machine"]
    console.print(
        f"[dim]{m['cpu_count']} CPUs ({m['usable_cpus']} usable), Python {m['python']}, "
        f"layout {report['pinning']['text']}, "
        f"body {s['body_bytes']} B -> {report['output']}[/]"
    )
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")


def notes_for(report: dict[str, Any]) -> list[str]:
    notes = []
    keys = list(report["results"])
    for key in keys:
        if report["results"][key]["errors"]:
            notes.append(
                f"{key}: {report['results'][key]['errors']} failed or non-2xx calls - figures suspect"
            )
    others = [r["other_processes_cpu_pct"] for k in keys for r in report["results"][k]["runs"]]
    if others and max(others) >= 15.0:
        notes.append(
            f"other processes used up to {max(others):.0f} % of a core during the runs "
            "(a shared machine?): the figures are noisy, compare CPU µs/req rather than requests/s"
        )
    runs = len(report["results"]["bare"]["runs"]) if "bare" in report["results"] else 0
    if "against" in report["results"] and runs % 2:
        notes.append(
            f"{runs} runs: one gateway held the slot right after the bare proxy once more than the "
            "other; use an even --runs for a fair comparison"
        )
    pin = report["pinning"]

    def median_busy(runs: list[dict[str, Any]], cores: list[int] | None) -> float | None:
        if not cores:
            return None
        return min(statistics.median(r["core_busy_pct"].get(f"cpu{c}", 0.0) for r in runs) for c in cores)

    for key in keys:
        label = "the bare proxy" if key == "bare" else f"the {LABELS[key]}"
        r = report["results"][key]
        if r["proxy_cpu_pct"] >= 90.0:
            continue
        own_core = median_busy(r["runs"], pin["proxy_or_gateway"])
        load_core = median_busy(r["runs"], pin["load_client"])
        if own_core is not None and own_core >= 90.0:
            why = f"other processes took the rest of its core ({own_core:.0f} % busy)"
        elif load_core is not None and load_core >= 90.0:
            why = f"the load side was the limit (load core(s) {load_core:.0f} % busy)"
        else:
            why = "something other than CPU was the limit"
        notes.append(
            f"{label} used only {r['proxy_cpu_pct']:.0f} % of a core, so it was not CPU-bound: {why}; "
            "its requests/s understate it" + (" and can flatter the ratio" if key == "bare" else "")
        )
    return notes


def tool_version(tool: str) -> str:
    if tool == "python":
        return f"bench/loadgen.py on Python {platform.python_version()}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    return "wrk"


def source_facts(pdg: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run([pdg, "--version"], capture_output=True, text=True, timeout=30, check=False)
        facts["pdg_version"] = (out.stdout or out.stderr).strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode == 0:
            facts["git_commit"] = head.stdout.strip()
            facts["git_dirty"] = bool(dirty.stdout.strip())
    return facts


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- main


@dataclass
class Options:
    connections: int
    duration: int
    runs: int
    warmup: int
    tool: str
    layout: str
    output: Path
    pdg: str
    records: int
    max_requests: int
    start_attempts: int
    start_timeout: float
    quiet_wait: float
    keep_data: bool
    settings: tuple[str, ...] = ()
    against: str | None = None
    against_settings: tuple[str, ...] = ()


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python bench/proxy.py",
        description="Measure the pdg gateway against a bare aiohttp pass-through proxy (DESIGN.md §8).",
        epilog="Defaults: 64 connections, 10 s per run, 3 runs, 2 s warm-up. --quick: 3 s, 1 run, 1 s.",
    )
    parser.add_argument("-c", "--connections", type=int, default=64, help="concurrent connections (64)")
    parser.add_argument("-d", "--duration", type=int, default=None, help="seconds per measured run (10)")
    parser.add_argument("-r", "--runs", type=int, default=None, help="measured runs per target (3)")
    parser.add_argument("-w", "--warmup", type=int, default=None, help="warm-up seconds per target (2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s, 1 run, 1 s warm-up")
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load tool: wrk if on PATH (auto), or the built-in Python client",
    )
    parser.add_argument(
        "--layout",
        choices=("sut-alone", "client-alone", "none"),
        default="sut-alone",
        help="CPU pinning (see the module docstring); default: proxy alone on the last core",
    )
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--pdg", default=None, help="the pdg executable (default: beside python, or PATH)")
    parser.add_argument(
        "--against",
        default=None,
        metavar="PDG",
        help="another pdg executable (an earlier build), measured in the same run, alternating",
    )
    parser.add_argument("--records", type=int, default=11, help="records in the upstream body (11: ~1 KB)")
    parser.add_argument(
        "--max-requests", type=int, default=5_000_000, help="cap per run for the Python client (5e6)"
    )
    parser.add_argument("--start-attempts", type=int, default=3, help="tries to start pdg serve (3)")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for /healthz (60)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each run, wait up to this many seconds for other processes to go idle (15)",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the gateway's temporary data folder")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PDG_NAME=VALUE",
        help="a setting for the gateway (repeatable), e.g. PDG_LEDGER_RUN_WRITER=false",
    )
    parser.add_argument(
        "--against-set",
        action="append",
        default=[],
        metavar="PDG_NAME=VALUE",
        help="a setting for the --against gateway only, over --set (repeatable), e.g. PDG_WORKERS=1",
    )
    a = parser.parse_args(argv)
    duration = a.duration if a.duration is not None else (3 if a.quick else 10)
    runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if a.connections < 1 or duration < 1 or runs < 1 or warmup < 0 or a.max_requests < 1:
        parser.error("connections, duration, runs and --max-requests must be >= 1, warm-up >= 0")
    if duration > 600 or runs > 20:
        parser.error("keep it bounded: --duration <= 600 and --runs <= 20")
    tool = a.client
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    elif tool == "wrk" and not shutil.which("wrk"):
        parser.error("--client wrk: wrk is not on PATH")
    return Options(
        connections=a.connections,
        duration=duration,
        runs=runs,
        warmup=warmup,
        tool=tool,
        layout=a.layout,
        output=a.output,
        pdg=a.pdg,
        records=a.records,
        max_requests=a.max_requests,
        start_attempts=a.start_attempts,
        start_timeout=a.start_timeout,
        quiet_wait=a.quiet_wait,
        keep_data=a.keep_data,
        settings=tuple(a.set),
        against=a.against,
        against_settings=tuple(a.against_set),
    )


def bench(opts: Options, procs: Processes, data_dir: Path) -> dict[str, Any]:
    pdg = find_pdg(opts.pdg)
    layout = plan_layout(opts.layout)
    console.print(f"[bold]pdg proxy benchmark[/]: {opts.tool}, layout {layout.text()}")

    up_port = free_port()
    upstream = procs.start(
        "upstream",
        [sys.executable, str(HERE / "upstream.py"), "--port", str(up_port), "--records", str(opts.records)],
        layout.upstream,
        log=data_dir / "upstream.log",
    )
    up_base = f"http://127.0.0.1:{up_port}"
    if not wait_ready(up_base + "/", upstream, 30):
        raise BenchError(f"the upstream did not start:\n{log_tail(data_dir / 'upstream.log')}")
    expected = http("GET", up_base + UPSTREAM_PREFIX + CALL_PATH).body

    bare_port = free_port()
    bare = procs.start(
        "bare",
        [sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_port), "--upstream", up_base],
        layout.proxy,
        log=data_dir / "bare.log",
    )
    if not wait_ready(f"http://127.0.0.1:{bare_port}/", bare, 30):
        raise BenchError(f"the bare proxy did not start:\n{log_tail(data_dir / 'bare.log')}")

    # Each gateway: its executable, data folder, process and provisioned world.
    builds = {"gateway": (pdg, data_dir)}
    if opts.against:
        (data_dir / "against").mkdir()
        builds["against"] = (find_pdg(opts.against), data_dir / "against")
    gateways: dict[str, tuple[subprocess.Popen[bytes], Gateway]] = {}
    for name, (exe, folder) in builds.items():
        proc, port = start_gateway(
            procs, exe, folder, layout.proxy, opts.start_attempts, opts.start_timeout, name=name
        )
        gateways[name] = (proc, provision(exe, folder, f"http://127.0.0.1:{port}", up_base))

    targets: dict[str, tuple[str, subprocess.Popen[bytes]]] = {
        "bare": (f"http://127.0.0.1:{bare_port}{UPSTREAM_PREFIX}{CALL_PATH}", bare)
    }
    for name, (proc, world) in gateways.items():
        targets[name] = (f"{world.base}/data/{DATASET}{CALL_PATH}", proc)
    token = gateways["gateway"][1].token()
    for name, (url, _proc) in targets.items():
        check_target(name, url, gateways[name][1].token() if name in gateways else token, expected)
    console.print(f"every path returns the upstream's {len(expected)}-byte body; measuring...")

    own = [upstream.pid, bare.pid, *(proc.pid for proc, _ in gateways.values())]
    load = Load(opts.tool, opts.connections, opts.duration, opts.max_requests, layout, procs)
    if opts.warmup:
        warm = Load(opts.tool, opts.connections, opts.warmup, opts.max_requests, layout, procs)
        for name, (url, proc) in targets.items():
            if name in gateways:
                token = gateways[name][1].token()
            warm.run(url, token, proc.pid, upstream.pid, own)
            console.print(f"  warm-up {name}: done")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for i in range(opts.runs):
        # Each gateway in each slot after the bare proxy, alternately.
        order = list(targets) if i % 2 == 0 else ["bare", *reversed([n for n in targets if n != "bare"])]
        for name in order:
            url, proc = targets[name]
            if name in gateways:
                token = gateways[name][1].token()  # fresh each run: tokens live 300 s by default
            time.sleep(1.0)  # let the previous run's connections close
            quiet, busy_before = wait_quiet(opts.quiet_wait)
            result = load.run(url, token, proc.pid, upstream.pid, own)
            result["machine_busy_before_pct"] = busy_before
            result["quiet_before"] = quiet
            runs[name].append(result)
            console.print(
                f"  run {i + 1}/{opts.runs} {name:8s} {result['requests_per_s']:>9,.0f} req/s  "
                f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
                f"proxy CPU {result['proxy_cpu_pct']:3.0f} %  "
                f"others {result['other_processes_cpu_pct']:3.0f} %  "
                f"errors {result['errors'] + result['non_2xx']}"
            )
        for name, (proc, _) in gateways.items():
            if proc.poll() is not None:
                log = builds[name][1] / f"{name}.log"
                raise BenchError(f"pdg serve ({name}) exited during the benchmark:\n{log_tail(log)}")

    results = {name: summarise(r) for name, r in runs.items()}
    report: dict[str, Any] = {
        "benchmark": "proxy",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "processor": platform.machine(),
        },
        "settings": {
            "tool": opts.tool,
            "tool_version": tool_version(opts.tool),
            "connections": opts.connections,
            "duration_s": opts.duration,
            "runs": opts.runs,
            "warmup_s": opts.warmup,
            "body_bytes": len(expected),
            "records": opts.records,
            "uvloop": has_uvloop(),
            "gateway_url": targets["gateway"][0],
            "bare_url": targets["bare"][0],
            "gateway_settings": dict(GATEWAY_SETTINGS),
            "against_settings": {**GATEWAY_SETTINGS, **AGAINST_SETTINGS},
        },
        "pinning": {**layout.describe(), "text": layout.text()},
        "source": source_facts(pdg),
        "results": results,
        "ratio": ratio_of(results["gateway"], results["bare"]),
        "output": str(opts.output),
    }
    if "against" in results:
        report["against"] = {
            "pdg": builds["against"][0],
            "source": source_facts(builds["against"][0]),
            "ratio": ratio_of(results["against"], results["bare"]),
            "rounds": round_by_round(results),
        }
    report["notes"] = notes_for(report)
    return report


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for items, into in ((opts.settings, GATEWAY_SETTINGS), (opts.against_settings, AGAINST_SETTINGS)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name.startswith("PDG_"):
                raise SystemExit(f"bench: --set and --against-set take PDG_NAME=VALUE, not {item!r}")
            into[name] = value
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with contextlib.suppress(AttributeError):
        signal.signal(signal.SIGHUP, _raise_interrupt)
    procs = Processes()
    data_dir = Path(tempfile.mkdtemp(prefix="pdg-bench-"))
    code = 1
    try:
        report = bench(opts, procs, data_dir)
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(json.dumps(report, indent=2) + "\n")
        render(report)
        code = 0
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping everything[/]")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if opts.keep_data:
            console.print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
