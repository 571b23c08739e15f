"""Finance in the console, ``/console/finance/``: periods closed for review
and issued, invoices with their lines, split, notes and payments,
statements, ageing, the period's reports and exports, reconciliation, and
prepaid balances with their top-ups.

The pages call what the admin API's billing routes call (``billing.*``,
``Registry.top_up``), with the same settings, clock and Redis, never over
HTTP. Who may do what is the admin API's role table
(``licensing.admin_tokens.PERMISSIONS``): every operating-company role
reads; ``finance`` closes, issues, writes notes, records payments and
buys top-ups (``billing:write``); ``finance`` and ``auditor`` reconcile
(``billing:reconcile``). Money is shown from integer fen as yuan with two
decimals; amounts typed in yuan are read as text into whole fen, never
through a float.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import date
from typing import Any, Final, cast
from urllib.parse import quote

from aiohttp import web
from sqlalchemy import Table, func, select

from billing import payments, prepaid, reports
from billing import schemas as billing_schemas
from billing.export import FORMATS as EXPORT_FORMATS
from billing.export import MEDIA_TYPES as EXPORT_MEDIA_TYPES
from billing.export import period_books
from billing.export import render as render_books
from billing.invoices import Closed, close_billing, drafts, get_invoice, issue_billing, list_invoices
from billing.models import BillingCloseRow, BillingDraftRow
from billing.notes import issue_note, list_notes
from billing.pdf import LANGS as PDF_LANGUAGES
from billing.pdf import invoice_pdf, statement_pdf, yuan
from billing.reconcile import reconcile
from billing.register import Issuer
from console.i18n import translator
from console.users import ConsolePrincipal
from console.web import LANG, PREFIX, _staff, render
from core.actor import acting_as
from core.errors import (
    ConflictError,
    ForbiddenError,
    LedgerUnavailableError,
    NotFoundError,
    QuotaUnavailableError,
    ValidationFailedError,
)
from gateway.state import CLOCK, ENGINE, REDIS, REGISTRY, SETTINGS
from ledger import audit
from ledger.models import CallRow
from ledger.record import SERVED
from licensing import schemas
from licensing.admin_tokens import PERMISSIONS
from licensing.registry import dump
from metering.periods import Period, PeriodError, parse_period, period_of, zone
from metering.quota import QuotaStoreError

_CLOSES = cast(Table, BillingCloseRow.__table__)
_DRAFTS = cast(Table, BillingDraftRow.__table__)
_CALLS = cast(Table, CallRow.__table__)

BASE: Final = f"{PREFIX}/finance"
#: The most months the periods page lists (newest first).
PERIODS_SHOWN: Final = 60
#: Differences a reconciliation page lists (all are counted), as the admin API's default.
RECONCILIATION_LIMIT: Final = 1000
_YUAN: Final = re.compile(r"([0-9]{1,13})(?:\.([0-9]{1,2}))?")
_HASH: Final = re.compile(r"[0-9a-f]{64}")


# -- helpers ------------------------------------------------------------------------


def may(request: web.Request, permission: str) -> ConsolePrincipal:
    """The signed-in operating-company user, if its role holds ``permission``
    in the admin API's role table (else a 403 page)."""
    user = _staff(request)
    if permission not in PERMISSIONS.get(user.role, frozenset()):
        raise ForbiddenError(f"role {user.role} may not do this ({permission})")
    return user


def money(amount_fen: Any) -> str:
    """Integer fen as yuan with two decimals (``—`` for none)."""
    return "—" if amount_fen is None else yuan(int(amount_fen))


def parse_yuan(value: Any, field: str) -> int:
    """Yuan typed in a form (``1234.5``, ``1,234.50``) as whole fen, read as text."""
    text = str(value or "").strip().replace(",", "")
    match = _YUAN.fullmatch(text)
    if match is None:
        raise ValidationFailedError(field, "an amount in yuan, such as 12.50 (at most two decimals)")
    return int(match.group(1)) * 100 + int((match.group(2) or "0").ljust(2, "0"))


def _optional_int(value: Any, field: str) -> int | None:
    text = str(value or "").strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 15:
        raise ValidationFailedError(field, "a whole number")
    return int(text)


def page(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    """:func:`console.web.render` with what finance pages use."""
    user: ConsolePrincipal = _staff(request)
    held = PERMISSIONS.get(user.role, frozenset())
    return render(
        request,
        template,
        status=status,
        money=money,
        can_write="billing:write" in held,
        can_reconcile="billing:reconcile" in held,
        **context,
    )


def download(body: bytes, media_type: str, filename: str) -> web.Response:
    return web.Response(
        body=body,
        headers={
            "Content-Type": media_type,
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )


def _tz_name(request: web.Request) -> str:
    return str(request.config_dict[SETTINGS].billing.time_zone)


def _period(request: web.Request) -> Period:
    try:
        return parse_period(request.match_info["period"], zone(_tz_name(request)))
    except PeriodError as exc:
        raise ValidationFailedError("period", str(exc)) from exc


def _receivables(request: web.Request) -> dict[str, Any]:
    settings = request.config_dict[SETTINGS]
    return {"tz": zone(settings.billing.time_zone), "payment_terms_days": settings.billing.payment_terms_days}


def _today(request: web.Request) -> date:
    return request.config_dict[CLOCK].now().astimezone(zone(_tz_name(request))).date()


async def _billing_run(request: web.Request) -> tuple[ConsolePrincipal, Period, Any, dict[str, Any]]:
    """Who closes or issues, the period, the form, and how it runs: the
    settings, this replica's Redis, the clock, ``allow_pending`` (as the
    admin API's)."""
    user = may(request, "billing:write")
    period = _period(request)
    form = await request.post()
    return (
        user,
        period,
        form,
        {
            "settings": request.config_dict[SETTINGS],
            "redis": _redis(request),
            "now": request.config_dict[CLOCK].now(),
            "allow_pending": form.get("allow_pending") == "yes",
        },
    )


def _redis(request: web.Request) -> Any:
    client = request.config_dict[REDIS]
    return lambda: contextlib.nullcontext(client)


def _by(user: ConsolePrincipal) -> str:
    """Who a document names as having issued or recorded it."""
    return f"console:{user.username}"[:64]


def _done(request: web.Request, *allowed: str) -> str | None:
    done = request.query.get("done")
    return translator(request[LANG])(f"finance.done.{done}") if done in allowed else None


# -- periods ------------------------------------------------------------------------


async def _periods(request: web.Request) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each month from the ledger's first served call (or first close) to
    now, newest first, with its state, and what can be done next."""
    engine = request.config_dict[ENGINE]
    tz = zone(_tz_name(request))
    now = request.config_dict[CLOCK].now()
    current = period_of(now, tz)
    async with engine.connect() as conn:
        closes = {r.period: r for r in await conn.execute(select(_CLOSES))}
        opened = {r.period: r.opened_at for r in await conn.execute(select(_DRAFTS))}
        first_served = await conn.scalar(select(func.min(_CALLS.c.period)).where(_CALLS.c.outcome == SERVED))
    held = next((name for name in sorted(opened) if name not in closes), None)
    if held is not None:
        following = {"action": "issue", "period": held}
    else:
        if closes:
            candidate = parse_period(max(closes), tz).next()
        elif first_served is not None:
            candidate = parse_period(str(first_served), tz)
        else:
            candidate = current.previous()
        action = "close" if now >= candidate.end else "wait"
        following = {"action": action, "period": candidate.name}
    names = [current.name, *closes, *opened] + ([str(first_served)] if first_served else [])
    month = parse_period(min(names), tz)
    rows: list[dict[str, Any]] = []
    while month.name <= current.name:
        close = closes.get(month.name)
        if close is not None:
            state = "issued"
        elif month.name in opened:
            state = "draft"
        else:
            state = "open" if now >= month.end else "current"
        rows.append(
            {
                "period": month.name,
                "state": state,
                "closed_at": close.closed_at if close is not None else opened.get(month.name),
                "invoices": int(close.invoices) if close is not None else None,
                "through_seq": int(close.through_seq) if close is not None else None,
                "next": month.name == following["period"],
            }
        )
        month = month.next()
    return rows[::-1][:PERIODS_SHOWN], following


async def index(request: web.Request) -> web.StreamResponse:
    may(request, "read")
    rows, following = await _periods(request)
    registry = request.config_dict[REGISTRY]
    licences = [
        lic
        for lic in dump(await registry.list_licences())
        if (lic.get("paid") or {}).get("prepaid_calls") is not None
    ]
    t = translator(request[LANG])
    return page(
        request,
        "finance_periods.html",
        periods=rows,
        following=following,
        licensees=dump(await registry.list_licensees()),
        prepaid_licences=licences,
        title=t("finance.title"),
    )


async def _closed(request: web.Request, period: Period) -> Closed | None:
    """The period's drafts (computed now) or issued invoices; ``None`` when not closed."""
    try:
        return await drafts(request.config_dict[ENGINE], period, request.config_dict[SETTINGS])
    except ConflictError:
        return None


async def _period_page(
    request: web.Request, period: Period, *, error: str | None = None, status: int = 200
) -> web.Response:
    closed = await _closed(request, period)
    rows, following = await _periods(request)
    state = next((r["state"] for r in rows if r["period"] == period.name), None)
    if state is None:
        state = "current" if request.config_dict[CLOCK].now() < period.end else "open"
    top_ups = [
        inv
        for inv in await list_invoices(request.config_dict[ENGINE], period=period.name)
        if inv.get("kind") == "top-up"
    ]
    t = translator(request[LANG])
    return page(
        request,
        "finance_period.html",
        status=status,
        period=period.name,
        state=state,
        closed=closed.as_dict() if closed is not None else None,
        top_ups=top_ups,
        closable=following["action"] == "close" and following["period"] == period.name,
        following=following,
        error=error,
        notice=_done(request, "close", "issue"),
        title=f"{t('finance.period')} {period.name}",
    )


async def period_page(request: web.Request) -> web.StreamResponse:
    may(request, "read")
    return await _period_page(request, _period(request))


async def close_period(request: web.Request) -> web.StreamResponse:
    """Close for review (drafts), or close and issue at once (``issue=yes``),
    as ``POST /admin/v1/billing/{period}/close``."""
    user, period, form, how = await _billing_run(request)
    issue = form.get("issue") == "yes"
    try:
        with acting_as(user.actor):
            await close_billing(request.config_dict[ENGINE], period, issue=issue, **how)
    except (ConflictError, LedgerUnavailableError) as exc:
        return await _period_page(request, period, error=exc.detail, status=exc.status)
    raise web.HTTPSeeOther(f"{BASE}/periods/{period.name}?done={'issue' if issue else 'close'}")


async def issue_period(request: web.Request) -> web.StreamResponse:
    """Issue the drafts the page showed (``drafts_hash``), as ``POST
    /admin/v1/billing/{period}/issue``: drafts changed since are refused
    and shown again."""
    user, period, form, how = await _billing_run(request)
    reviewed = str(form.get("drafts_hash", ""))
    if not _HASH.fullmatch(reviewed):
        raise ValidationFailedError("drafts_hash", "the drafts' hash the page showed")
    try:
        with acting_as(user.actor):
            await issue_billing(request.config_dict[ENGINE], period, expect_drafts=reviewed, **how)
    except (ConflictError, LedgerUnavailableError) as exc:
        return await _period_page(request, period, error=exc.detail, status=exc.status)
    raise web.HTTPSeeOther(f"{BASE}/periods/{period.name}?done=issue")


# -- reports and exports ----------------------------------------------------------------


async def _report(request: web.Request, kind: str) -> web.StreamResponse:
    """The period's summary or payouts: a table, or a file (``format``)."""
    may(request, "read")
    period = _period(request)
    fmt = request.query.get("format")
    if fmt is not None and fmt not in reports.FORMATS:
        raise ValidationFailedError("format", f"one of {', '.join(reports.FORMATS)}")
    engine = request.config_dict[ENGINE]
    maker = reports.period_summary if kind == "summary" else reports.period_payouts
    report = await maker(engine, period.name)
    if fmt is not None:
        body = await asyncio.to_thread(reports.render, report, fmt)
        return download(body, EXPORT_MEDIA_TYPES[fmt], f"pdg-billing-{kind}-{period.name}.{fmt}")
    t = translator(request[LANG])
    rows = reports.summary_rows(report) if kind == "summary" else reports.payout_rows(report)
    return page(
        request,
        f"finance_{kind}.html",
        period=period.name,
        report=report,
        rows=rows,
        title=f"{t('finance.' + kind)} {period.name}",
    )


async def summary_page(request: web.Request) -> web.StreamResponse:
    return await _report(request, "summary")


async def payouts_page(request: web.Request) -> web.StreamResponse:
    return await _report(request, "payouts")


async def export_period(request: web.Request) -> web.StreamResponse:
    """The period's invoices and notes as a file, as ``GET /admin/v1/billing/{period}/export``."""
    may(request, "read")
    period = _period(request)
    fmt = request.query.get("format", "csv")
    if fmt not in EXPORT_FORMATS:
        raise ValidationFailedError("format", f"one of {', '.join(EXPORT_FORMATS)}")
    books = await period_books(request.config_dict[ENGINE], period.name)
    body = await asyncio.to_thread(render_books, books, fmt)
    return download(body, EXPORT_MEDIA_TYPES[fmt], f"pdg-billing-{period.name}.{fmt}")


async def reconciliation_page(request: web.Request) -> web.StreamResponse:
    """The reconciliation of a closed period, with the deployment's ledger key
    file as the trusted key (as ``GET /admin/v1/reconciliation/{period}``)."""
    may(request, "billing:reconcile")
    period = _period(request)
    path = request.config_dict[SETTINGS].ledger_key_path
    keys = audit.read_public_keys([path]) if path.exists() else {}
    try:
        found = await reconcile(
            request.config_dict[ENGINE],
            request.config_dict[REDIS],
            period,
            keys,
            limit=RECONCILIATION_LIMIT,
        )
    except QuotaStoreError as exc:
        raise QuotaUnavailableError("the quota counters cannot be read") from exc
    t = translator(request[LANG])
    return page(
        request,
        "finance_reconciliation.html",
        period=period.name,
        r=found.as_dict(),
        title=f"{t('finance.reconciliation')} {period.name}",
    )


# -- invoices -------------------------------------------------------------------------


async def _invoice(request: web.Request) -> dict[str, Any]:
    wanted = request.match_info["id"]
    found = await get_invoice(request.config_dict[ENGINE], wanted, request.config_dict[SETTINGS])
    if found is None:
        raise NotFoundError(f"no invoice {wanted}")
    return found


async def _invoice_page(
    request: web.Request,
    *,
    error: str | None = None,
    error_form: str | None = None,
    status: int = 200,
    form: dict[str, str] | None = None,
) -> web.Response:
    invoice = await _invoice(request)
    engine = request.config_dict[ENGINE]
    account = None
    if invoice["status"] != "draft":
        with contextlib.suppress(ConflictError, NotFoundError):
            account = await payments.invoice_account(
                engine, invoice["id"], today=_today(request), **_receivables(request)
            )
    t = translator(request[LANG])
    return page(
        request,
        "finance_invoice.html",
        status=status,
        inv=invoice,
        account=account,
        notes=await list_notes(engine, invoice_id=invoice["id"]),
        error=error,
        error_form=error_form,
        form=form or {},
        today=_today(request).isoformat(),
        notice=_done(request, "note", "payment"),
        title=f"{t('finance.invoice')} {invoice.get('number') or invoice['id']}",
    )


async def invoice_page(request: web.Request) -> web.StreamResponse:
    may(request, "read")
    return await _invoice_page(request)


async def invoice_pdf_download(request: web.Request) -> web.StreamResponse:
    """The invoice as a PDF (``lang``: zh, the default, or en)."""
    may(request, "read")
    lang = request.query.get("lang", "zh")
    if lang not in PDF_LANGUAGES:
        raise ValidationFailedError("lang", f"one of {', '.join(PDF_LANGUAGES)}")
    invoice = await _invoice(request)
    body = await asyncio.to_thread(invoice_pdf, invoice, lang=lang, time_zone=_tz_name(request))
    name = invoice.get("number") or invoice["id"]
    return download(body, "application/pdf", f"{name}.pdf")


async def issue_note_form(request: web.Request) -> web.StreamResponse:
    """A credit or debit note, as ``POST /admin/v1/invoices/{id}/notes``
    (the amount typed in yuan)."""
    user = may(request, "billing:write")
    wanted = request.match_info["id"]
    data = await request.post()
    form = {name: str(data.get(name, "")) for name in ("kind", "amount", "reason", "line_no")}
    try:
        note_in = schemas.parse(
            billing_schemas.NoteIn,
            {
                "kind": form["kind"],
                "amount_fen": parse_yuan(form["amount"], "amount"),
                "reason": form["reason"].strip(),
                "line_no": _optional_int(form["line_no"], "line_no"),
            },
        )
        with acting_as(user.actor):
            await issue_note(
                request.config_dict[ENGINE],
                wanted,
                kind=note_in.kind,
                amount_fen=note_in.amount_fen,
                reason=note_in.reason,
                line_no=note_in.line_no,
                issued_by=_by(user),
                now=request.config_dict[CLOCK].now(),
                issuer=Issuer.from_settings(request.config_dict[SETTINGS]),
            )
    except (ValidationFailedError, ConflictError) as exc:
        return await _invoice_page(request, error=exc.detail, error_form="note", status=exc.status, form=form)
    raise web.HTTPSeeOther(f"{BASE}/invoices/{quote(wanted)}?done=note")


async def record_payment_form(request: web.Request) -> web.StreamResponse:
    """A payment received, as ``POST /admin/v1/invoices/{id}/payments``."""
    user = may(request, "billing:write")
    wanted = request.match_info["id"]
    data = await request.post()
    form = {name: str(data.get(name, "")) for name in ("amount", "paid_on", "reference")}
    try:
        payment_in = schemas.parse(
            billing_schemas.PaymentIn,
            {
                "amount_fen": parse_yuan(form["amount"], "amount"),
                "paid_on": form["paid_on"].strip(),
                "reference": form["reference"].strip(),
            },
        )
        with acting_as(user.actor):
            await payments.record_payment(
                request.config_dict[ENGINE],
                wanted,
                amount_fen=payment_in.amount_fen,
                paid_on=payment_in.paid_on,
                reference=payment_in.reference,
                recorded_by=_by(user),
                now=request.config_dict[CLOCK].now(),
                **_receivables(request),
            )
    except (ValidationFailedError, ConflictError) as exc:
        return await _invoice_page(
            request, error=exc.detail, error_form="payment", status=exc.status, form=form
        )
    raise web.HTTPSeeOther(f"{BASE}/invoices/{quote(wanted)}?done=payment")


# -- receivables ------------------------------------------------------------------------


async def _statement(request: web.Request) -> dict[str, Any]:
    return await payments.statement(
        request.config_dict[ENGINE],
        request.match_info["id"],
        from_period=request.query.get("from_month") or None,
        to_period=request.query.get("to_month") or None,
        now=request.config_dict[CLOCK].now(),
        **_receivables(request),
    )


async def statement_page(request: web.Request) -> web.StreamResponse:
    may(request, "read")
    found = await _statement(request)
    t = translator(request[LANG])
    return page(
        request,
        "finance_statement.html",
        s=found,
        query=request.query_string,
        from_month=request.query.get("from_month", ""),
        to_month=request.query.get("to_month", ""),
        title=f"{t('finance.statement')} {found['licensee'].get('name') or request.match_info['id']}",
    )


async def statement_pdf_download(request: web.Request) -> web.StreamResponse:
    may(request, "read")
    found = await _statement(request)
    body = await asyncio.to_thread(statement_pdf, found, time_zone=_tz_name(request))
    return download(body, "application/pdf", f"statement-{request.match_info['id']}.pdf")


async def ageing_page(request: web.Request) -> web.StreamResponse:
    """Open balances by days past due (``as_of``: ``YYYY-MM-DD``, default today)."""
    may(request, "read")
    raw = request.query.get("as_of") or None
    as_of = payments.parse_day(raw, "as_of") if raw is not None else _today(request)
    found = await payments.ageing(request.config_dict[ENGINE], as_of=as_of, **_receivables(request))
    t = translator(request[LANG])
    return page(
        request,
        "finance_ageing.html",
        a=found,
        buckets=[(name, field) for name, field, _ in payments.BUCKETS],
        title=t("finance.ageing"),
    )


# -- prepaid ---------------------------------------------------------------------------


async def _prepaid_page(
    request: web.Request, *, error: str | None = None, status: int = 200, form: dict[str, str] | None = None
) -> web.Response:
    registry = request.config_dict[REGISTRY]
    licence = await registry.get_licence(request.match_info["id"])
    try:
        balance: dict[str, Any] | None = await prepaid.balance(request.config_dict[ENGINE], licence.id)
    except NotFoundError:
        balance = None
    t = translator(request[LANG])
    return page(
        request,
        "finance_prepaid.html",
        status=status,
        lic=dump(licence),
        balance=balance,
        lots={lot["id"]: lot for lot in balance["top_ups"]} if balance is not None else {},
        top_ups=dump(await registry.list_top_ups(licence.id)),
        error=error,
        form=form or {},
        notice=_done(request, "top-up"),
        title=f"{t('finance.prepaid')} {licence.id}",
    )


async def prepaid_page(request: web.Request) -> web.StreamResponse:
    may(request, "read")
    return await _prepaid_page(request)


async def top_up_form(request: web.Request) -> web.StreamResponse:
    """Prepaid calls bought for a licence, invoiced at once, as ``POST
    /admin/v1/licences/{id}/top-ups``."""
    user = may(request, "billing:write")
    licence_id = request.match_info["id"]
    data = await request.post()
    form = {name: str(data.get(name, "")).strip() for name in ("calls", "unit_price_fen")}
    settings, now = request.config_dict[SETTINGS], request.config_dict[CLOCK].now()
    try:
        top_up_in = schemas.parse(
            schemas.TopUpIn,
            {
                "calls": _optional_int(form["calls"], "calls"),
                "unit_price_fen": form["unit_price_fen"] or None,
            },
        )
        with acting_as(user.actor):
            await request.config_dict[REGISTRY].top_up(
                licence_id, top_up_in, bought_by=_by(user), now=now, invoice=prepaid.invoicer(settings, now)
            )
    except (ValidationFailedError, ConflictError) as exc:
        return await _prepaid_page(request, error=exc.detail, status=exc.status, form=form)
    raise web.HTTPSeeOther(f"{BASE}/licences/{quote(licence_id)}/prepaid?done=top-up")


def add_routes(routes: web.UrlDispatcher) -> None:
    """The finance pages, under the console's ``/finance/``."""
    routes.add_get("/finance/", index)
    routes.add_get("/finance/ageing", ageing_page)
    routes.add_get("/finance/periods/{period}", period_page)
    routes.add_post("/finance/periods/{period}/close", close_period)
    routes.add_post("/finance/periods/{period}/issue", issue_period)
    routes.add_get("/finance/periods/{period}/summary", summary_page)
    routes.add_get("/finance/periods/{period}/payouts", payouts_page)
    routes.add_get("/finance/periods/{period}/export", export_period)
    routes.add_get("/finance/periods/{period}/reconciliation", reconciliation_page)
    routes.add_get("/finance/invoices/{id}", invoice_page)
    routes.add_get("/finance/invoices/{id}/pdf", invoice_pdf_download)
    routes.add_post("/finance/invoices/{id}/notes", issue_note_form)
    routes.add_post("/finance/invoices/{id}/payments", record_payment_form)
    routes.add_get("/finance/licensees/{id}/statement", statement_page)
    routes.add_get("/finance/licensees/{id}/statement.pdf", statement_pdf_download)
    routes.add_get("/finance/licences/{id}/prepaid", prepaid_page)
    routes.add_post("/finance/licences/{id}/top-ups", top_up_form)
