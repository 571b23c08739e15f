"""Credit and debit notes: corrections of a closed invoice (``pdg billing
adjust``, ``POST /admin/v1/invoices/{id}/notes``).

A closed invoice's bytes never change; a correction is a note that references
it, issued in a later period (the period current when it is issued, in the
billing time zone), and listed with that period's billing. A **credit note**
lowers what the licensee owes, a **debit note** raises it. A note corrects
the whole invoice or one of its lines (``line_no``).

**Never more than the invoice.** Amounts are positive integers of fen,
before VAT. For the invoice, and for the line when a note names one:

* everything credited never exceeds what was billed plus what was debited
  (the invoice's subtotal, or the line's amount, plus debit notes on it);
* everything debited never exceeds what was billed (a larger correction is a
  new bill, not a correction).

Notes of an invoice are numbered 1, 2, ... with the number unique per
invoice, so each note is checked against every note before it: two issued at
once cannot both pass on the same earlier total (the second's insert fails
and it is checked again, with the first counted).

**VAT and split.** A note's VAT is what the VAT on the running total of its
kind grows by (``vat_of(after) - vat_of(before)`` at the invoice's rate,
half up), so the VAT of all credit notes is exactly the VAT on their sum and
never exceeds the invoice's. An invoice whose lines carry several VAT rates
(``vat_rate`` ``mixed``, its VAT summed per rate: ``vat_groups``) is
corrected line by line: a note on the whole of it is refused (409), and a
line note's VAT is at the line's rate, on the running total of its kind on
the lines of that rate. Its amount is split by largest remainder: a line
note by the line's revenue split, an invoice note in proportion to the
invoice's own split totals (provider, operator, fund) over its billed lines
(not its ``prepaid`` lines, billed at 0 when the calls were bought). A note
on a top-up's invoice is not split, as the top-up was not: its money is
split only as its calls are used (``billing.prepaid``); a refund of unused
prepaid calls is a credit note on the top-up's invoice. Each note is stored as
canonical JSON with its SHA-256, append-only like the invoices.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing import register
from billing.invoices import MIXED, PREPAID, canonical, party_of
from billing.models import BillingNoteRow, InvoiceRow
from billing.register import Issuer
from core.errors import BadRequestError, ConflictError, NotFoundError, ValidationFailedError
from core.money import E4, allocate, vat_of
from ledger import admin_log
from ledger.chain import rfc3339
from licensing.models import LicenseeRow
from metering.periods import period_of

_NOTES = cast(Table, BillingNoteRow.__table__)
_INVOICES = cast(Table, InvoiceRow.__table__)
_LICENSEES = cast(Table, LicenseeRow.__table__)

FORMAT: Final = "pdg.note.v1"
#: Numbered, naming the parties, in the billing register.
FORMAT_V2: Final = "pdg.note.v2"
CREDIT: Final = "credit"
DEBIT: Final = "debit"
KINDS: Final = (CREDIT, DEBIT)
REASON_MAX: Final = 500
#: Tries when other notes of the same invoice keep taking the next number.
_ATTEMPTS: Final = 8


def note_id(kind: str, invoice: str, number: int) -> str:
    """``cn-`` / ``dn-`` and the invoice id's period and licensee, then the note's number."""
    prefix = "cn" if kind == CREDIT else "dn"
    return f"{prefix}-{invoice.removeprefix('inv-')}-{number}"


def _check(kind: str, amount_fen: Any, reason: str, line_no: Any) -> str:
    if kind not in KINDS:
        raise ValidationFailedError("kind", f"a note is a credit or a debit, not {kind!r}")
    if amount_fen.__class__ is not int or amount_fen <= 0:
        raise ValidationFailedError("amount_fen", "a note's amount is a whole number of fen above 0")
    if line_no is not None and (line_no.__class__ is not int or line_no < 1):
        raise ValidationFailedError("line_no", "a line number is a whole number from 1")
    text = reason.strip() if isinstance(reason, str) else ""
    if not text:
        raise ValidationFailedError("reason", "a note needs a reason")
    if len(text) > REASON_MAX or not text.isprintable():
        raise ValidationFailedError("reason", f"a reason is printable text, {REASON_MAX} characters at most")
    return text


async def issue_note(
    engine: AsyncEngine,
    invoice_id: str,
    *,
    kind: str,
    amount_fen: int,
    reason: str,
    issued_by: str,
    now: datetime,
    issuer: Issuer,
    line_no: int | None = None,
) -> dict[str, Any]:
    """Issue a note on ``invoice_id`` (see the module docstring) and return
    it: numbered in its kind's series and signed into the billing register
    by ``issuer``, naming the seller and the buyer.

    NotFoundError for no such invoice; ValidationFailedError for a bad field;
    ConflictError when the note would exceed the invoice (or line), or when
    it is issued in the invoice's own period."""
    text = _check(kind, amount_fen, reason, line_no)
    for _ in range(_ATTEMPTS):
        try:
            async with engine.begin() as conn:
                return await _issue(conn, invoice_id, kind, amount_fen, text, issued_by, now, issuer, line_no)
        except IntegrityError:
            continue  # another note took this number: check again with it counted
    raise ConflictError(f"other notes on {invoice_id} are being issued: try again")


async def _issue(
    conn: AsyncConnection,
    invoice_id: str,
    kind: str,
    amount: int,
    reason: str,
    issued_by: str,
    now: datetime,
    issuer: Issuer,
    line_no: int | None,
) -> dict[str, Any]:
    tz = ZoneInfo(issuer.settings.billing.time_zone)
    row = (await conn.execute(select(_INVOICES).where(_INVOICES.c.id == invoice_id))).first()
    if row is None:
        raise NotFoundError(f"no invoice {invoice_id}")
    invoice = orjson.loads(row.content)
    period = period_of(now, tz).name
    if period <= invoice["period"]:
        raise ConflictError(f"a note on {invoice_id} is issued in a period after {invoice['period']}")
    line = None
    if line_no is not None:
        line = next((ln for ln in invoice["lines"] if ln["line_no"] == line_no), None)
        if line is None:
            raise ValidationFailedError("line_no", f"{invoice_id} has no line {line_no}")
    earlier = (
        await conn.execute(select(_NOTES).where(_NOTES.c.invoice_id == invoice_id).order_by(_NOTES.c.note_no))
    ).all()

    def total(of_kind: str, on_line: bool) -> int:
        return sum(
            int(n.amount_fen) for n in earlier if n.kind == of_kind and (not on_line or n.line_no == line_no)
        )

    scopes = [("invoice", invoice["subtotal_fen"], False)]
    if line is not None:
        scopes.append((f"line {line_no}", line["amount_fen"], True))
    for what, billed, on_line in scopes:
        credited, debited = total(CREDIT, on_line), total(DEBIT, on_line)
        if kind == CREDIT and credited + amount > billed + debited:
            raise ConflictError(
                f"a credit of {amount} fen exceeds {what} of {invoice_id}: it billed {billed} fen, "
                f"{debited} fen debited and {credited} fen credited since, so at most "
                f"{billed + debited - credited} fen can be credited"
            )
        if kind == DEBIT and debited + amount > billed:
            raise ConflictError(
                f"a debit of {amount} fen exceeds {what} of {invoice_id}: it billed {billed} fen and "
                f"{debited} fen are debited already, so at most {billed - debited} fen can be debited"
            )
    mixed = invoice["vat_rate"] == MIXED
    if mixed and line is None:
        raise ConflictError(
            f"{invoice_id} bills lines at several VAT rates: correct it line by line (line_no)"
        )
    rate_text = line.get("vat_rate", invoice["vat_rate"]) if line is not None else invoice["vat_rate"]
    rate = Decimal(rate_text)
    before = total(kind, False)
    if mixed:  # the notes of its kind on lines of the same rate
        same = {ln["line_no"] for ln in invoice["lines"] if ln.get("vat_rate") == rate_text}
        before = sum(int(n.amount_fen) for n in earlier if n.kind == kind and n.line_no in same)
    vat = vat_of(before + amount, rate) - vat_of(before, rate)
    if line is not None:
        shares = line["revenue_split"]
        weights: tuple[int, ...] = tuple(
            int(Decimal(shares[part]) * E4) for part in ("provider", "operator", "public_fund")
        )
    else:
        weights = tuple(
            sum(ln["split"][part] for ln in invoice["lines"] if ln["kind"] != PREPAID)
            for part in ("provider_fen", "operator_fen", "public_fund_fen")
        )
    # A top-up's money is not split until its calls are used: nor is a note on it.
    provider, operator, fund = allocate(amount, weights) if any(weights) else (0, 0, 0)
    number = (int(earlier[-1].note_no) if earlier else 0) + 1
    credited = total(CREDIT, False) + (amount if kind == CREDIT else 0)
    debited = total(DEBIT, False) + (amount if kind == DEBIT else 0)
    note: dict[str, Any] = {
        "format": FORMAT,
        "id": note_id(kind, invoice_id, number),
        "kind": kind,
        "note_no": number,
        "invoice_id": invoice_id,
        "licensee_id": invoice["licensee_id"],
        "invoice_period": invoice["period"],
        "period": period,
        "line_no": line_no,
        "amount_fen": amount,
        "vat_rate": rate_text,
        "vat_fen": vat,
        "total_fen": amount + vat,
        "split": {"provider_fen": provider, "operator_fen": operator, "public_fund_fen": fund},
        "reason": reason,
        "issued_by": issued_by,
        "issued_at": rfc3339(now),
        # The invoice after this note: its subtotal corrected by every note so far.
        "invoice_after": {
            "credited_fen": credited,
            "debited_fen": debited,
            "subtotal_fen": invoice["subtotal_fen"] - credited + debited,
        },
    }
    if line is not None:
        note.update(dataset=line["dataset"], purpose=line["purpose"], dataset_name=line.get("dataset_name"))
    register_kind = register.CREDIT_NOTE if kind == CREDIT else register.DEBIT_NOTE
    numbered = await register.next_number(conn, issuer.settings, register_kind, now)
    note.update(
        format=FORMAT_V2,
        number=numbered.number,
        invoice_number=invoice.get("number"),
        currency=invoice.get("currency", "CNY"),
        seller=party_of(issuer.settings.billing.seller),
        buyer=invoice.get("buyer") or await _buyer(conn, invoice["licensee_id"]),
    )
    content = canonical(note)
    note["content_hash"] = hashlib.sha256(content).hexdigest()
    await register.register(
        conn,
        issuer.signer,
        numbered,
        document_id=note["id"],
        issued_at=now,
        content_hash=note["content_hash"],
    )
    await conn.execute(
        _NOTES.insert().values(
            id=note["id"],
            invoice_id=invoice_id,
            note_no=number,
            kind=kind,
            period=period,
            line_no=line_no,
            amount_fen=amount,
            vat_fen=vat,
            total_fen=amount + vat,
            provider_fen=provider,
            operator_fen=operator,
            public_fund_fen=fund,
            reason=reason,
            issued_by=issued_by[:64],
            issued_at=now,
            content_hash=note["content_hash"],
            content=content.decode(),
            number=numbered.number,
        )
    )
    await admin_log.record(conn, f"note.{kind}", note["id"], after=note)
    return note


async def _buyer(conn: AsyncConnection, licensee_id: str) -> dict[str, str]:
    """The buyer of an invoice issued before invoices named one: the licensee as it is now."""
    row = (await conn.execute(select(_LICENSEES).where(_LICENSEES.c.id == licensee_id))).first()
    return party_of(row)


async def list_notes(
    engine: AsyncEngine,
    *,
    invoice_id: str | None = None,
    period: str | None = None,
    licensee_id: str | None = None,
) -> list[dict[str, Any]]:
    """Notes, by invoice and number: of one invoice, issued in one period, and/or of one licensee."""
    where = []
    if invoice_id is not None:
        where.append(_NOTES.c.invoice_id == invoice_id)
    if period is not None:
        where.append(_NOTES.c.period == period)
    query = select(_NOTES.c.content, _NOTES.c.content_hash).where(*where)
    if licensee_id is not None:
        query = query.join(_INVOICES, _INVOICES.c.id == _NOTES.c.invoice_id).where(
            _INVOICES.c.licensee_id == licensee_id
        )
    async with engine.connect() as conn:
        rows = await conn.execute(query.order_by(_NOTES.c.invoice_id, _NOTES.c.note_no))
        return [{**orjson.loads(r.content), "content_hash": r.content_hash} for r in rows]


def parse_kind(credit: int | None, debit: int | None) -> tuple[str, int]:
    """The CLI's ``--credit FEN`` / ``--debit FEN``: exactly one."""
    if (credit is None) == (debit is None):
        raise BadRequestError("give one of --credit FEN or --debit FEN")
    return (CREDIT, credit) if credit is not None else (DEBIT, cast(int, debit))
