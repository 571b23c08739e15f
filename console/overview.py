"""The operating company's overview (``/console/``): what the call record
says of a window of days, as charts, and the state of the ledger.

The charts are counted in SQL from ``calls`` (``ledger.models.CallRow``),
by day in ``billing.time_zone``: the window (``?from=YYYY-MM-DD&to=YYYY-MM-DD``,
both days included, at most 366 days; default the last 30 days to today) is
cut at the zone's midnights, so a day is the zone's day on either backend.

- calls per day by dataset (every record: served, refused, failed);
- free against paid: served calls per day by the pool they drew on (free;
  paid = prepaid or credit; other = a repeat of an idempotent call, or none);
- refusals by reason: the problem code of each ``refused`` record;
- top licensees: the ten with the most calls, with how many were served;
- upstream errors: ``upstream-failure`` records per day, by what the
  upstream did (answered 5xx, answered a redirect, did not answer in time).

The ledger's state is what ``/metrics`` and ``/readyz`` read: the log's
backlog and the writer's lag as this replica last heard them, the records
stored and the newest signed checkpoint (``ledger_checkpoints``), and the
newest signed checkpoint of the whole-log tree that witnesses fetch from
``/audit/v1/checkpoint`` (``log_checkpoints``). Witnesses keep their
cosignatures themselves (``pdg audit witness --state``), and ``pdg audit
verify`` prints its report without storing it: the gateway records neither,
and the page says so.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import and_, case, desc, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from console.charts import OTHER, PALETTE, Series, bars, stacked
from console.i18n import translator
from console.web import LANG, _registry, _settings, render
from core.errors import ValidationFailedError
from gateway.state import CLOCK, ENGINE, PRESENCE
from ledger.models import CallRow, CheckpointRow, LedgerStateRow, LogCheckpointRow
from ledger.record import REFUSED, SERVED, UPSTREAM_FAILURE
from metering.periods import zone

#: The window shown unless one is asked for, in days (today included).
DEFAULT_DAYS = 30
MAX_DAYS = 366
#: Datasets drawn as series of their own; the rest are summed as "other".
SERIES_DATASETS = 7
TOP_LICENSEES = 10
PAID_POOLS = ("prepaid", "credit")
UPSTREAM_KINDS = ("5xx", "redirect", "no-answer")


def _day(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ValidationFailedError(field, "a date, YYYY-MM-DD") from exc


def window(query: Any, today: date) -> tuple[date, date]:
    """The first and last day asked for (``from``, ``to``), checked."""
    last = _day(query["to"], "to") if query.get("to") else today
    first = _day(query["from"], "from") if query.get("from") else last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise ValidationFailedError("from", "a day on or before 'to'")
    if (last - first).days + 1 > MAX_DAYS:
        raise ValidationFailedError("from", f"at most {MAX_DAYS} days before 'to'")
    return first, last


class Counts:
    """The window's figures, counted from the call record."""

    def __init__(self, days: list[date]) -> None:
        self.days = days
        self.by_dataset: dict[str, list[int]] = {}
        self.pools: dict[str, list[int]] = {k: [0] * len(days) for k in ("free", "paid", "other")}
        self.upstream: dict[str, list[int]] = {k: [0] * len(days) for k in UPSTREAM_KINDS}
        self.refusals: list[tuple[str, int]] = []
        self.licensees: list[tuple[str, int, int]] = []

    @property
    def total(self) -> int:
        return sum(sum(v) for v in self.by_dataset.values())


async def count_calls(
    conn: AsyncConnection, first: date, last: date, tz_name: str, licensee_id: str | None = None
) -> Counts:
    """Every chart's figures for the days ``first..last`` in ``tz_name`` (of
    one licensee's calls, with ``licensee_id``: its developers' portal)."""
    tz = zone(tz_name)
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    bounds = [datetime.combine(d, time(), tz) for d in [*days, last + timedelta(days=1)]]
    in_window = and_(CallRow.time >= bounds[0], CallRow.time < bounds[-1])
    if licensee_id is not None:
        in_window = and_(in_window, CallRow.licensee_id == licensee_id)
    # The day of each record: the zone's midnights, compared as UTC instants.
    day: Any = (
        case(*((CallRow.time < b, n) for n, b in enumerate(bounds[1:-1])), else_=len(days) - 1)
        if len(days) > 1
        else literal(0)
    )
    kind = case(
        (CallRow.upstream_status >= 500, "5xx"),
        (CallRow.upstream_status.is_not(None), "redirect"),
        else_="no-answer",
    )
    rows = select(
        day.label("day"),
        CallRow.dataset_id.label("dataset_id"),
        CallRow.outcome.label("outcome"),
        CallRow.pool.label("pool"),
        kind.label("kind"),
    ).where(in_window)
    sub = rows.subquery()
    found = Counts(days)
    n = func.count().label("n")

    for d, dataset_id, calls in await conn.execute(
        select(sub.c.day, sub.c.dataset_id, n).group_by(sub.c.day, sub.c.dataset_id)
    ):
        found.by_dataset.setdefault(dataset_id, [0] * len(days))[d] += calls
    for d, pool, calls in await conn.execute(
        select(sub.c.day, sub.c.pool, n).where(sub.c.outcome == SERVED).group_by(sub.c.day, sub.c.pool)
    ):
        found.pools["free" if pool == "free" else "paid" if pool in PAID_POOLS else "other"][d] += calls
    for d, what, calls in await conn.execute(
        select(sub.c.day, sub.c.kind, n)
        .where(sub.c.outcome == UPSTREAM_FAILURE)
        .group_by(sub.c.day, sub.c.kind)
    ):
        found.upstream[what][d] += calls
    found.refusals = [
        (str(problem or "—"), calls)
        for problem, calls in await conn.execute(
            select(CallRow.problem, n)
            .where(in_window, CallRow.outcome == REFUSED)
            .group_by(CallRow.problem)
            .order_by(desc("n"), CallRow.problem)
        )
    ]
    served = func.sum(case((CallRow.outcome == SERVED, 1), else_=0)).label("served")
    found.licensees = [
        (licensee_id, calls, int(ok or 0))
        for licensee_id, calls, ok in await conn.execute(
            select(CallRow.licensee_id, n, served)
            .where(in_window)
            .group_by(CallRow.licensee_id)
            .order_by(desc("n"), CallRow.licensee_id)
            .limit(TOP_LICENSEES)
        )
    ]
    return found


async def ledger_state(request: web.Request, conn: AsyncConnection) -> dict[str, Any]:
    """What the writer, the checkpoints and the witnesses' checkpoint say now."""
    presence = request.config_dict[PRESENCE]
    state = (await conn.execute(select(LedgerStateRow).limit(1))).first()
    checkpoint = (
        await conn.execute(select(CheckpointRow).order_by(CheckpointRow.last_seq.desc()).limit(1))
    ).first()
    witnessed = (
        await conn.execute(select(LogCheckpointRow).order_by(LogCheckpointRow.size.desc()).limit(1))
    ).first()
    stored = state.next_seq - 1 if state is not None else 0
    return {
        "heard": presence.fresh,
        "backlog": presence.backlog,
        "max_backlog": presence.max_backlog,
        "lag_seconds": round(presence.lag_seconds, 3),
        "stored": stored,
        "algorithm": state.algorithm if state is not None else None,
        "written_at": state.updated_at if state is not None else None,
        "unchecked": stored - (state.checkpointed_seq if state is not None else 0),
        "checkpoint": None
        if checkpoint is None
        else {
            "first_seq": checkpoint.first_seq,
            "last_seq": checkpoint.last_seq,
            "created_at": checkpoint.created_at,
            "key_id": checkpoint.key_id,
            "algorithm": checkpoint.algorithm,
        },
        "witness": None
        if witnessed is None
        else {
            "size": witnessed.size,
            "created_at": witnessed.created_at,
            "origin": witnessed.note.split("\n", 1)[0],
        },
    }


def _colour(n: int) -> str:
    return PALETTE[n] if n < len(PALETTE) else OTHER


def charts(t: Any, counts: Counts, names: dict[str, str], licensee_names: dict[str, str]) -> dict[str, Any]:
    """The five charts of the overview, as markup."""
    labels = [d.isoformat() for d in counts.days]
    common = {
        "category_header": t("overview.day"),
        "total_header": t("overview.total"),
        "table_label": t("overview.as_table"),
        "empty": t("overview.no_calls"),
    }
    ranked = sorted(counts.by_dataset.items(), key=lambda item: (-sum(item[1]), item[0]))
    shown = ranked[:SERIES_DATASETS]
    rest = ranked[SERIES_DATASETS:]
    per_dataset = [Series(names.get(k, k), v, _colour(n)) for n, (k, v) in enumerate(shown)]
    if rest:
        others = [sum(v[i] for _, v in rest) for i in range(len(labels))]
        per_dataset.append(Series(t("overview.other_datasets", n=len(rest)), others, OTHER))
    pools = [
        Series(t(f"overview.pool.{k}"), counts.pools[k], colour)
        for k, colour in (("free", PALETTE[2]), ("paid", PALETTE[1]), ("other", OTHER))
        if k != "other" or any(counts.pools[k])
    ]
    upstream = [
        Series(t(f"overview.upstream.{k}"), counts.upstream[k], colour)
        for k, colour in zip(UPSTREAM_KINDS, (PALETTE[5], PALETTE[3], PALETTE[7]), strict=True)
    ]
    span = t("overview.span", first=labels[0], last=labels[-1], days=len(labels))
    return {
        "calls": stacked(
            t("overview.chart.calls"),
            t("overview.desc.calls", span=span, total=counts.total),
            labels,
            per_dataset,
            chart_id="chart-calls",
            **common,
        ),
        "pools": stacked(
            t("overview.chart.pools"),
            t(
                "overview.desc.pools",
                span=span,
                **{k: sum(counts.pools[k]) for k in ("free", "paid", "other")},
            ),
            labels,
            pools,
            chart_id="chart-pools",
            **common,
        ),
        "refusals": bars(
            t("overview.chart.refusals"),
            t("overview.desc.refusals", span=span, total=sum(v for _, v in counts.refusals)),
            counts.refusals,
            label_header=t("overview.reason"),
            value_header=t("overview.calls"),
            table_label=common["table_label"],
            empty=t("overview.no_refusals"),
            chart_id="chart-refusals",
            colour=PALETTE[5],
        ),
        "licensees": bars(
            t("overview.chart.licensees"),
            t("overview.desc.licensees", span=span, n=len(counts.licensees)),
            [(licensee_names.get(k, k), calls) for k, calls, _ in counts.licensees],
            label_header=t("overview.licensee"),
            value_header=t("overview.calls"),
            table_label=common["table_label"],
            empty=common["empty"],
            chart_id="chart-licensees",
        ),
        "upstream": stacked(
            t("overview.chart.upstream"),
            t(
                "overview.desc.upstream",
                span=span,
                total=sum(sum(v) for v in counts.upstream.values()),
            ),
            labels,
            upstream,
            chart_id="chart-upstream",
            **{**common, "empty": t("overview.no_upstream_errors")},
        ),
    }


async def overview_page(request: web.Request, counts_of_registry: dict[str, int]) -> web.Response:
    """The overview: the registry's tiles, the window's charts, the ledger."""
    tz_name = _settings(request).billing.time_zone
    today = request.config_dict[CLOCK].now().astimezone(zone(tz_name)).date()
    first, last = window(request.query, today)
    registry = _registry(request)
    async with request.config_dict[ENGINE].connect() as conn:
        counts = await count_calls(conn, first, last, tz_name)
        ledger = await ledger_state(request, conn)
    names = {d.id: d.name for d in await registry.list_datasets()}
    licensee_names = {lic.id: lic.name for lic in await registry.list_licensees()}
    t = translator(request[LANG])
    return render(
        request,
        "overview.html",
        counts=counts_of_registry,
        charts=charts(t, counts, names, licensee_names),
        first=first.isoformat(),
        last=last.isoformat(),
        zone=tz_name,
        ledger=ledger,
        title=t("overview.title"),
    )
