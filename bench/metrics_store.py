"""What ``pdg serve --workers N``'s shared metrics cost a call: a counter
increment and a histogram observation with prometheus-client's values in
memory (one process) against in files shared by the workers (its
multiprocess mode), each measured in a fresh interpreter, five rounds.

    .venv/bin/python bench/metrics_store.py

A served call moves one counter and three histograms (``gateway.metrics``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROUNDS = 5
N = 200_000

_PROBE = """
import json, timeit
from prometheus_client import CollectorRegistry, Counter, Histogram
registry = CollectorRegistry()
counter = Counter("c", "c", ["a"], registry=registry).labels("a")
histogram = Histogram("h", "h", ["a"], registry=registry).labels("a")
n = {n}
print(json.dumps({{
    "inc_us": timeit.timeit(counter.inc, number=n) / n * 1e6,
    "observe_us": timeit.timeit(lambda: histogram.observe(0.003), number=n) / n * 1e6,
}}))
"""


def _round(folder: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if folder is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = folder
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(n=N)], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> int:
    single: list[dict[str, float]] = []
    shared: list[dict[str, float]] = []
    for _ in range(ROUNDS):
        single.append(_round(None))
        with tempfile.TemporaryDirectory() as folder:
            shared.append(_round(folder))
    rows = []
    for name, runs in (("in memory (one process)", single), ("in files (--workers N)", shared)):
        inc = statistics.median(r["inc_us"] for r in runs)
        observe = statistics.median(r["observe_us"] for r in runs)
        rows.append((name, inc, observe, inc + 3 * observe))
    print(f"{'values':<26} {'inc µs':>8} {'observe µs':>11} {'per served call µs':>19}")
    for name, inc, observe, call in rows:
        print(f"{name:<26} {inc:>8.2f} {observe:>11.2f} {call:>19.2f}")
    print(f"difference per served call: {rows[1][3] - rows[0][3]:.2f} µs (medians of {ROUNDS} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
