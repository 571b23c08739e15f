"""Receivables: payments against issued invoices, each invoice's status, a
statement of account per licensee, and an ageing report.

**What an invoice owes.** An issued invoice owes its ``total_fen`` (VAT
included), plus the ``total_fen`` of every debit note on it, minus that of
every credit note (:mod:`billing.notes`): ``owed``. Payments recorded
against it are ``paid``; ``balance = owed - paid``. Invoices issued before
numbers and due dates (status ``closed``) count as issued: issued when their
period was closed, due ``billing.payment_terms_days`` after that day. Days
are dates in the billing time zone; a payment's day is the day it was paid
(``paid_on``), a note's the day it was issued.

**Status** (:func:`invoice_status`), of an invoice as of a day, from the
notes issued and the payments paid up to that day:

* ``paid``: nothing is left to pay (``balance <= 0``; below 0 when a credit
  note came after the money, and the licensee is owed the difference);
* ``overdue``: something is left to pay and the day is after ``due_at``
  (payment is due by the end of ``due_at``);
* ``partially-paid``: something was paid, something is left, not yet overdue;
* ``issued``: nothing paid yet, not yet overdue.

A draft (a period closed for review, not yet issued) has status ``draft``
and takes no payment.

**A payment** (:func:`record_payment`) is a positive whole number of fen,
paid on a day from the invoice's issue day up to today, never more than the
balance: what is paid never exceeds what is owed when it is recorded.
Payments of an invoice are numbered 1, 2, ... with the number unique per
invoice, so each is checked against every payment before it: two recorded at
once cannot both pass on the same earlier total (the second's insert fails,
and it is checked again with the first counted). Each payment writes an
admin-log entry (``payment.record``) in its own transaction. Payments are
append-only; a wrong one is undone by a credit or debit note, not an edit.

**A statement** (:func:`statement`) lists a licensee's invoices (+ total),
debit notes (+ total), credit notes (- total) and payments (- amount) in day
order, each with the running balance: the opening balance (everything dated
before the first month), the entries of the months covered, the closing
balance (``balance_fen``), and each invoice's status as of the statement's
last day (or today, if earlier). Its shape is what
:func:`billing.pdf.statement_pdf` prints.

**Ageing** (:func:`ageing`) is the open balance of every invoice as of a day,
per licensee, in buckets of days past due: ``current`` (not yet due),
1-30, 31-60, 61-90 and over 90 days, with the totals of each bucket. A
negative balance (money owed back) is listed apart, as ``credit_fen``.

Money is integer fen throughout; every figure is a sum of the documents'
own integers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import Table, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.models import BillingCloseRow, BillingDraftRow, BillingNoteRow, InvoiceRow, PaymentRow
from core.errors import ConflictError, NotFoundError, ValidationFailedError
from ledger import admin_log
from ledger.chain import rfc3339
from licensing.models import LicenseeRow
from metering.periods import Period, PeriodError, parse_period, period_of

_PAYMENTS = cast(Table, PaymentRow.__table__)
_INVOICES = cast(Table, InvoiceRow.__table__)
_NOTES = cast(Table, BillingNoteRow.__table__)
_CLOSES = cast(Table, BillingCloseRow.__table__)
_DRAFTS = cast(Table, BillingDraftRow.__table__)
_LICENSEES = cast(Table, LicenseeRow.__table__)

STATEMENT_FORMAT: Final = "pdg.statement.v1"
AGEING_FORMAT: Final = "pdg.ageing.v1"

DRAFT: Final = "draft"
ISSUED: Final = "issued"
PARTIALLY_PAID: Final = "partially-paid"
PAID: Final = "paid"
OVERDUE: Final = "overdue"
STATUSES: Final = (ISSUED, PARTIALLY_PAID, PAID, OVERDUE)

#: Statement entry kinds, in the order they are listed within one day.
INVOICE: Final = "invoice"
DEBIT_NOTE: Final = "debit-note"
CREDIT_NOTE: Final = "credit-note"
PAYMENT: Final = "payment"
_ENTRY_ORDER: Final = {INVOICE: 0, DEBIT_NOTE: 1, CREDIT_NOTE: 2, PAYMENT: 3}

#: Ageing buckets: name, the fen field that sums it, and its last day past due.
BUCKETS: Final = (
    ("current", "current_fen", 0),
    ("1-30", "days_1_30_fen", 30),
    ("31-60", "days_31_60_fen", 60),
    ("61-90", "days_61_90_fen", 90),
    ("over-90", "over_90_fen", None),
)
_BUCKET_FIELDS: Final = tuple(field for _, field, _ in BUCKETS)
#: The ageing's name for an invoice the licensee paid more than it owes.
CREDIT: Final = "credit"

REFERENCE_MAX: Final = 200
#: Tries when other payments of the same invoice keep taking the next number.
_ATTEMPTS: Final = 8
_DAY: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# -- the pure core: no I/O, no clock --------------------------------------------------


def parse_day(value: Any, field: str) -> date:
    """A ``date``, or ``YYYY-MM-DD`` text (the CLI's ``--date``, ``--as-of``);
    ValidationFailedError naming ``field`` otherwise."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _DAY.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ValidationFailedError(field, f"a day is YYYY-MM-DD, not {str(value)[:40]!r}")


def _moment(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def issue_day(invoice: Mapping[str, Any], tz: ZoneInfo) -> date:
    """The day ``invoice`` was issued in ``tz``: of ``issued_at``, or for an
    invoice issued before issue times, of ``closed_at``."""
    return _moment(invoice.get("issued_at") or invoice["closed_at"]).astimezone(tz).date()


def due_day(invoice: Mapping[str, Any], tz: ZoneInfo, payment_terms_days: int) -> date:
    """``invoice``'s ``due_at``; for an invoice issued before due dates, its
    issue day plus ``payment_terms_days``."""
    if invoice.get("due_at"):
        return date.fromisoformat(str(invoice["due_at"]))
    return issue_day(invoice, tz) + timedelta(days=payment_terms_days)


def invoice_balance(
    invoice: Mapping[str, Any], notes: Iterable[Mapping[str, Any]], payments: Iterable[Mapping[str, Any]]
) -> dict[str, int]:
    """What ``invoice`` owes with ``notes`` (``kind``, ``total_fen``) and what
    is left after ``payments`` (``amount_fen``), counting every one given."""
    debited = credited = 0
    for note in notes:
        if note["kind"] == "debit":
            debited += int(note["total_fen"])
        else:
            credited += int(note["total_fen"])
    total = int(invoice["total_fen"])
    owed = total + debited - credited
    paid = sum(int(payment["amount_fen"]) for payment in payments)
    return {
        "total_fen": total,
        "debited_fen": debited,
        "credited_fen": credited,
        "owed_fen": owed,
        "paid_fen": paid,
        "balance_fen": owed - paid,
    }


def invoice_status(
    invoice: Mapping[str, Any],
    notes: Iterable[Mapping[str, Any]],
    payments: Iterable[Mapping[str, Any]],
    today: date,
) -> str:
    """``invoice``'s status on ``today`` (see the module docstring), counting
    every note and payment given: pass those of that day or before.
    ``invoice`` carries ``total_fen`` and ``due_at`` (:func:`due_day` gives
    an old invoice its due date); a draft is ``draft``."""
    if invoice.get("status") == DRAFT:
        return DRAFT
    if not invoice.get("due_at"):
        raise ValueError(f"invoice {invoice.get('id')} has no due_at: give it due_day()")
    balance = invoice_balance(invoice, notes, payments)
    if balance["balance_fen"] <= 0:
        return PAID
    if today > date.fromisoformat(str(invoice["due_at"])):
        return OVERDUE
    return PARTIALLY_PAID if balance["paid_fen"] > 0 else ISSUED


def bucket_of(days_past_due: int) -> str:
    """The ageing bucket of an open balance ``days_past_due`` days after its due day."""
    for name, _, last in BUCKETS:
        if last is None or days_past_due <= last:
            return name
    raise AssertionError("the last bucket is open-ended")


def payment_id(invoice_id: str, number: int) -> str:
    """``pay-`` and the invoice id's period and licensee, then the payment's number."""
    return f"pay-{invoice_id.removeprefix('inv-')}-{number}"


def _check(amount_fen: Any, paid_on: Any, reference: Any) -> tuple[int, date, str]:
    # bool is an int subclass, and no float ever holds money.
    if amount_fen.__class__ is not int or amount_fen <= 0:
        raise ValidationFailedError("amount_fen", "a payment is a whole number of fen above 0")
    day = parse_day(paid_on, "paid_on")
    text = reference.strip() if isinstance(reference, str) else None
    if text is None or len(text) > REFERENCE_MAX or not text.isprintable():
        raise ValidationFailedError(
            "reference", f"a reference is printable text, {REFERENCE_MAX} characters at most"
        )
    return int(amount_fen), day, text


# -- reading the books -----------------------------------------------------------------


def _day_end(day: date, tz: ZoneInfo) -> datetime:
    """The first instant after ``day`` in ``tz``, in UTC."""
    following = day + timedelta(days=1)
    return datetime(following.year, following.month, following.day, tzinfo=tz).astimezone(UTC)


def _receivable(row: Any, tz: ZoneInfo, payment_terms_days: int) -> dict[str, Any]:
    """An invoice row as this module counts it, with its issue and due days."""
    issued = row.issued_at or row.closed_at
    invoice = {
        "id": row.id,
        "licensee_id": row.licensee_id,
        "period": row.period,
        "status": row.status,
        "number": row.number,
        "total_fen": int(row.total_fen),
        "issued_at": rfc3339(issued),
        "closed_at": rfc3339(row.closed_at),
        "due_at": row.due_at,
    }
    invoice["issued_on"] = issue_day(invoice, tz).isoformat()
    invoice["due_at"] = due_day(invoice, tz, payment_terms_days).isoformat()
    return invoice


def _invoice_query(*where: Any) -> Any:
    c = _INVOICES.c
    columns = (
        c.id,
        c.licensee_id,
        c.period,
        c.status,
        c.number,
        c.total_fen,
        c.closed_at,
        c.issued_at,
        c.due_at,
    )
    return select(*columns).where(*where)


def _issued_before(end: datetime) -> Any:
    return func.coalesce(_INVOICES.c.issued_at, _INVOICES.c.closed_at) < end


async def _notes_of(conn: AsyncConnection, invoices: Any, *where: Any) -> dict[str, list[dict[str, Any]]]:
    """The notes on the invoices ``invoices`` (a query of their ids) selects, by invoice."""
    c = _NOTES.c
    rows = await conn.execute(
        select(c.id, c.invoice_id, c.kind, c.number, c.total_fen, c.issued_at)
        .where(c.invoice_id.in_(invoices), *where)
        .order_by(c.invoice_id, c.note_no)
    )
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        found[r.invoice_id].append(
            {
                "id": r.id,
                "invoice_id": r.invoice_id,
                "kind": r.kind,
                "number": r.number,
                "total_fen": int(r.total_fen),
                "issued_at": rfc3339(r.issued_at),
            }
        )
    return found


def _payment(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "payment_no": int(row.payment_no),
        "invoice_id": row.invoice_id,
        "invoice_number": row.number,
        "licensee_id": row.licensee_id,
        "amount_fen": int(row.amount_fen),
        "paid_on": row.paid_on.isoformat(),
        "received_at": rfc3339(row.received_at),
        "reference": row.reference,
        "recorded_by": row.recorded_by,
    }


async def _payments_of(conn: AsyncConnection, invoices: Any, *where: Any) -> dict[str, list[dict[str, Any]]]:
    """The payments of the invoices ``invoices`` (a query of their ids) selects, by invoice and number."""
    query = (
        select(_PAYMENTS, _INVOICES.c.number, _INVOICES.c.licensee_id)
        .join(_INVOICES, _INVOICES.c.id == _PAYMENTS.c.invoice_id)
        .where(_PAYMENTS.c.invoice_id.in_(invoices), *where)
        .order_by(_PAYMENTS.c.invoice_id, _PAYMENTS.c.payment_no)
    )
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in await conn.execute(query):
        found[row.invoice_id].append(_payment(row))
    return found


async def _issued_invoice(
    conn: AsyncConnection, invoice_id: str, tz: ZoneInfo, payment_terms_days: int
) -> dict[str, Any]:
    """The issued invoice ``invoice_id``; ConflictError for a draft (an id of
    the period closed for review, not yet issued), NotFoundError otherwise."""
    row = (await conn.execute(_invoice_query(_INVOICES.c.id == invoice_id))).first()
    if row is not None:
        return _receivable(row, tz, payment_terms_days)
    period = invoice_id[4:11] if invoice_id.startswith("inv-") else ""
    held = await conn.scalar(
        select(_DRAFTS.c.period).where(
            _DRAFTS.c.period == period, _DRAFTS.c.period.not_in(select(_CLOSES.c.period))
        )
    )
    if held is not None:
        raise ConflictError(
            f"{invoice_id} is a draft of {period}, closed for review and not issued: "
            "payments are recorded against issued invoices"
        )
    raise NotFoundError(f"no invoice {invoice_id}")


async def _licensee(conn: AsyncConnection, licensee_id: str) -> dict[str, str] | None:
    row = (
        await conn.execute(
            select(_LICENSEES.c.id, _LICENSEES.c.name, _LICENSEES.c.credit_code).where(
                _LICENSEES.c.id == licensee_id
            )
        )
    ).first()
    return None if row is None else {"id": row.id, "name": row.name, "credit_code": row.credit_code}


# -- payments ------------------------------------------------------------------------


async def record_payment(
    engine: AsyncEngine,
    invoice_id: str,
    *,
    amount_fen: int,
    paid_on: date | str,
    reference: str,
    recorded_by: str,
    now: datetime,
    tz: ZoneInfo,
    payment_terms_days: int,
) -> dict[str, Any]:
    """Record a payment of ``amount_fen`` against ``invoice_id`` (see the
    module docstring) and return it, with ``invoice_after``: what the invoice
    owes, what is paid and left, and its status on ``now``'s day.

    ValidationFailedError for a bad amount, day or reference, or a day after
    ``now``'s; NotFoundError for no such invoice; ConflictError for a draft,
    a day before the invoice was issued, or more than its balance."""
    amount, day, text = _check(amount_fen, paid_on, reference)
    today = now.astimezone(tz).date()
    if day > today:
        raise ValidationFailedError(
            "paid_on", f"{day} is after today ({today}): record money once it is paid"
        )
    for _ in range(_ATTEMPTS):
        try:
            async with engine.begin() as conn:
                return await _record(
                    conn, invoice_id, amount, day, text, recorded_by, now, today, tz, payment_terms_days
                )
        except IntegrityError:
            continue  # another payment took this number: check again with it counted
    raise ConflictError(f"other payments of {invoice_id} are being recorded: try again")


async def _record(
    conn: AsyncConnection,
    invoice_id: str,
    amount: int,
    day: date,
    reference: str,
    recorded_by: str,
    now: datetime,
    today: date,
    tz: ZoneInfo,
    payment_terms_days: int,
) -> dict[str, Any]:
    invoice = await _issued_invoice(conn, invoice_id, tz, payment_terms_days)
    if day.isoformat() < invoice["issued_on"]:
        raise ConflictError(
            f"paid_on {day} is before {invoice_id} was issued ({invoice['issued_on']}): "
            "a payment is against an issued invoice"
        )
    ids = select(_INVOICES.c.id).where(_INVOICES.c.id == invoice_id)
    notes = (await _notes_of(conn, ids))[invoice_id]
    earlier = (await _payments_of(conn, ids))[invoice_id]
    balance = invoice_balance(invoice, notes, earlier)
    if amount > balance["balance_fen"]:
        raise ConflictError(
            f"a payment of {amount} fen exceeds what {invoice_id} still owes: {balance['owed_fen']} fen "
            f"owed ({balance['total_fen']} invoiced, {balance['debited_fen']} debited, "
            f"{balance['credited_fen']} credited), {balance['paid_fen']} paid, so at most "
            f"{max(balance['balance_fen'], 0)} fen can be paid",
            balance_fen=balance["balance_fen"],
        )
    number = (earlier[-1]["payment_no"] if earlier else 0) + 1
    payment = {
        "id": payment_id(invoice_id, number),
        "payment_no": number,
        "invoice_id": invoice_id,
        "invoice_number": invoice["number"],
        "licensee_id": invoice["licensee_id"],
        "amount_fen": amount,
        "paid_on": day.isoformat(),
        "received_at": rfc3339(now),
        "reference": reference,
        "recorded_by": recorded_by[:64],
    }
    await conn.execute(
        insert(_PAYMENTS).values(
            id=payment["id"],
            invoice_id=invoice_id,
            payment_no=number,
            amount_fen=amount,
            paid_on=day,
            received_at=now,
            reference=reference,
            recorded_by=payment["recorded_by"],
        )
    )
    after = invoice_balance(invoice, notes, [*earlier, payment])
    # Its status counts what is known on today's day: the notes issued by then.
    known = [n for n in notes if _moment(n["issued_at"]) < _day_end(today, tz)]
    paid = [p for p in (*earlier, payment) if p["paid_on"] <= today.isoformat()]
    payment["invoice_after"] = {
        "owed_fen": after["owed_fen"],
        "paid_fen": after["paid_fen"],
        "balance_fen": after["balance_fen"],
        "status": invoice_status(invoice, known, paid, today),
    }
    await admin_log.record(conn, "payment.record", payment["id"], after=payment)
    return payment


async def list_payments(engine: AsyncEngine, invoice_id: str) -> list[dict[str, Any]]:
    """The payments recorded against ``invoice_id``, by number (none for an unknown invoice)."""
    async with engine.connect() as conn:
        ids = select(_INVOICES.c.id).where(_INVOICES.c.id == invoice_id)
        return (await _payments_of(conn, ids)).get(invoice_id, [])


async def invoice_account(
    engine: AsyncEngine, invoice_id: str, *, today: date, tz: ZoneInfo, payment_terms_days: int
) -> dict[str, Any]:
    """``invoice_id``'s account on ``today``: its issue and due days, what
    it owes with its notes, what is paid and left, its status, and its
    payments (all of them; the figures count those paid by ``today``).
    NotFoundError / ConflictError (a draft) as :func:`record_payment`."""
    async with engine.connect() as conn:
        invoice = await _issued_invoice(conn, invoice_id, tz, payment_terms_days)
        ids = select(_INVOICES.c.id).where(_INVOICES.c.id == invoice_id)
        notes = (await _notes_of(conn, ids, _NOTES.c.issued_at < _day_end(today, tz)))[invoice_id]
        payments = (await _payments_of(conn, ids))[invoice_id]
    counted = [p for p in payments if p["paid_on"] <= today.isoformat()]
    return {
        "invoice_id": invoice_id,
        "number": invoice["number"],
        "licensee_id": invoice["licensee_id"],
        "period": invoice["period"],
        "issued_on": invoice["issued_on"],
        "due_at": invoice["due_at"],
        "as_of": today.isoformat(),
        **invoice_balance(invoice, notes, counted),
        "status": invoice_status(invoice, notes, counted, today),
        "payments": payments,
    }


# -- statement -----------------------------------------------------------------------


def _month(value: str | None, field: str, tz: ZoneInfo) -> Period | None:
    if value is None:
        return None
    try:
        return parse_period(value, tz)
    except PeriodError as exc:
        raise ValidationFailedError(field, str(exc)) from exc


def _first_day(period: Period) -> date:
    return date(period.year, period.month, 1)


def _entries(
    invoices: Sequence[dict[str, Any]],
    notes: Mapping[str, list[dict[str, Any]]],
    payments: Mapping[str, list[dict[str, Any]]],
    tz: ZoneInfo,
) -> list[dict[str, Any]]:
    """Every document and payment as a signed entry, in day order (unnumbered
    old documents go by their id)."""
    entries: list[tuple[tuple[str, int, str, str], dict[str, Any]]] = []

    def add(
        day: str, kind: str, at: str, document: str, number: str | None, amount: int, **more: Any
    ) -> None:
        entry = {"date": day, "kind": kind, "document_id": document, "number": number or document}
        entries.append(((day, _ENTRY_ORDER[kind], at, document), {**entry, "amount_fen": amount, **more}))

    for inv in invoices:
        extra = {"invoice_id": inv["id"], "invoice_number": inv["number"], "reference": None}
        add(inv["issued_on"], INVOICE, inv["issued_at"], inv["id"], inv["number"], inv["total_fen"], **extra)
        for note in notes.get(inv["id"], ()):
            kind = DEBIT_NOTE if note["kind"] == "debit" else CREDIT_NOTE
            sign = 1 if kind == DEBIT_NOTE else -1
            day = _moment(note["issued_at"]).astimezone(tz).date().isoformat()
            add(day, kind, note["issued_at"], note["id"], note["number"], sign * note["total_fen"], **extra)
        for pay in payments.get(inv["id"], ()):
            more = {**extra, "reference": pay["reference"]}
            add(pay["paid_on"], PAYMENT, pay["received_at"], pay["id"], None, -pay["amount_fen"], **more)
    return [entry for _, entry in sorted(entries, key=lambda pair: pair[0])]


async def statement(
    engine: AsyncEngine,
    licensee_id: str,
    *,
    from_period: str | None = None,
    to_period: str | None = None,
    now: datetime,
    tz: ZoneInfo,
    payment_terms_days: int,
) -> dict[str, Any]:
    """``licensee_id``'s statement of account for the months ``from_period``
    to ``to_period`` (``YYYY-MM``; by default from its first entry, to
    ``now``'s month): see the module docstring. Entries are dated in ``tz``;
    statuses are as of the last day covered, or ``now``'s day if earlier.
    NotFoundError for an unknown licensee; ValidationFailedError for a bad
    month, or ``from`` after ``to``."""
    start = _month(from_period, "from", tz)
    end = _month(to_period, "to", tz) or period_of(now, tz)
    if start is not None and start.name > end.name:
        raise ValidationFailedError("from", f"{start.name} is after {end.name}")
    last_day = _first_day(end.next()) - timedelta(days=1)
    as_of = min(now.astimezone(tz).date(), last_day)
    through = _day_end(last_day, tz)
    async with engine.connect() as conn:
        licensee = await _licensee(conn, licensee_id)
        if licensee is None:
            raise NotFoundError(f"no licensee {licensee_id}")
        where = (_INVOICES.c.licensee_id == licensee_id, _issued_before(through))
        rows = (await conn.execute(_invoice_query(*where))).all()
        ids = select(_INVOICES.c.id).where(*where)
        notes = await _notes_of(conn, ids, _NOTES.c.issued_at < through)
        payments = await _payments_of(conn, ids, _PAYMENTS.c.paid_on <= last_day)
        newest = (
            await conn.execute(
                select(_INVOICES.c.content)
                .where(*where, _INVOICES.c.number.is_not(None))
                .order_by(_INVOICES.c.issued_at.desc())
                .limit(1)
            )
        ).first()
    invoices = [_receivable(row, tz, payment_terms_days) for row in rows]
    every = _entries(invoices, notes, payments, tz)
    first = _first_day(start) if start is not None else None
    opening = sum(e["amount_fen"] for e in every if first is not None and e["date"] < first.isoformat())
    entries = [e for e in every if first is None or e["date"] >= first.isoformat()]
    balance = opening
    for entry in entries:
        balance += entry["amount_fen"]
        entry["balance_fen"] = balance
    covered = {e["invoice_id"] for e in entries}
    listed = []
    for inv in sorted(invoices, key=lambda inv: (inv["issued_on"], inv["id"])):
        known = [n for n in notes.get(inv["id"], ()) if _moment(n["issued_at"]) < _day_end(as_of, tz)]
        paid = [p for p in payments.get(inv["id"], ()) if p["paid_on"] <= as_of.isoformat()]
        figures = invoice_balance(inv, known, paid)
        if inv["id"] in covered or figures["balance_fen"] != 0:
            listed.append(
                {
                    "id": inv["id"],
                    "number": inv["number"],
                    "period": inv["period"],
                    "issued_on": inv["issued_on"],
                    "due_at": inv["due_at"],
                    **figures,
                    "status": invoice_status(inv, known, paid, as_of),
                }
            )
    document = orjson.loads(newest.content) if newest is not None else {}

    def summed(kind: str) -> int:
        return abs(sum(int(e["amount_fen"]) for e in entries if e["kind"] == kind))

    return {
        "format": STATEMENT_FORMAT,
        "licensee": licensee,
        "seller": document.get("seller"),
        "from": start.name if start is not None else (every[0]["date"][:7] if every else end.name),
        "to": end.name,
        "as_of": as_of.isoformat(),
        "currency": document.get("currency", "CNY"),
        "opening_balance_fen": opening,
        "entries": entries,
        "totals": {
            "invoiced_fen": summed(INVOICE),
            "debited_fen": summed(DEBIT_NOTE),
            "credited_fen": summed(CREDIT_NOTE),
            "paid_fen": summed(PAYMENT),
        },
        # The closing balance (what the PDF prints as such).
        "balance_fen": balance,
        "invoices": listed,
        "generated_at": rfc3339(now),
    }


# -- ageing --------------------------------------------------------------------------


async def ageing(
    engine: AsyncEngine,
    *,
    as_of: date,
    tz: ZoneInfo,
    payment_terms_days: int,
    licensee_id: str | None = None,
) -> dict[str, Any]:
    """Open balances on ``as_of`` (invoices issued, notes issued and payments
    paid by then), per licensee (or of ``licensee_id`` only), in buckets of
    days past due: see the module docstring. Licensees with nothing open are
    left out."""
    through = _day_end(as_of, tz)
    where = [_issued_before(through)]
    if licensee_id is not None:
        where.append(_INVOICES.c.licensee_id == licensee_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(_invoice_query(*where).order_by(_INVOICES.c.id))).all()
        ids = select(_INVOICES.c.id).where(*where)
        notes = await _notes_of(conn, ids, _NOTES.c.issued_at < through)
        payments = await _payments_of(conn, ids, _PAYMENTS.c.paid_on <= as_of)
        open_by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            inv = _receivable(row, tz, payment_terms_days)
            figures = invoice_balance(inv, notes.get(inv["id"], ()), payments.get(inv["id"], ()))
            left = figures["balance_fen"]
            if left == 0:
                continue
            late = (as_of - date.fromisoformat(inv["due_at"])).days
            open_by[inv["licensee_id"]].append(
                {
                    "id": inv["id"],
                    "number": inv["number"],
                    "period": inv["period"],
                    "issued_on": inv["issued_on"],
                    "due_at": inv["due_at"],
                    "days_past_due": max(late, 0),
                    "balance_fen": left,
                    "bucket": bucket_of(late) if left > 0 else CREDIT,
                    "status": invoice_status(
                        inv, notes.get(inv["id"], ()), payments.get(inv["id"], ()), as_of
                    ),
                }
            )
        parties = {}
        if open_by:
            found = await conn.execute(
                select(_LICENSEES.c.id, _LICENSEES.c.name, _LICENSEES.c.credit_code).where(
                    _LICENSEES.c.id.in_(sorted(open_by))
                )
            )
            parties = {r.id: {"id": r.id, "name": r.name, "credit_code": r.credit_code} for r in found}
    fields = (*_BUCKET_FIELDS, "total_fen", "credit_fen")
    totals = dict.fromkeys(fields, 0)
    licensees = []
    for licensee in sorted(open_by):
        sums = dict.fromkeys(fields, 0)
        for inv in open_by[licensee]:
            if inv["bucket"] == CREDIT:
                sums["credit_fen"] += inv["balance_fen"]
                continue
            sums[_field_of(inv["bucket"])] += inv["balance_fen"]
            sums["total_fen"] += inv["balance_fen"]
        for name in fields:
            totals[name] += sums[name]
        party = parties.get(licensee, {"id": licensee, "name": "", "credit_code": ""})
        licensees.append({"licensee": party, **sums, "invoices": open_by[licensee]})
    return {
        "format": AGEING_FORMAT,
        "as_of": as_of.isoformat(),
        "currency": "CNY",
        "licensees": licensees,
        "totals": totals,
    }


def _field_of(bucket: str) -> str:
    return next(field for name, field, _ in BUCKETS if name == bucket)
