"""Reconciling a closed period: the verified call record, the invoices and the
quota counters, compared call by call (``pdg billing reconcile``,
``GET /admin/v1/reconciliation/{period}``).

Three sources say what a period's calls were, and each is checked against the
others:

* **the call record** is re-derived first (:func:`ledger.audit.verify`: the
  hash chain and its signed checkpoints), so what the comparisons read is the
  record the auditor can prove;
* **the invoices**: the calls each billed (``invoice_calls``: seq, call id,
  charge, copied at the close), each invoice's stored content and its hash,
  and its line rows;
* **the quota counters** in Redis, which the gateway moved as it reserved and
  settled each call.

Each difference names a call by its id and a cause:

``ledger-chain``
    the call record fails verification at this record (altered, inserted,
    reordered); only the first such place is known.
``record-missing``
    an invoice billed this call, and the ledger no longer holds its record.
``record-altered``
    an invoice billed this call, and the ledger's record at its seq now says
    otherwise (another call id, not served, another licensee, charge or period).
``unbilled``
    a served call the close covered that no invoice billed.
``invoice-altered``
    the invoice that billed this call no longer hashes to its
    ``content_hash``, or its row disagrees with its content.
``invoice-line-altered``
    the line that billed this call: its row in ``invoice_lines`` disagrees
    with the invoice's hashed content (or is missing).
``note-altered`` / ``register-altered``
    (no call) a note on one of the period's invoices, or issued in it, is
    not what the billing register signed at its issue; or the register's
    chain, signatures or numbering are broken (``billing.register``). An
    invoice that is not what was issued is ``invoice-altered``, even when its
    content, hash and rows were rewritten together.
``price-mismatch``
    a billed call whose charge is not what the terms it names price it at:
    the tier price at its position (the n-th paid call of its licence,
    dataset and period, by ``seq``) plus its records at the per-record
    price, 0 for a free call; or a call naming terms its dataset never had.
    On a Redis Cluster a paid call takes its position before its record is
    appended, so positions and ``seq`` may interleave: there the charges of
    each licence, dataset and terms version are compared as a whole (the
    same prices, in any order), and the calls whose charge is not among the
    prices left are named.
``counter-mismatch``
    a quota counter of the period disagrees with the calls the ledger holds
    for it: the free calls of a licence and dataset, its paid calls, or its
    credit used. A counter counts calls, not one call, so the difference names
    the last call the ledger holds for that counter (after which it should
    read the ledger's figure), or no call (``null``) for a counter the ledger
    has no call for.

The counters follow the rules of ``metering/lua``: a served call counts, a
released one (an upstream failure, a call cut short, one recorded
``incomplete``) does not, and a replay of an idempotent call already charged
(``pool`` = ``replay``) draws on no pool. The counters live 400 days, so a
period can be reconciled for that long; a prepaid balance has no period and
is not compared here. Calls still in the call-record log or in flight are
reported (``pending``): the counters already count them and the ledger not
yet, so reconcile once they are written.

A clean period has zero differences and says so. All reads of the database
are from one snapshot; a period's billed calls are read by ``seq`` range (the
close's ``first_seq`` to ``through_seq``), and a call billed on an invoice that
does not exist counts as unbilled.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError
from sqlalchemy import BigInteger, Table, and_, func, not_, or_, select
from sqlalchemy import cast as sql_cast
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import register
from billing.invoices import billable
from billing.models import (
    BillingCloseRow,
    BillingDraftRow,
    BillingNoteRow,
    InvoiceCallRow,
    InvoiceLineRow,
    InvoiceRow,
)
from core.errors import ConflictError
from core.money import fen_to_e4
from ledger import audit
from ledger.audit.common import _snapshot
from ledger.log import LOG
from ledger.models import CallRow
from ledger.record import REPLAY_POOL, SERVED
from licensing.models import DatasetTermsRow
from metering.periods import Period
from metering.quota import LicenceKeys, QuotaStoreError
from storage.redis import RedisClient

_CALLS = cast(Table, CallRow.__table__)
_CLOSES = cast(Table, BillingCloseRow.__table__)
_INVOICES = cast(Table, InvoiceRow.__table__)
_LINES = cast(Table, InvoiceLineRow.__table__)
_BILLED = cast(Table, InvoiceCallRow.__table__)
_NOTES = cast(Table, BillingNoteRow.__table__)
_DRAFTS = cast(Table, BillingDraftRow.__table__)
_TERMS = cast(Table, DatasetTermsRow.__table__)

LEDGER_CHAIN: Final = "ledger-chain"
RECORD_MISSING: Final = "record-missing"
RECORD_ALTERED: Final = "record-altered"
UNBILLED: Final = "unbilled"
INVOICE_ALTERED: Final = "invoice-altered"
LINE_ALTERED: Final = "invoice-line-altered"
NOTE_ALTERED: Final = "note-altered"
REGISTER_ALTERED: Final = "register-altered"
PRICE_MISMATCH: Final = "price-mismatch"
COUNTER_MISMATCH: Final = "counter-mismatch"
#: The causes, in the order differences are listed.
CAUSES: Final = (
    LEDGER_CHAIN,
    RECORD_MISSING,
    RECORD_ALTERED,
    UNBILLED,
    INVOICE_ALTERED,
    LINE_ALTERED,
    NOTE_ALTERED,
    REGISTER_ALTERED,
    PRICE_MISMATCH,
    COUNTER_MISMATCH,
)

#: The steps of a reconciliation, as ``progress(done, STEPS)`` counts them.
STEPS: Final = 6
Progress = Callable[[int, int], None]

#: An invoice line's fields as its row and its content name them.
_LINE_FIELDS: Final = (
    ("dataset_id", "dataset"),
    ("purpose", "purpose"),
    ("kind", "kind"),
    ("usage_period", "usage_period"),
    ("terms_version", "terms_version"),
    ("calls", "calls"),
    ("records", "records"),
    ("amount_fen", "amount_fen"),
)
_INVOICE_FIELDS: Final = (
    "licensee_id",
    "period",
    "status",
    "calls",
    "subtotal_fen",
    "vat_rate",
    "vat_fen",
    "total_fen",
)


def _quiet(done: int, total: int) -> None:
    return None


@dataclass
class _Differences:
    """The differences found, up to ``limit`` kept (all counted)."""

    limit: int | None
    kept: list[dict[str, Any]] = field(default_factory=list)
    by_cause: dict[str, int] = field(default_factory=dict)
    seen: set[tuple[str | None, str]] = field(default_factory=set)

    def add(self, call_id: str | None, cause: str, detail: str, **where: Any) -> None:
        mark = (call_id, cause)
        if call_id is not None and mark in self.seen:
            return
        self.seen.add(mark)
        self.by_cause[cause] = self.by_cause.get(cause, 0) + 1
        if self.limit is None or len(self.kept) < self.limit:
            self.kept.append({"call_id": call_id, "cause": cause, "detail": detail, **where})

    @property
    def count(self) -> int:
        return sum(self.by_cause.values())


@dataclass(frozen=True, slots=True)
class Reconciliation:
    period: str
    after_seq: int
    through_seq: int
    ledger: dict[str, Any]
    checked: dict[str, int]
    pending: dict[str, int]
    late_after_close: int
    by_cause: dict[str, int]
    differences: list[dict[str, Any]]
    difference_count: int

    @property
    def clean(self) -> bool:
        return self.difference_count == 0

    @property
    def summary(self) -> str:
        c = self.checked
        if self.clean:
            text = (
                f"period {self.period} reconciles: zero differences. {c['billed_calls']:,} billed calls on "
                f"{c['invoices']:,} invoice(s) ({c['lines']:,} lines) match the verified call record "
                f"(seq up to {self.through_seq:,}), and {c['counters']:,} quota counter(s) agree"
            )
        else:
            causes = ", ".join(f"{n:,} {cause}" for cause, n in self.by_cause.items())
            text = (
                f"period {self.period} does NOT reconcile: {self.difference_count:,} difference(s) ({causes})"
            )
        pending = self.pending["log_records"] + self.pending["in_flight"]
        if pending:
            text += (
                f"; {self.pending['log_records']:,} record(s) still in the call-record log and "
                f"{self.pending['in_flight']:,} call(s) in flight: counted, not yet in the ledger"
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "clean": self.clean,
            "summary": self.summary,
            "after_seq": self.after_seq,
            "through_seq": self.through_seq,
            "ledger": self.ledger,
            "checked": self.checked,
            "pending": self.pending,
            "late_after_close": self.late_after_close,
            "difference_count": self.difference_count,
            "by_cause": self.by_cause,
            "truncated": len(self.differences) < self.difference_count,
            "differences": self.differences,
        }


async def reconcile(
    engine: AsyncEngine,
    client: RedisClient,
    period: Period,
    public_keys: audit.PublicKeys,
    *,
    limit: int | None = None,
    progress: Progress | None = None,
) -> Reconciliation:
    """Reconcile closed ``period`` (see the module docstring). ConflictError
    if it is not closed; QuotaStoreError if the counters cannot be read.
    At most ``limit`` differences are listed (all are counted)."""
    tick = progress or _quiet
    name = period.name
    async with engine.connect() as conn:
        close = (await conn.execute(select(_CLOSES).where(_CLOSES.c.period == name))).first()
        held = await conn.scalar(select(_DRAFTS.c.period).where(_DRAFTS.c.period == name))
    if close is None and held is not None:
        raise ConflictError(
            f"period {name} is closed for review, not issued: its drafts are computed from the call record "
            f"itself; issue it first (pdg billing issue {name})"
        )
    if close is None:
        raise ConflictError(f"period {name} is not closed: close it first (pdg billing close {name})")
    after, through, first = int(close.after_seq), int(close.through_seq), int(close.first_seq)
    async with engine.connect() as conn:
        ids = list((await conn.execute(select(_INVOICES.c.id).where(_INVOICES.c.period == name))).scalars())
    # The period's billed calls: by seq range and invoice, never a join per invoice.
    billed_range = and_(_BILLED.c.seq.between(first, through), _BILLED.c.invoice_id.in_(ids))
    report = await audit.verify(engine, public_keys)
    documents = await register.verify(engine, public_keys)
    tick(1, STEPS)
    found = _Differences(limit)
    async with _snapshot(engine) as conn:
        problem = report.problem
        if problem is not None:
            call_id = await _call_at(conn, problem.seq)
            found.add(
                call_id,
                LEDGER_CHAIN,
                f"the call record fails verification at seq {problem.seq} ({problem.kind}): {problem.reason}",
                seq=problem.seq,
            )
        billed = await _check_billed(conn, found, name, after, billed_range)
        tick(2, STEPS)
        await _check_unbilled(conn, found, name, after, through)
        late = int(
            await conn.scalar(
                select(func.count()).where(billable(), _CALLS.c.period == name, _CALLS.c.seq > through)
            )
            or 0
        )
        tick(3, STEPS)
        issued = {p["document_id"]: p["detail"] for p in documents.problems if p["cause"] == INVOICE_ALTERED}
        invoices, lines = await _check_invoices(conn, found, name, billed_range, issued)
        await _check_notes(conn, found, name, documents.problems)
        tick(4, STEPS)
        await _check_prices(conn, found, name, interleaved=isinstance(client, RedisCluster))
        tick(5, STEPS)
        counted, last_calls = await _ledger_counts(conn, name)
    counters, pending = await _check_counters(client, found, name, counted, last_calls)
    tick(6, STEPS)
    order = {cause: i for i, cause in enumerate(CAUSES)}
    found.kept.sort(key=lambda d: (order[d["cause"]], d.get("seq") or 0, d.get("invoice_id") or ""))
    return Reconciliation(
        period=name,
        after_seq=after,
        through_seq=through,
        ledger=report.as_dict(),
        checked={"billed_calls": billed, "invoices": invoices, "lines": lines, "counters": counters},
        pending=pending,
        late_after_close=late,
        by_cause={cause: found.by_cause[cause] for cause in CAUSES if cause in found.by_cause},
        differences=found.kept,
        difference_count=found.count,
    )


async def _call_at(conn: AsyncConnection, seq: int) -> str | None:
    """The call at ``seq``: the ledger's, else the one an invoice billed there."""
    found = await conn.scalar(select(_CALLS.c.call_id).where(_CALLS.c.seq == seq))
    if found is None:
        found = await conn.scalar(select(_BILLED.c.call_id).where(_BILLED.c.seq == seq))
    return None if found is None else str(found)


async def _check_billed(
    conn: AsyncConnection, found: _Differences, period: str, after: int, billed_range: Any
) -> int:
    """Every call the period's invoices billed against the ledger's record at its seq."""
    b, i, c = _BILLED, _INVOICES, _CALLS
    joined = b.join(i, i.c.id == b.c.invoice_id).outerjoin(c, c.c.seq == b.c.seq)
    billed = int(await conn.scalar(select(func.count()).select_from(b).where(billed_range)) or 0)
    in_range = or_(c.c.period == period, and_(c.c.period < period, b.c.seq > after))
    odd = or_(
        c.c.seq.is_(None),
        c.c.call_id != b.c.call_id,
        not_(billable(c)),
        c.c.licensee_id != i.c.licensee_id,
        c.c.charge_e4 != b.c.charge_e4,
        not_(in_range),
    )
    rows = await conn.stream(
        select(
            b.c.seq,
            b.c.call_id,
            b.c.invoice_id,
            b.c.charge_e4,
            i.c.licensee_id.label("billed_licensee"),
            c.c.seq.label("ledger_seq"),
            c.c.call_id.label("ledger_call_id"),
            c.c.outcome,
            c.c.pool,
            c.c.licensee_id,
            c.c.charge_e4.label("ledger_charge_e4"),
            c.c.period,
        )
        .select_from(joined)
        .where(billed_range, odd)
        .order_by(b.c.seq)
    )
    async for r in rows:
        where = {"seq": int(r.seq), "invoice_id": r.invoice_id}
        if r.ledger_seq is None:
            found.add(
                r.call_id, RECORD_MISSING, f"billed on {r.invoice_id}; no record at seq {r.seq}", **where
            )
            continue
        said = []
        if r.ledger_call_id != r.call_id:
            said.append(f"the record at seq {r.seq} is call {r.ledger_call_id}")
        if r.outcome != SERVED or r.pool == REPLAY_POOL:
            said.append(f"it is {r.outcome}" + (" (a replay)" if r.pool == REPLAY_POOL else ""))
        if r.licensee_id != r.billed_licensee:
            said.append(f"its licensee is {r.licensee_id}")
        if int(r.ledger_charge_e4) != int(r.charge_e4):
            said.append(f"its charge is {r.ledger_charge_e4} (1/10000 fen), billed {r.charge_e4}")
        if not said:
            said.append(f"its period {r.period} is not one this close covers")
        found.add(r.call_id, RECORD_ALTERED, f"billed on {r.invoice_id}, but " + "; ".join(said), **where)
    return billed


async def _check_unbilled(
    conn: AsyncConnection, found: _Differences, period: str, after: int, through: int
) -> None:
    """Served calls the close covered that no invoice billed (a call billed on
    an invoice that does not exist is not billed)."""
    c, b, i = _CALLS, _BILLED, _INVOICES
    covered = or_(
        and_(c.c.period == period, c.c.seq <= through),
        and_(c.c.period < period, c.c.seq > after, c.c.seq <= through),
    )
    rows = await conn.stream(
        select(c.c.seq, c.c.call_id, c.c.licensee_id, c.c.period)
        .select_from(c.outerjoin(b, b.c.seq == c.c.seq).outerjoin(i, i.c.id == b.c.invoice_id))
        .where(billable(c), covered, i.c.id.is_(None))
        .order_by(c.c.seq)
    )
    async for r in rows:
        found.add(
            r.call_id,
            UNBILLED,
            f"served to {r.licensee_id} in {r.period}, covered by the close of {period}, on no invoice",
            seq=int(r.seq),
        )


async def _check_notes(
    conn: AsyncConnection, found: _Differences, period: str, problems: list[dict[str, Any]]
) -> None:
    """What the billing register found wrong with a note on one of the
    period's invoices or issued in it, and any break in the register itself
    (``billing.register``)."""
    notes = {
        r.id: r.invoice_id
        for r in await conn.execute(
            select(_NOTES.c.id, _NOTES.c.invoice_id)
            .select_from(_NOTES.join(_INVOICES, _INVOICES.c.id == _NOTES.c.invoice_id))
            .where(or_(_NOTES.c.period == period, _INVOICES.c.period == period))
        )
    }
    for problem in problems:
        if problem["cause"] == NOTE_ALTERED and problem["document_id"] in notes:
            found.add(
                None,
                NOTE_ALTERED,
                f"note {problem['number']} ({problem['document_id']}): {problem['detail']}",
                invoice_id=notes[problem["document_id"]],
            )
        elif problem["cause"] == REGISTER_ALTERED:
            found.add(None, REGISTER_ALTERED, f"billing register entry {problem['seq']}: {problem['detail']}")


async def _check_invoices(
    conn: AsyncConnection, found: _Differences, period: str, billed_range: Any, issued: dict[str, str]
) -> tuple[int, int]:
    """Each invoice's content against its hash and its rows, and against
    what the billing register signed at its issue (``issued``: what the
    register found wrong, by invoice id); the calls of what differs."""
    invoices = (await conn.execute(select(_INVOICES).where(_INVOICES.c.period == period))).all()
    line_rows: dict[str, dict[int, Any]] = {}
    for r in await conn.execute(
        select(_LINES)
        .select_from(_LINES.join(_INVOICES, _INVOICES.c.id == _LINES.c.invoice_id))
        .where(_INVOICES.c.period == period)
    ):
        line_rows.setdefault(r.invoice_id, {})[int(r.line_no)] = r
    lines = 0
    for inv in sorted(invoices, key=lambda r: r.id):
        try:
            content: dict[str, Any] = orjson.loads(inv.content)
        except orjson.JSONDecodeError:
            content = {}
        said = _invoice_said(inv, content)
        if not said and inv.id in issued:
            said = f"is not what was issued ({issued[inv.id]})"
        if said:
            for call_id, seq in await _calls_of(conn, billed_range, inv.id):
                found.add(
                    call_id, INVOICE_ALTERED, f"billed on {inv.id}, which {said}", seq=seq, invoice_id=inv.id
                )
            continue
        rows = line_rows.get(inv.id, {})
        numbers = set()
        for line in content.get("lines", []):
            lines += 1
            number = int(line["line_no"])
            numbers.add(number)
            row = rows.get(number)
            line_said = _line_said(row, line)
            if line_said:
                for call_id, seq in await _calls_of(conn, billed_range, inv.id, line):
                    found.add(
                        call_id,
                        LINE_ALTERED,
                        f"billed on line {number} of {inv.id}, whose row {line_said}",
                        seq=seq,
                        invoice_id=inv.id,
                        line_no=number,
                    )
        for number in sorted(rows.keys() - numbers):
            found.add(
                None,
                LINE_ALTERED,
                f"{inv.id} has a line row {number} its content does not hold",
                invoice_id=inv.id,
                line_no=number,
            )
    return len(invoices), lines


def _invoice_said(row: Any, content: dict[str, Any]) -> str:
    if not content or hashlib.sha256(row.content.encode()).hexdigest() != row.content_hash:
        return "no longer hashes to its content_hash"
    wrong = [name for name in _INVOICE_FIELDS if str(getattr(row, name)) != str(content.get(name))]
    if row.id != content.get("id"):
        wrong.insert(0, "id")
    return f"row disagrees with its content in {', '.join(wrong)}" if wrong else ""


def _line_said(row: Any, line: dict[str, Any]) -> str:
    if row is None:
        return "is missing"
    wrong = [column for column, key in _LINE_FIELDS if getattr(row, column) != line.get(key)]
    split = line["split"]
    wrong += [
        part
        for part in ("provider_fen", "operator_fen", "public_fund_fen")
        if getattr(row, part) != split[part]
    ]
    if int(row.charge_e4) != fen_to_e4(line["charge_fen"]):
        wrong.append("charge_e4")
    if not wrong:
        return ""
    shown = ", ".join(wrong)
    first = wrong[0]
    key = dict(_LINE_FIELDS).get(first)
    if key is not None:
        shown += f" ({first} {getattr(row, first)}, the content says {line.get(key)})"
    return f"disagrees with the invoice's content in {shown}"


async def _calls_of(
    conn: AsyncConnection, billed_range: Any, invoice: str, line: dict[str, Any] | None = None
) -> list[tuple[str, int]]:
    """The calls an invoice (or one of its content's lines) billed, by seq."""
    b, c = _BILLED, _CALLS
    query = select(b.c.call_id, b.c.seq).where(b.c.invoice_id == invoice, billed_range).order_by(b.c.seq)
    if line is not None:
        query = query.join(c, c.c.seq == b.c.seq).where(
            c.c.dataset_id == line["dataset"],
            c.c.purpose == line["purpose"],
            c.c.period == line["usage_period"],
        )
        if line.get("terms_version") is not None:
            query = query.where(func.coalesce(c.c.terms_version, 1) == line["terms_version"])
    return [(r.call_id, int(r.seq)) for r in await conn.execute(query)]


# -- the prices ----------------------------------------------------------------------

#: A version of a dataset's terms as pricing reads it: per-call price, per-record
#: price, tiers as ``(up_to or None, per-call price)`` (all 1/10000 fen).
Pricing = tuple[int, int, tuple[tuple[int | None, int], ...]]


def price_at(pricing: Pricing, position: int) -> int:
    """The per-call price of the ``position``-th paid call of a period, as
    ``metering/lua/finish.lua`` takes it: the first tier whose bound is not
    passed (no bound: any position), else the per-call price."""
    per_call, _per_record, tiers = pricing
    for up_to, price in tiers:
        if up_to is None or position <= up_to:
            return price
    return per_call


async def _pricings(conn: AsyncConnection) -> dict[tuple[str, int], Pricing]:
    rows = await conn.execute(
        select(
            _TERMS.c.dataset_id,
            _TERMS.c.version,
            _TERMS.c.per_call_e4,
            _TERMS.c.per_record_e4,
            _TERMS.c.tiers,
        )
    )
    return {
        (r.dataset_id, int(r.version)): (
            int(r.per_call_e4),
            int(r.per_record_e4),
            tuple((t["up_to"], int(t["per_call_e4"])) for t in r.tiers),
        )
        for r in rows
    }


async def _check_prices(
    conn: AsyncConnection, found: _Differences, period: str, *, interleaved: bool
) -> None:
    """Re-price every billed call of ``period`` from the terms version its
    record names (see ``price-mismatch`` in the module docstring)."""
    pricings = await _pricings(conn)
    c = _CALLS
    rows = await conn.stream(
        select(
            c.c.seq,
            c.c.call_id,
            c.c.licence_id,
            c.c.dataset_id,
            c.c.pool,
            c.c.terms_version,
            c.c.records,
            c.c.charge_e4,
        )
        .where(billable(), c.c.period == period)
        .order_by(c.c.seq)
        .execution_options(yield_per=10_000)
    )
    positions: dict[tuple[str, str], int] = {}
    #: Interleaved: per licence, dataset and version, the prices the calls'
    #: positions give and the calls (seq, id, base charge).
    expected: dict[tuple[str, str, int], list[int]] = {}
    charged: dict[tuple[str, str, int], list[tuple[int, str, int]]] = {}
    async for seq, call_id, licence, dataset, pool, version, records, charge in rows:
        seq, charge, version = int(seq), int(charge), int(version or 1)
        if pool == "free":
            if charge:
                found.add(call_id, PRICE_MISMATCH, f"a free call charged {charge:,} (1/10000 fen)", seq=seq)
            continue
        if pool not in ("prepaid", "credit"):
            continue
        pricing = pricings.get((dataset, version))
        key = (licence, dataset)
        positions[key] = position = positions.get(key, 0) + 1
        if pricing is None:
            found.add(
                call_id,
                PRICE_MISMATCH,
                f"names terms version {version} of dataset {dataset}, which it never had",
                seq=seq,
            )
            continue
        base = charge - pricing[1] * int(records)
        price = price_at(pricing, position)
        if interleaved:
            expected.setdefault((licence, dataset, version), []).append(price)
            charged.setdefault((licence, dataset, version), []).append((seq, call_id, base))
        elif base != price:
            found.add(
                call_id,
                PRICE_MISMATCH,
                f"charged {charge:,} (1/10000 fen); paid call {position} of licence {licence} on {dataset} "
                f"in {period} under terms version {version} costs {price + pricing[1] * int(records):,}",
                seq=seq,
            )
    for group, prices in expected.items():
        left: dict[int, int] = {}
        for price in prices:
            left[price] = left.get(price, 0) + 1
        for seq, call_id, base in charged[group]:
            if left.get(base, 0) > 0:
                left[base] -= 1
                continue
            licence, dataset, version = group
            found.add(
                call_id,
                PRICE_MISMATCH,
                f"its charge less its records' ({base:,} of 1/10000 fen) is not among the tier prices of "
                f"the paid calls of licence {licence} on {dataset} in {period} under terms version {version}",
                seq=seq,
            )


# -- the quota counters ----------------------------------------------------------------

_COUNTER = re.compile(
    r"^pdg:\{(?P<licence>[^}]+)\}:(?P<kind>free|paidcalls):(?P<dataset>[^:]+):(?P<period>\d{4}-\d{2})$"
)
_CREDIT = re.compile(r"^pdg:\{(?P<licence>[^}]+)\}:credit:(?P<period>\d{4}-\d{2})$")

#: A counter: (kind, licence, dataset or "" for credit).
Counter = tuple[str, str, str]


async def _ledger_counts(conn: AsyncConnection, period: str) -> tuple[dict[Counter, int], dict[Counter, str]]:
    """What each counter of ``period`` should read, by the ledger (every served
    call of the period, whenever it landed), and the last call (by seq) it holds
    for each."""
    c = _CALLS
    counts: dict[Counter, int] = {}
    last: dict[Counter, int] = {}

    def add(key: Counter, amount: int, seq: int) -> None:
        counts[key] = counts.get(key, 0) + amount
        last[key] = max(last.get(key, 0), seq)

    rows = await conn.execute(
        select(
            c.c.licence_id,
            c.c.dataset_id,
            c.c.pool,
            func.count(),
            sql_cast(func.sum(c.c.charge_e4), BigInteger),
            func.max(c.c.seq),
        )
        .where(billable(), c.c.period == period, c.c.pool.in_(("free", "prepaid", "credit")))
        .group_by(c.c.licence_id, c.c.dataset_id, c.c.pool)
    )
    for licence, dataset, pool, calls, charge, seq in rows:
        if pool == "free":
            add(("free", licence, dataset), int(calls), int(seq))
            continue
        add(("paidcalls", licence, dataset), int(calls), int(seq))
        if pool == "credit":
            add(("credit", licence, ""), int(charge or 0), int(seq))
    ids: dict[int, str] = {}
    seqs = sorted(set(last.values()))
    for start in range(0, len(seqs), 1000):
        chunk = seqs[start : start + 1000]
        for seq, call_id in await conn.execute(select(c.c.seq, c.c.call_id).where(c.c.seq.in_(chunk))):
            ids[int(seq)] = call_id
    return counts, {key: ids[seq] for key, seq in last.items()}


def _counter_key(counter: Counter, period: str) -> str:
    kind, licence, dataset = counter
    prefix = LicenceKeys(licence).prefix
    return f"{prefix}:credit:{period}" if kind == "credit" else f"{prefix}:{kind}:{dataset}:{period}"


async def _check_counters(
    client: RedisClient,
    found: _Differences,
    period: str,
    counted: dict[Counter, int],
    last_calls: dict[Counter, str],
) -> tuple[int, dict[str, int]]:
    try:
        stored = await _read_counters(client, period)
        in_flight = await _in_flight(client, {licence for _kind, licence, _ds in {*counted, *stored}})
        log_records = int(await client.xlen(LOG))
    except (RedisError, OSError) as exc:
        raise QuotaStoreError(f"the quota counters cannot be read: {exc}") from exc
    for counter in sorted({*counted, *stored}):
        expected, actual = counted.get(counter, 0), stored.get(counter, 0)
        if expected == actual:
            continue
        kind, licence, dataset = counter
        what = {
            "free": f"free calls of licence {licence} on {dataset}",
            "paidcalls": f"paid calls of licence {licence} on {dataset}",
            "credit": f"credit used by licence {licence} (1/10000 fen)",
        }[kind]
        missing = "" if counter in stored else " (no counter: expired?)"
        found.add(
            last_calls.get(counter),
            COUNTER_MISMATCH,
            f"the counter of {what} in {period} reads {actual:,}{missing}; "
            f"the call record holds {expected:,}",
            counter=_counter_key(counter, period),
            counter_value=actual,
            recorded=expected,
        )
    return len({*counted, *stored}), {"log_records": log_records, "in_flight": in_flight}


async def _read_counters(client: RedisClient, period: str) -> dict[Counter, int]:
    keys: list[tuple[Counter, str]] = []
    for pattern in (
        f"pdg:{{*}}:free:*:{period}",
        f"pdg:{{*}}:paidcalls:*:{period}",
        f"pdg:{{*}}:credit:{period}",
    ):
        async for raw in client.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            m = _COUNTER.match(key)
            if m is not None:
                keys.append(((m["kind"], m["licence"], m["dataset"]), key))
                continue
            m = _CREDIT.match(key)
            if m is not None:
                keys.append((("credit", m["licence"], ""), key))
    values = await _get_many(client, [key for _counter, key in keys])
    return {
        counter: int(value) for (counter, _key), value in zip(keys, values, strict=True) if value is not None
    }


async def _get_many(client: RedisClient, keys: Iterable[str]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    return list(await pipe.execute())


async def _in_flight(client: RedisClient, licences: set[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for licence in sorted(licences):
        pipe.hlen(LicenceKeys(licence).inflight())
    return sum(int(n) for n in await pipe.execute())
