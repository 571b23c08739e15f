"""``pdg billing close|show|adjust|export|reconcile``: finance's commands, over the same
service layer as the admin API (:mod:`billing.invoices`, :mod:`billing.reconcile`).

``close PERIOD`` closes a period that has ended in the billing time zone and
prints its invoices (closing it again prints the same invoices and says they
were already there). It first brings the ledger up to date through the
deployment's Redis (starting the embedded Valkey when it is not running):
what waits in the call-record log is moved, calls of the period still in
flight are waited for; when that cannot be done it exits non-zero with one
line and closes nothing, unless ``--allow-pending``, which closes and lists
what was left (``billing.invoices.close_billing``). ``show PERIOD`` prints a
table of the period's invoices (id, licensee, lines, calls, subtotal, VAT,
total, status) and the notes issued in it, and says so when it has no
invoices; ``show INVOICE_ID`` prints one invoice with its lines; ``--json``
gives the admin API's invoice objects. ``adjust INVOICE_ID --credit|--debit FEN
--reason TEXT [--line N]`` issues a credit or debit note (:mod:`billing.notes`).
``export PERIOD`` writes the period's invoices and notes as CSV, JSON or XLSX
(:mod:`billing.export`). ``reconcile PERIOD`` compares a closed period's invoices,
the verified call record and the quota counters, prints every difference by
call id and cause, and exits 0 only when there are none (1 when there are).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from cli.resources import command_group, emit, migrated_engine, progress_bar
from config.settings import Settings
from core.errors import BadRequestError, NotFoundError

if TYPE_CHECKING:
    from metering.periods import Period

Common = Callable[[argparse.ArgumentParser], None]
_PERIOD = re.compile(r"^\d{4}-\d{2}$")


def _period(settings: Settings, name: str) -> Period:
    from metering.periods import PeriodError, parse_period, zone

    try:
        return parse_period(name, zone(settings.billing.time_zone))
    except PeriodError as exc:
        raise BadRequestError(str(exc)) from exc


def fen(amount: int) -> str:
    """Fen as yuan for people: ``123456`` -> ``1,234.56``."""
    sign, amount = ("-", -amount) if amount < 0 else ("", amount)
    return f"{sign}{amount // 100:,}.{amount % 100:02d}"


def statement(invoice: dict[str, Any]) -> str:
    """One invoice as a readable statement (amounts in yuan)."""
    number = f"no. {invoice['number']}  " if invoice.get("number") else ""
    due = f", due {invoice['due_at']}" if invoice.get("due_at") else ""
    out = [
        f"invoice {number}{invoice['id']}  licensee {invoice['licensee_id']}  period {invoice['period']}  "
        f"({invoice['status']} {invoice['closed_at']}{due})",
        f"  {'#':>3}  {'dataset':<24} {'purpose':<16} {'kind':<13} {'calls':>10} {'records':>12} "
        f"{'amount':>14}   provider / operator / public fund",
    ]
    for line in invoice["lines"]:
        kind = line["kind"] if line["kind"] == "usage" else f"late {line['usage_period']}"
        parts = line["split"]
        out.append(
            f"  {line['line_no']:>3}  {line['dataset']:<24} {line['purpose']:<16} {kind:<13} "
            f"{line['calls']:>10,} {line['records']:>12,} {fen(line['amount_fen']):>14}   "
            f"{fen(parts['provider_fen'])} / {fen(parts['operator_fen'])} / {fen(parts['public_fund_fen'])}"
        )
    vat_pct = f"{(Decimal(invoice['vat_rate']) * 100).normalize():f}"
    out += [
        f"  subtotal {fen(invoice['subtotal_fen']):>14} CNY",
        f"  VAT {vat_pct} % {fen(invoice['vat_fen']):>12} CNY",
        f"  total    {fen(invoice['total_fen']):>14} CNY   content hash {invoice['content_hash']}",
    ]
    return "\n".join(out)


async def billing_close(args: argparse.Namespace, settings: Settings) -> int:
    """``pdg billing close`` (drafts, or ``--issue``) and ``pdg billing issue``."""
    from billing.invoices import close_billing, issue_billing
    from storage.db import utcnow
    from storage.redis import deployment_redis

    period = _period(settings, args.period)
    common: dict[str, Any] = {
        "settings": settings,
        "redis": lambda: deployment_redis(settings),
        "now": utcnow(),
        "allow_pending": args.allow_pending,
    }
    issuing = args.action == "issue"
    async with migrated_engine(settings) as engine:
        with progress_bar(f"{'issuing' if issuing else 'closing'} {period.name}") as progress:
            if issuing:
                closed = await issue_billing(
                    engine, period, expect_drafts=args.drafts_hash, progress=progress, **common
                )
            else:
                closed = await close_billing(engine, period, issue=args.issue, progress=progress, **common)
    emit(args, closed.as_dict(), _closed_text(closed))
    return 0


def _closed_text(closed: Any) -> str:
    total = sum(inv["total_fen"] for inv in closed.invoices)
    count = (
        f"{len(closed.invoices)} invoice(s), {fen(total)} CNY in all (records up to seq {closed.through_seq})"
    )
    if closed.draft:
        head = (
            f"period {closed.period} closed for review: {count} as drafts\n"
            f"  drafts hash {closed.as_dict()['drafts_hash']}\n"
            f"  issue them: pdg billing issue {closed.period} --drafts-hash <that hash>"
        )
    else:
        said = "was already issued" if closed.already_closed else "issued"
        head = f"period {closed.period} {said}: {count}"
    text = [head]
    if closed.pending is not None:
        text.append(pending_text(closed.pending))
    text += [statement(inv) for inv in closed.invoices]
    return "\n\n".join(text)


async def billing_pdf(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from billing.invoices import get_invoice
    from billing.pdf import invoice_pdf
    from ledger.audit.common import atomic_write

    async with migrated_engine(settings) as engine:
        invoice = await get_invoice(engine, args.invoice_id, settings)
    if invoice is None:
        raise NotFoundError(f"no invoice {args.invoice_id}")
    body = invoice_pdf(invoice, lang=args.lang, time_zone=settings.billing.time_zone)
    output = args.output or f"{invoice.get('number') or invoice['id']}.pdf"
    try:
        atomic_write(Path(output), body)
    except OSError as exc:
        raise BadRequestError(f"cannot write {output}: {exc.strerror or exc}") from exc
    emit(
        args,
        {"invoice": invoice["id"], "number": invoice.get("number"), "file": output, "bytes": len(body)},
        f"wrote {output} ({len(body):,} bytes)",
    )
    return 0


def pending_text(pending: dict[str, Any]) -> str:
    """What a close left for the next period, for people."""
    in_log, in_flight = pending["log_records"], pending["in_flight"]
    counts = (
        f"{in_log:,} record(s) in the call-record log, {in_flight:,} call(s) in flight"
        if in_log is not None and in_flight is not None
        else "unknown (the log could not be read)"
    )
    out = [
        f"left for the next period (billed by its close as late usage): {counts}",
        f"  because {pending['reason']}",
    ]
    for call in pending["calls"]:
        outcome = f" {call['outcome']}" if call["outcome"] else ""
        out.append(
            f"  {call['call_id']:<36}  {call['where']:<9} {call['period']}  {call['started_at']}  "
            f"licensee {call['licensee_id']}  {call['dataset_id']} ({call['purpose']}){outcome}"
        )
    if pending["truncated"]:
        out.append("  ... and more (the counts above are whole)")
    return "\n".join(out)


async def billing_show(args: argparse.Namespace, settings: Settings) -> int:
    from billing.invoices import get_invoice
    from billing.notes import list_notes

    async with migrated_engine(settings) as engine:
        if _PERIOD.match(args.what):
            name = _period(settings, args.what).name
            books = await _books(engine, settings, name, args.licensee)
            if args.json:
                # The invoices, as the admin API lists them (notes: billing export --format json).
                emit(args, books["invoices"])
            else:
                emit(args, books, period_table(books))
            return 0
        invoice = await get_invoice(engine, args.what, settings)
        notes = await list_notes(engine, invoice_id=args.what) if invoice is not None else []
    if invoice is None:
        raise NotFoundError(f"no invoice {args.what}")
    text = statement(invoice)
    if notes:
        text += "\n  notes on it:\n" + "\n".join(note_line(n) for n in notes)
    emit(args, invoice, text)
    return 0


async def _books(engine: Any, settings: Settings, period: str, licensee: str | None) -> dict[str, Any]:
    """A period's invoices (its drafts, when it is closed for review) and the
    notes issued in it; NotFoundError when there are neither."""
    from billing.export import period_books
    from billing.invoices import list_invoices

    invoices = await list_invoices(engine, period=period, licensee_id=licensee, settings=settings)
    if invoices and invoices[0]["status"] == "draft":
        from billing.notes import list_notes

        notes = await list_notes(engine, period=period, licensee_id=licensee)
        return {"period": period, "closed": True, "invoices": invoices, "notes": notes}
    return await period_books(engine, period, licensee_id=licensee)


def period_table(books: dict[str, Any]) -> str:
    """A period's invoices as a table (amounts in yuan), then the notes
    issued in it; says so when it has no invoices (only notes)."""
    name, invoices = books["period"], books["invoices"]
    if not invoices:
        why = "it had no billed calls" if books["closed"] else "it is not closed yet"
        out = [f"period {name} has no invoices: {why}"]
    else:
        total = sum(inv["total_fen"] for inv in invoices)
        state = "closed" if books["closed"] else "not closed"
        out = [f"period {name} ({state}): {len(invoices)} invoice(s), {fen(total)} CNY in all"]
        header = ("invoice", "licensee", "lines", "calls", "subtotal", "VAT", "total", "status")
        rows = [
            (
                inv["id"],
                inv["licensee_id"],
                f"{len(inv['lines']):,}",
                f"{inv['calls']:,}",
                fen(inv["subtotal_fen"]),
                fen(inv["vat_fen"]),
                fen(inv["total_fen"]),
                inv["status"],
            )
            for inv in invoices
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            cells = [
                cell.ljust(width) if i in (0, 1, 7) else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            out.append("  " + "  ".join(cells).rstrip())
        out.append("  (amounts in CNY; pdg billing show INVOICE_ID for an invoice's lines)")
    if books["notes"]:
        out.append(f"notes issued in {name}:")
        out += [note_line(n) for n in books["notes"]]
    return "\n".join(out)


def note_line(note: dict[str, Any]) -> str:
    """One note in a line (amounts in yuan; a credit lowers the invoice)."""
    sign = "-" if note["kind"] == "credit" else "+"
    on = f"line {note['line_no']} of " if note["line_no"] is not None else ""
    return (
        f"  {note['id']:<40} {note['kind']:<6} {sign}{fen(note['amount_fen'])} + VAT {fen(note['vat_fen'])} "
        f"= {sign}{fen(note['total_fen'])} CNY on {on}{note['invoice_id']} ({note['period']}): "
        f"{note['reason']}"
    )


async def billing_adjust(args: argparse.Namespace, settings: Settings) -> int:
    from billing.notes import issue_note, parse_kind
    from billing.register import Issuer
    from storage.db import utcnow

    kind, amount = parse_kind(args.credit, args.debit)
    async with migrated_engine(settings) as engine:
        note = await issue_note(
            engine,
            args.invoice_id,
            kind=kind,
            amount_fen=amount,
            reason=args.reason,
            line_no=args.line,
            issued_by="cli",
            now=utcnow(),
            issuer=Issuer.from_settings(settings),
        )
    after = note["invoice_after"]
    emit(
        args,
        note,
        f"{kind} note {note.get('number') or note['id']} issued in {note['period']}:\n{note_line(note)}\n"
        f"  {note['invoice_id']} now stands at {fen(after['subtotal_fen'])} CNY before VAT "
        f"({fen(after['credited_fen'])} credited, {fen(after['debited_fen'])} debited)",
    )
    return 0


async def billing_export(args: argparse.Namespace, settings: Settings) -> int:
    import hashlib
    import sys
    from pathlib import Path

    from billing.export import FORMATS, period_books, render
    from ledger.audit.common import atomic_write

    name = _period(settings, args.period).name
    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else "csv")
    if fmt not in FORMATS:
        raise BadRequestError(f"--format is csv, json or xlsx, not {fmt!r}")
    if fmt == "xlsx" and not args.output:
        raise BadRequestError("an XLSX export needs --output FILE")
    async with migrated_engine(settings) as engine:
        books = await period_books(engine, name, licensee_id=args.licensee)
    data = render(books, fmt)
    if not args.output:
        sys.stdout.buffer.write(data)
        return 0
    path = Path(args.output)
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise BadRequestError(f"cannot write {path}: {exc.strerror or exc}") from exc
    lines = sum(len(inv["lines"]) for inv in books["invoices"])
    sys.stderr.write(
        f"wrote {len(books['invoices'])} invoice(s) ({lines} lines) and {len(books['notes'])} note(s) "
        f"of {name} to {path} ({fmt}, sha256 {hashlib.sha256(data).hexdigest()})\n"
    )
    return 0


def _terms(settings: Settings) -> dict[str, Any]:
    from metering.periods import zone

    return {"tz": zone(settings.billing.time_zone), "payment_terms_days": settings.billing.payment_terms_days}


async def billing_pay(args: argparse.Namespace, settings: Settings) -> int:
    from billing.payments import parse_day, record_payment
    from storage.db import utcnow

    async with migrated_engine(settings) as engine:
        payment = await record_payment(
            engine,
            args.invoice_id,
            amount_fen=args.amount_fen,
            paid_on=parse_day(args.date, "date"),
            reference=args.reference,
            recorded_by="cli",
            now=utcnow(),
            **_terms(settings),
        )
    after = payment["invoice_after"]
    emit(
        args,
        payment,
        f"payment {payment['id']} of {fen(payment['amount_fen'])} CNY on {payment['paid_on']} "
        f"recorded against {payment['invoice_number'] or payment['invoice_id']}: {fen(after['paid_fen'])} of "
        f"{fen(after['owed_fen'])} CNY paid, {fen(after['balance_fen'])} left ({after['status']})",
    )
    return 0


async def billing_statement(args: argparse.Namespace, settings: Settings) -> int:
    from billing.payments import statement
    from storage.db import utcnow

    async with migrated_engine(settings) as engine:
        found = await statement(
            engine,
            args.licensee_id,
            from_period=args.from_month,
            to_period=args.to_month,
            now=utcnow(),
            **_terms(settings),
        )
    if args.pdf:
        from pathlib import Path

        from billing.pdf import statement_pdf
        from ledger.audit.common import atomic_write

        try:
            atomic_write(Path(args.pdf), statement_pdf(found, time_zone=settings.billing.time_zone))
        except OSError as exc:
            raise BadRequestError(f"cannot write {args.pdf}: {exc.strerror or exc}") from exc
    out = [
        f"statement of {found['licensee']['name']} ({found['licensee']['id']}), "
        f"{found['from']} to {found['to']}, as of {found['as_of']}",
        f"  {'':<10} {'opening balance':<42} {fen(found['opening_balance_fen']):>14}",
    ]
    for entry in found["entries"]:
        out.append(
            f"  {entry['date']:<10} {entry['kind']:<12} {entry['number']:<29} {fen(entry['amount_fen']):>14} "
            f"{fen(entry['balance_fen']):>14}"
        )
    out.append(f"  {'':<10} {'closing balance':<42} {fen(found['balance_fen']):>14} CNY")
    emit(args, found, "\n".join(out))
    return 0


async def billing_ageing(args: argparse.Namespace, settings: Settings) -> int:
    from billing.payments import ageing, parse_day
    from storage.db import utcnow

    terms = _terms(settings)
    as_of = parse_day(args.as_of, "as-of") if args.as_of else utcnow().astimezone(terms["tz"]).date()
    async with migrated_engine(settings) as engine:
        found = await ageing(engine, as_of=as_of, **terms)
    rows = [
        {"licensee": row["licensee"]["id"], **{k: v for k, v in row.items() if k.endswith("_fen")}}
        for row in found["licensees"]
    ]
    rows.append({"licensee": "total", **found["totals"]})
    emit(args, found, f"open balances as of {found['as_of']} (days past due)\n" + _report_table(rows))
    return 0


async def billing_report(args: argparse.Namespace, settings: Settings) -> int:
    """``pdg billing summary`` / ``payouts``: a period's report, as a table,
    or as a file (CSV, JSON, XLSX)."""
    import sys
    from pathlib import Path

    from billing import reports
    from ledger.audit.common import atomic_write

    name = _period(settings, args.period).name
    async with migrated_engine(settings) as engine:
        if args.report == "summary":
            report = await reports.period_summary(engine, name)
        else:
            report = await reports.period_payouts(engine, name)
    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else None)
    if fmt is None:
        rows = reports.summary_rows(report) if args.report == "summary" else reports.payout_rows(report)
        emit(args, report, _report_table(rows))
        return 0
    if fmt not in reports.FORMATS:
        raise BadRequestError(f"--format is csv, json or xlsx, not {fmt!r}")
    if fmt == "xlsx" and not args.output:
        raise BadRequestError("an XLSX report needs --output FILE")
    data = reports.render(report, fmt)
    if not args.output:
        sys.stdout.buffer.write(data)
        return 0
    try:
        atomic_write(Path(args.output), data)
    except OSError as exc:
        raise BadRequestError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    sys.stderr.write(f"wrote the {args.report} of {name} to {args.output} ({fmt})\n")
    return 0


def _report_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a table, amounts (``*_fen``) in yuan."""
    if not rows:
        return "(nothing)"
    columns = list(dict.fromkeys(c for row in rows for c, v in row.items() if not isinstance(v, list | dict)))

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if column.endswith("_fen") and isinstance(value, int):
            return fen(value)
        return "" if value is None else str(value)

    header = [c.removesuffix("_fen") for c in columns]
    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in (header, *cells)) for i in range(len(columns))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(r, widths, strict=True)).rstrip()
        for r in (header, *cells)
    )


async def billing_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from billing.reconcile import reconcile
    from cli.audit import _file_keys
    from metering.quota import QuotaStoreError
    from storage.redis import deployment_redis

    period = _period(settings, args.period)
    if args.limit is not None and args.limit < 1:
        raise BadRequestError("--limit must be at least 1")
    keys = _file_keys(settings, args)
    async with (
        migrated_engine(settings) as engine,
        deployment_redis(settings) as client,
    ):
        with progress_bar(f"reconciling {period.name}") as progress:
            try:
                found = await reconcile(engine, client, period, keys, limit=args.limit, progress=progress)
            except QuotaStoreError as exc:
                raise BadRequestError(str(exc)) from exc
    data = found.as_dict()
    emit(args, data, reconciliation_text(data))
    return 0 if found.clean else 1


def reconciliation_text(data: dict[str, Any]) -> str:
    """A reconciliation for people: the verdict, then each difference."""
    out = [data["summary"]]
    ledger = data["ledger"]
    verdict = "OK" if ledger["ok"] else f"FAILED at seq {ledger['problem']['seq']}"
    out.append(f"  call record: {ledger['records']:,} records re-derived, verification {verdict}")
    for diff in data["differences"]:
        out.append(f"  {diff['cause']:<21} {diff['call_id'] or '-':<36}  {diff['detail']}")
    if data["truncated"]:
        out.append(f"  ... {data['difference_count'] - len(data['differences']):,} more (raise --limit)")
    return "\n".join(out)


def add_commands(sub: Any, common: Common) -> None:
    command = command_group(
        sub, "billing", "close periods into invoices; show, correct, export and reconcile them", common
    )

    p = command(
        "close",
        "close a period that has ended for review: one draft invoice per licensee, computed from the "
        "call record until issued (again: the drafts as they are now)",
        billing_close,
    )
    p.add_argument("period", metavar="PERIOD", help="YYYY-MM, in the billing time zone")
    p.add_argument(
        "--allow-pending",
        action="store_true",
        help="close even if calls of the period are still in flight or in the call-record log "
        "(they are listed, and billed once they land)",
    )
    p.add_argument("--issue", action="store_true", help="issue the invoices at once, without review")
    p = command(
        "issue",
        "issue a period closed for review: its drafts made final, numbered and signed",
        billing_close,
    )
    p.add_argument("period", metavar="PERIOD", help="YYYY-MM, a period closed for review")
    p.add_argument(
        "--drafts-hash",
        metavar="HASH",
        help="the drafts hash reviewed (from close or show): refused if the drafts changed since",
    )
    p.add_argument(
        "--allow-pending",
        action="store_true",
        help="issue even if calls of the period are still in flight or in the call-record log "
        "(billed by the next period as late usage)",
    )
    for report, what in (
        ("summary", "a period across licensees: invoices, notes, totals, net revenue split"),
        ("payouts", "a period per provider department and dataset: shares billed, net of notes"),
    ):
        p = command(report, what, billing_report)
        p.set_defaults(report=report)
        p.add_argument("period", metavar="PERIOD", help="YYYY-MM")
        p.add_argument("--format", choices=("csv", "json", "xlsx"), help="default: a table (or by --output)")
        p.add_argument("--output", "-o", metavar="FILE", help="write here (XLSX needs it)")
    p = command("pay", "record a payment received against an issued invoice", billing_pay)
    p.add_argument("invoice_id", metavar="INVOICE_ID")
    p.add_argument("--amount-fen", type=int, required=True, metavar="FEN", help="never more than its balance")
    p.add_argument("--date", required=True, metavar="YYYY-MM-DD", help="the day it was paid")
    p.add_argument("--reference", default="", help="the bank's or the payer's reference")
    p = command(
        "statement", "a licensee's invoices, notes and payments with a running balance", billing_statement
    )
    p.add_argument("licensee_id", metavar="LICENSEE_ID")
    p.add_argument(
        "--from", dest="from_month", metavar="YYYY-MM", help="the first month (default: its first)"
    )
    p.add_argument("--to", dest="to_month", metavar="YYYY-MM", help="the last month (default: this one)")
    p.add_argument("--pdf", metavar="FILE", help="also write it as a PDF")
    p = command("ageing", "open balances per licensee by days past due", billing_ageing)
    p.add_argument("--as-of", metavar="YYYY-MM-DD", help="default: today")
    p = command("pdf", "write an invoice as a PDF (Chinese, or --lang en)", billing_pdf)
    p.add_argument("invoice_id", metavar="INVOICE_ID")
    p.add_argument("--lang", choices=("zh", "en"), default="zh")
    p.add_argument("--output", "-o", metavar="FILE", help="default: NUMBER.pdf in this folder")
    p = command("show", "print a period's invoices, or one invoice", billing_show)
    p.add_argument("what", metavar="PERIOD|INVOICE_ID")
    p.add_argument("--licensee", help="only this licensee's invoice (with PERIOD)")
    p = command(
        "adjust",
        "issue a credit or debit note on a closed invoice (never more than it billed)",
        billing_adjust,
    )
    p.add_argument("invoice_id", metavar="INVOICE_ID")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--credit", type=int, metavar="FEN", help="lower what is owed by FEN (before VAT)")
    amount.add_argument("--debit", type=int, metavar="FEN", help="raise what is owed by FEN (before VAT)")
    p.add_argument("--reason", required=True, help="why (kept with the note)")
    p.add_argument("--line", type=int, metavar="N", help="the invoice line it corrects (default: the whole)")
    p = command(
        "export",
        "write a period's invoices and notes as CSV, JSON or XLSX",
        billing_export,
    )
    p.add_argument("period", metavar="PERIOD", help="YYYY-MM")
    p.add_argument(
        "--format", choices=("csv", "json", "xlsx"), help="default: by --output's suffix, else csv"
    )
    p.add_argument(
        "--output", "-o", metavar="FILE", help="write here (default: standard output; XLSX needs it)"
    )
    p.add_argument("--licensee", help="only this licensee's invoices and notes")
    p = command(
        "reconcile",
        "compare a closed period's invoices, the verified call record and the quota counters "
        "(exit 1 when they differ)",
        billing_reconcile,
    )
    p.add_argument("period", metavar="PERIOD", help="YYYY-MM, a closed period")
    p.add_argument("--limit", type=int, help="list at most this many differences (all are counted)")
