"""Where a data call's CPU goes: a per-stage budget of one call, in µs.

    .venv/bin/python bench/stages.py              # 20 s of load, twice (~2 min)
    .venv/bin/python bench/stages.py -d 10 --top 25

1. measures CPU per call without a profiler, under the load ``bench/proxy.py``
   uses (its processes, layout and ``wrk``): the bare proxy's, and, for the
   gateway, each process of its group apart: the gateway itself, its
   embedded Valkey and its ledger writer;
2. runs ``bench/proxy.py`` (``-r 1``) with the gateway's ``pdg serve`` under ``cProfile`` (this file
   stands in for ``pdg``: ``serve`` is profiled, other commands pass through) and
   reads the profile the gateway writes when it stops;
3. splits the gateway process's profiled CPU into the stages of a call
   (below) and scales each share to that process's unprofiled CPU per call.
   The profiler slows Python code more than C code, so the split is an
   estimate; the totals are measured. (The
   app's cleanup contexts, suspended for the whole run, are left out: cProfile
   charges a suspended async generator with the time it waits.)

Stages, by the functions that do them (cumulative time, each counted once):

- token: ``TokenService.verify``; authorise: ``_authorize`` (licence and
  operation rules);
- reserve: ``Call.reserve`` (planning and judging the reservation);
- forward: ``_forward`` without ``_relay`` (the upstream request);
- relay: ``_relay`` without ``Call.finish`` (streaming the body, counting
  records, the response digest);
- record + finish: ``Call.finish`` (the record completed, the finish queued);
- quota store: ``QuotaBatcher._send`` (the batched reserve and finish runs
  and record appends, their encoding and replies);
- metrics: ``prometheus_client``;
- the rest: the HTTP server (parsing, writing), the event loop, the
  catalogue poll, the heartbeat.
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
import cProfile  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench import proxy  # noqa: E402

#: The profile's path, for the stand-in ``pdg`` (not a PDG_ variable: the
#: proxy benchmark drops those).
PROFILE_ENV = "STAGES_PROFILE"

#: (stage, file suffix, function name); a function's cumulative time.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("token", "licensing/tokens.py", "verify"),
    ("authorise", "gateway/proxy.py", "_authorize"),
    ("reserve", "gateway/call.py", "reserve"),
    ("forward", "gateway/proxy.py", "_forward"),
    ("relay", "gateway/proxy.py", "_relay"),
    ("record + finish", "gateway/call.py", "finish"),
    ("quota store", "metering/quota.py", "_send"),
)


def stand_in(argv: list[str]) -> int:
    """``pdg`` itself, with ``serve`` under cProfile."""
    from cli.main import main

    if not argv or argv[0] != "serve":
        return main(argv)
    profile = cProfile.Profile()
    try:
        return int(profile.runcall(main, argv) or 0)
    finally:
        profile.dump_stats(os.environ[PROFILE_ENV])


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    return sum(v[3] for (file, _line, func), v in raw.items() if func == name and file.endswith(suffix))


def _suspended(entry: Any) -> bool:
    """An entry called a few times that holds seconds of its own time: a
    generator suspended across the whole run (the app's cleanup contexts,
    which cProfile charges with the time they wait), not work."""
    _cc, ncalls, tottime, _cum, _callers = entry
    return bool(ncalls < 100 and tottime > 1.0)


def budget(profile: Path, cpu_per_call_us: float) -> list[tuple[str, float]]:
    stats = pstats.Stats(str(profile))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values() if not _suspended(v))
    cum = {stage: cumulative(stats, suffix, name) for stage, suffix, name in STAGES}
    metrics = sum(v[2] for (file, _l, _f), v in raw.items() if "prometheus_client" in file)
    seconds = {
        "token": cum["token"],
        "authorise": cum["authorise"],
        "reserve": cum["reserve"],
        "forward": cum["forward"] - cum["relay"],
        "relay": cum["relay"] - cum["record + finish"],
        "record + finish": cum["record + finish"],
        "quota store": cum["quota store"],
        "metrics": metrics,
    }
    seconds["the rest"] = max(0.0, total - sum(seconds.values()))
    return [(stage, cpu_per_call_us * s / total) for stage, s in seconds.items()]


def _member_cpu(pgid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each live process of a group, with its name."""
    found: dict[int, tuple[str, float]] = {}
    for pid in proxy.group_members(pgid):
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
        fields = stat_line[stat_line.rindex(")") + 2 :].split()
        found[pid] = (name, (int(fields[11]) + int(fields[12])) / proxy.CLK_TCK)
    return found


def measure(seconds: int) -> dict[str, float]:
    """CPU µs per call, unprofiled: the bare proxy, and the gateway's
    process, its Valkey and its ledger writer, one load run each."""
    procs = proxy.Processes()
    data_dir = Path(tempfile.mkdtemp(prefix="pdg-stages-plain-"))
    layout = proxy.plan_layout("sut-alone")
    tool = "wrk" if shutil.which("wrk") else "python"
    try:
        up_port = proxy.free_port()
        upstream = procs.start(
            "upstream",
            [sys.executable, str(HERE / "upstream.py"), "--port", str(up_port)],
            layout.upstream,
            log=data_dir / "upstream.log",
        )
        up_base = f"http://127.0.0.1:{up_port}"
        if not proxy.wait_ready(up_base + "/", upstream, 30):
            raise proxy.BenchError("the upstream did not start")
        bare_port = proxy.free_port()
        bare = procs.start(
            "bare",
            [sys.executable, str(HERE / "bare_proxy.py"), "--port", str(bare_port), "--upstream", up_base],
            layout.proxy,
            log=data_dir / "bare.log",
        )
        if not proxy.wait_ready(f"http://127.0.0.1:{bare_port}/", bare, 30):
            raise proxy.BenchError("the bare proxy did not start")
        pdg = proxy.find_pdg(None)
        gateway, port = proxy.start_gateway(procs, pdg, data_dir, layout.proxy, 3, 90)
        world = proxy.provision(pdg, data_dir, f"http://127.0.0.1:{port}", up_base)
        token = world.token()
        urls = {
            "bare": (f"http://127.0.0.1:{bare_port}{proxy.UPSTREAM_PREFIX}{proxy.CALL_PATH}", bare),
            "gateway": (f"{world.base}/data/{proxy.DATASET}{proxy.CALL_PATH}", gateway),
        }
        own = [upstream.pid, bare.pid, gateway.pid]
        warm = proxy.Load(tool, 64, 2, 10**9, layout, procs)
        load = proxy.Load(tool, 64, seconds, 10**9, layout, procs)
        out: dict[str, float] = {}
        for name, (url, target) in urls.items():
            warm.run(url, token, target.pid, upstream.pid, own)
            before = _member_cpu(target.pid)
            result = load.run(url, token, target.pid, upstream.pid, own)
            after = _member_cpu(target.pid)
            calls = max(1, int(result["requests"]))
            for pid, (comm, cpu) in after.items():
                used = 1e6 * (cpu - before.get(pid, (comm, 0.0))[1]) / calls
                if name == "bare":
                    part = "bare proxy"
                elif pid == target.pid:
                    part = "gateway"
                elif "valkey" in comm:
                    part = "valkey"
                else:
                    part = "ledger writer"
                out[part] = out.get(part, 0.0) + used
        return out
    finally:
        procs.stop_all()
        shutil.rmtree(data_dir, ignore_errors=True)


def proxy_bench(pdg: str | None, seconds: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "proxy.py"), "-r", "1", "-d", str(seconds), "-o", str(out)]
    if pdg:
        argv += ["--pdg", pdg]
    subprocess.run(argv, env=env, check=True, timeout=seconds * 10 + 300)
    return dict(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--duration", type=int, default=20, help="seconds of load per run (20)")
    p.add_argument("--top", type=int, default=15, help="functions listed by own time (15)")
    p.add_argument("-o", "--output", type=Path, default=HERE / "results" / "stages.json")
    opts = p.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="pdg-stages-") as tmp:
        folder = Path(tmp)
        plain = measure(opts.duration)
        wrapper = folder / "pdg"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --as-pdg "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        profile = folder / "gateway.prof"
        proxy_bench(
            str(wrapper), opts.duration, folder / "profiled.json", {**os.environ, PROFILE_ENV: str(profile)}
        )
        gateway_us, bare_us = plain["gateway"], plain["bare proxy"]
        group_us = gateway_us + plain.get("valkey", 0.0) + plain.get("ledger writer", 0.0)
        stages = budget(profile, gateway_us)
        table = Table("stage", "µs per call")
        for stage, us in stages:
            table.add_row(stage, f"{us:.0f}")
        table.add_row("gateway process, measured", f"{gateway_us:.0f}")
        table.add_row("its embedded Valkey, measured", f"{plain.get('valkey', 0.0):.0f}")
        table.add_row("its ledger writer, measured", f"{plain.get('ledger writer', 0.0):.0f}")
        table.add_row("the whole gateway, measured", f"{group_us:.0f}")
        table.add_row("bare proxy, measured", f"{bare_us:.0f}")
        console.print(table)
        console.print(f"top {opts.top} functions by own time (profiled):")
        top = pstats.Stats(str(profile))
        raw: dict[Any, Any] = top.stats  # type: ignore[attr-defined]
        for key in [k for k, v in raw.items() if _suspended(v)]:
            del raw[key]
        top.sort_stats("tottime").print_stats(opts.top)
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        opts.output.write_text(
            json.dumps(
                {
                    "measured_us": {k: round(v, 1) for k, v in plain.items()},
                    "stages_us": {stage: round(us, 1) for stage, us in stages},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-pdg"]:
        sys.exit(stand_in(sys.argv[2:]))
    sys.exit(main())
