"""Billing benchmark: how long closing and reconciling a period of a large call
record take on PostgreSQL.

    .venv/bin/python -m bench.month_close               # 1,000,000 records x 1 run
    .venv/bin/python bench/month_close.py -n 50000      # smoke check
    .venv/bin/python -m bench.month_close --json        # the report as JSON on stdout

Needs a local PostgreSQL. Each run (``--runs``):

1. creates a fresh database ``pdg_bench_<hex>`` (``--pg-admin-url``) and migrates it;
   adds the eight datasets the records use, each with its own revenue split;
2. writes ``-n`` realistic call records of March 2026 (``bench.call_record.make_log``: 20
   licensees, 8 datasets, ~93 % served, both purposes) into the ledger through the
   ledger store (``LedgerStore.append``, 10,000 per batch: chained and checkpointed as
   the writer does) -- not timed;
3. **close**: times ``billing.invoices.close_period`` for 2026-03, with a progress bar
   of its steps (sums of the usage and the late usage in SQL, the invoices written,
   the billed calls copied in the database);
4. checks the result against the ledger: one invoice per licensee with served calls,
   every served record billed once (``invoice_calls``), line amounts summing to the
   subtotals, splits summing to the lines; then times closing it again (the answer
   for a closed period);
5. **reconcile**: puts the quota counters the gateway would have left (counted from
   the generated records as they were written, not from the ledger) into an
   embedded Valkey, and times ``billing.reconcile.reconcile`` for 2026-03 (the
   chain verified, every billed call compared with its record, the invoices with
   their hashes and rows, the counters with the ledger); it must find zero
   differences;
6. drops the database.

The report gives the median seconds of the close against the target (under 15 s for
1,000,000 records), with the records per second. A rich table, and the JSON in
``bench/results/billing.json`` (``--json`` prints it on stdout instead).
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
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from decimal import Decimal  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bench.call_record import (  # noqa: E402
    DATASETS,
    DEFAULT_PG_ADMIN,
    MAX_RECORDS,
    fresh_database,
    machine_facts,
    make_log,
    price_of,
)
from billing.invoices import close_period  # noqa: E402
from billing.models import InvoiceCallRow  # noqa: E402
from billing.reconcile import reconcile  # noqa: E402
from billing.register import Issuer, Signer  # noqa: E402
from config.settings import Settings  # noqa: E402
from core.money import e4_text  # noqa: E402
from ledger.models import CallRow  # noqa: E402
from ledger.record import from_log  # noqa: E402
from ledger.store import LedgerStore  # noqa: E402
from licensing.keys import load_or_create_signing_key  # noqa: E402
from licensing.registry import Registry  # noqa: E402
from licensing.schemas import DatasetIn, Price, RevenueSplit  # noqa: E402
from metering.periods import parse_period, zone  # noqa: E402
from metering.quota import LicenceKeys  # noqa: E402
from storage.db import create_engine, session_factory  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.redis import EmbeddedValkey, connect  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "billing.json"
TARGET_SECONDS = 15.0
TARGET_RECORDS = 1_000_000
#: Revenue splits (provider, operator, public fund), taken in turn by the datasets.
SPLITS = (("0.6", "0.3", "0.1"), ("0.5", "0.3", "0.2"), ("0.7", "0.2", "0.1"), ("0.3333", "0.3333", "0.3334"))
BATCH = 10_000


class BenchError(Exception):
    pass


async def one_run(n: int, admin_url: str, console: Console, say: Any) -> dict[str, Any]:
    entries = make_log(n)
    async with fresh_database(admin_url) as url:
        engine = create_engine(url)
        try:
            await upgrade(engine)
            registry = Registry(session_factory(engine))
            for i, ds in enumerate(DATASETS):
                provider, operator, fund = SPLITS[i % len(SPLITS)]
                per_call, per_record = price_of(ds)
                await registry.create_dataset(
                    DatasetIn(
                        id=ds,
                        name=ds,
                        provider="bench",
                        upstream_url="http://127.0.0.1:9/",
                        classification=1,
                        open_class="open",
                        revenue_split=RevenueSplit(provider=provider, operator=operator, public_fund=fund),
                        price=Price(per_call_fen=e4_text(per_call), per_record_fen=e4_text(per_record)),
                        max_records_per_call=MAX_RECORDS,
                    )
                )
            with tempfile.TemporaryDirectory() as tmp:
                key = load_or_create_signing_key(Path(tmp) / "ledger-key.pem", "ES256")
            store = LedgerStore(engine, key, checkpoint_records=1000, checkpoint_seconds=3600)
            issuer = Issuer(Settings(), Signer(key.private_key, key.kid))
            counters: dict[str, int] = {}
            started = time.perf_counter()
            with progress(console, "writing the call record") as (bar, task):
                bar.update(task, total=n)
                for start in range(0, n, BATCH):
                    chunk = [from_log(e) for e in entries[start : start + BATCH]]
                    count_quota(chunk, counters)
                    await store.append(chunk, f"{start + len(chunk)}-0")
                    bar.update(task, completed=start + len(chunk))
            say(f"  {n:,} records written in {time.perf_counter() - started:.1f} s (not timed)")
            del entries

            period = parse_period("2026-03", zone("Asia/Shanghai"))
            now = datetime(2026, 4, 2, tzinfo=UTC)
            marks: list[float] = []
            with progress(console, "closing 2026-03") as (bar, task):

                def step(done: int, total: int) -> None:
                    marks.append(time.perf_counter())
                    bar.update(task, completed=done, total=total)

                t0 = time.perf_counter()
                closed = await close_period(
                    engine, period, vat_rate=Decimal("0.06"), now=now, issuer=issuer, progress=step
                )
                seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            again = await close_period(engine, period, vat_rate=Decimal("0.06"), now=now, issuer=issuer)
            again_seconds = time.perf_counter() - t1
            if not again.already_closed or again.invoices != closed.invoices:
                raise BenchError("closing the closed period did not answer its invoices")
            async with engine.connect() as conn:
                served = await conn.scalar(select(func.count()).where(CallRow.outcome == "served"))
                licensees = await conn.scalar(
                    select(func.count(func.distinct(CallRow.licensee_id))).where(CallRow.outcome == "served")
                )
                billed = await conn.scalar(select(func.count()).select_from(InvoiceCallRow))
            lines = [line for inv in closed.invoices for line in inv["lines"]]
            problems = []
            if len(closed.invoices) != licensees:
                problems.append(f"{len(closed.invoices)} invoices for {licensees} licensees")
            if billed != served or sum(line["calls"] for line in lines) != served:
                problems.append(
                    f"{billed} calls copied, {sum(ln['calls'] for ln in lines)} on lines, {served} served"
                )
            for inv in closed.invoices:
                if sum(line["amount_fen"] for line in inv["lines"]) != inv["subtotal_fen"]:
                    problems.append(f"{inv['id']}: lines do not sum to the subtotal")
            if any(sum(line["split"].values()) != line["amount_fen"] for line in lines):
                problems.append("a split does not sum to its line")
            if problems:
                raise BenchError("; ".join(problems))
            with tempfile.TemporaryDirectory() as tmp:
                valkey = EmbeddedValkey(Path(tmp))
                client = connect(await valkey.start())
                try:
                    await client.mset(counters)
                    public = {key.kid: key.private_key.public_key()}
                    with progress(console, "reconciling 2026-03") as (bar, task):

                        def tick(done: int, total: int) -> None:
                            ticks.append(time.perf_counter())
                            bar.update(task, completed=done, total=total)

                        ticks: list[float] = []
                        t2 = time.perf_counter()
                        found = await reconcile(engine, client, period, public, limit=10, progress=tick)
                        reconcile_seconds = time.perf_counter() - t2
                finally:
                    await client.aclose()
                    await valkey.stop()
            if not found.clean:
                raise BenchError(f"reconciliation is not clean: {found.summary}; {found.differences[:3]}")
            say(
                f"  reconcile {reconcile_seconds:.2f} s {steps(t2, ticks)}: "
                f"{found.checked['billed_calls']:,} billed calls, {found.checked['counters']} counters, "
                "zero differences"
            )
            total = sum(inv["total_fen"] for inv in closed.invoices)
            say(
                f"  close {seconds:.2f} s {steps(t0, marks)} ({n / seconds:,.0f} records/s): "
                f"{len(closed.invoices)} invoices, "
                f"{len(lines)} lines, {served:,} calls billed, {total:,} fen in all; "
                f"again {again_seconds:.3f} s"
            )
            return {
                "records": n,
                "served": served,
                "close_seconds": round(seconds, 3),
                "records_per_s": round(n / seconds),
                "again_seconds": round(again_seconds, 4),
                "reconcile_seconds": round(reconcile_seconds, 3),
                # usage summed, late usage summed, invoices written, calls copied
                "close_steps_seconds": steps(t0, marks),
                # verified, billed calls compared, unbilled found, invoices checked, counters compared
                "reconcile_steps_seconds": steps(t2, ticks),
                "counters": found.checked["counters"],
                "invoices": len(closed.invoices),
                "lines": len(lines),
                "total_fen": total,
            }
        finally:
            await engine.dispose()


def steps(start: float, marks: list[float]) -> list[float]:
    """Seconds between the progress marks of a timed operation."""
    return [round(b - a, 3) for a, b in zip([start, *marks], marks, strict=False)]


def count_quota(records: list[dict[str, Any]], counters: dict[str, int]) -> None:
    """What the gateway's reservations leave in the quota counters for these
    records (``metering/lua/reserve.lua``): free calls per licence, dataset and
    period; paid calls likewise; credit used per licence and period."""
    tz = zone("Asia/Shanghai")
    for r in records:
        pool = r["pool"]
        if r["outcome"] != "served" or pool not in ("free", "prepaid", "credit"):
            continue
        keys, period = LicenceKeys(r["licence_id"]), parse_period(r["period"], tz)
        names = (
            [keys.free(r["dataset_id"], period)]
            if pool == "free"
            else [keys.paid_calls(r["dataset_id"], period)]
        )
        for name in names:
            counters[name] = counters.get(name, 0) + 1
        if pool == "credit":
            name = keys.credit(period)
            counters[name] = counters.get(name, 0) + int(r["charge_e4"])


class progress:  # noqa: N801 (a context manager used like a function)
    def __init__(self, console: Console, label: str) -> None:
        self.bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.label = label

    def __enter__(self) -> tuple[Progress, Any]:
        self.bar.__enter__()
        return self.bar, self.bar.add_task(self.label, total=None)

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)


async def bench(opts: argparse.Namespace, console: Console) -> dict[str, Any]:
    runs = []
    for i in range(opts.runs):
        console.print(f"run {i + 1}/{opts.runs}", highlight=False)
        runs.append(await one_run(opts.records, opts.pg_admin_url, console, console.print))
    seconds = [r["close_seconds"] for r in runs]
    median = statistics.median(seconds)
    reconciles = [r["reconcile_seconds"] for r in runs]
    return {
        "records": opts.records,
        "runs": runs,
        "close_seconds_median": median,
        "close_seconds_min": min(seconds),
        "close_seconds_max": max(seconds),
        "reconcile_seconds_median": statistics.median(reconciles),
        "reconcile_seconds_min": min(reconciles),
        "reconcile_seconds_max": max(reconciles),
        "target_seconds": TARGET_SECONDS if opts.records == TARGET_RECORDS else None,
        "machine": machine_facts(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def render(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"billing: closing a period of {report['records']:,} records on PostgreSQL")
    for column in ("figure", "median", "min", "max", "target"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    target = report["target_seconds"]
    verdict = "" if target is None else (" met" if report["close_seconds_median"] < target else " missed")
    table.add_row(
        "close (s)",
        f"{report['close_seconds_median']:.2f}",
        f"{report['close_seconds_min']:.2f}",
        f"{report['close_seconds_max']:.2f}",
        f"< {target:.0f}{verdict}" if target else "",
    )
    table.add_row(
        "reconcile (s)",
        f"{report['reconcile_seconds_median']:.2f}",
        f"{report['reconcile_seconds_min']:.2f}",
        f"{report['reconcile_seconds_max']:.2f}",
        "",
    )
    console.print(table)
    console.print(f"machine: {report['machine']}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "-n", "--records", type=int, default=TARGET_RECORDS, help="records in the period (1,000,000)"
    )
    p.add_argument("-r", "--runs", type=int, default=1, help="measured runs (1); the median is reported")
    p.add_argument(
        "--pg-admin-url",
        default=DEFAULT_PG_ADMIN,
        help=f"asyncpg URL to CREATE DATABASE from ({DEFAULT_PG_ADMIN})",
    )
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    opts = p.parse_args(argv)
    if opts.records < 1 or opts.runs < 1:
        p.error("--records and --runs must be positive")
    console = Console(stderr=opts.json)
    try:
        report = asyncio.run(bench(opts, console))
    except (BenchError, OSError) as exc:
        console.print(f"bench failed: {exc}", highlight=False)
        return 1
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if opts.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render(report, console)
        console.print(f"JSON: {opts.output}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
