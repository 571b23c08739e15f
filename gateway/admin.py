"""The admin API, ``/admin/v1``: the operating company's catalogue and licensing
resources (DESIGN §3), role-checked on every request.

Routes are declared once in ``ROUTES``; the OpenAPI 3.1 document
(``gateway.openapi``) is generated from the same table and the same pydantic
models that validate the payloads, so the two cannot drift apart. A
licensee-scoped token sees its own licensee only; another licensee's
resources answer 404, as if they did not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from billing import payments, prepaid, reports
from billing import schemas as billing_schemas
from billing.export import FORMATS as EXPORT_FORMATS
from billing.export import MEDIA_TYPES as EXPORT_MEDIA_TYPES
from billing.export import period_books, render
from billing.invoices import close_billing, get_invoice, issue_billing, list_invoices
from billing.notes import issue_note, list_notes
from billing.pdf import LANGS as PDF_LANGUAGES
from billing.pdf import invoice_pdf, statement_pdf
from billing.reconcile import reconcile
from billing.register import Issuer
from core.errors import (
    AdminAuthError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    QuotaUnavailableError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)
from gateway.openapi import Handler, Route, build_openapi
from gateway.state import (
    ADMIN_TOKENS,
    CATALOGUE,
    CLOCK,
    ENGINE,
    KEYS,
    REDIS,
    REGISTRY,
    SETTINGS,
    THROTTLE,
    TOKENS,
)
from gateway.throttle import client_address
from ledger import admin_log, audit
from licensing import schemas
from licensing.admin_tokens import AdminPrincipal
from licensing.keys import FILE_KEYS, KeyInfo, KeyStore
from licensing.registry import dump
from metering.periods import Period, PeriodError, parse_period, period_of, zone
from metering.quota import QuotaStoreError
from metering.usage import UsageRow, usage_report


def _json(data: Any, status: int = 200, location: str | None = None) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if location:
        headers["Location"] = location
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


async def _body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"the body must be sent as application/json, not {request.content_type[:100]!r}",
            headers={"Accept-Post": "application/json", "Accept-Patch": "application/json"},
        )
    raw = await request.read()
    if not raw:
        raise BadRequestError("body: a JSON object is required", field="body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"body: not valid JSON ({exc.msg})", field="body") from exc
    if not isinstance(data, dict):
        raise BadRequestError("body: a JSON object is required", field="body")
    return data


def _own(principal: AdminPrincipal, licensee_id: str, what: str) -> None:
    if principal.own_licensee is not None and principal.own_licensee != licensee_id:
        raise NotFoundError(f"no {what}")


# -- datasets -----------------------------------------------------------------


#: What a licensee-scoped token is not shown of a dataset (DESIGN §3): the
#: upstream it would otherwise call around the gateway, and how it is reached.
_INTERNAL_DATASET_FIELDS = (
    "upstream_url",
    "upstream_pool",
    "upstream_tls",
    "timeout_seconds",
    "idle_timeout_seconds",
)


def _known_certificate(request: web.Request, tls: schemas.UpstreamTls | None) -> None:
    """A client certificate named for upstream TLS is one this gateway has."""
    name = None if tls is None else tls.client_certificate
    if name is not None and name not in request.app[SETTINGS].proxy.client_certificates:
        raise ValidationFailedError(
            "upstream_tls.client_certificate",
            f"no client certificate {name!r} in the settings (proxy.client_certificates)",
        )


def _as_seen(principal: AdminPrincipal, dataset: dict[str, Any]) -> dict[str, Any]:
    if principal.own_licensee is not None:
        for name in _INTERNAL_DATASET_FIELDS:
            dataset.pop(name, None)
    return dataset


async def list_datasets(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return _json([_as_seen(principal, d) for d in dump(await request.app[REGISTRY].list_datasets())])


async def create_dataset(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.DatasetIn, await _body(request))
    _known_certificate(request, data.upstream_tls)
    created = await request.app[REGISTRY].create_dataset(data)
    return _json(dump(created), 201, f"/admin/v1/datasets/{created.id}")


async def get_dataset(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return _json(_as_seen(principal, dump(await request.app[REGISTRY].get_dataset(request.match_info["id"]))))


async def patch_dataset(request: web.Request, principal: AdminPrincipal) -> web.Response:
    patch = schemas.parse(schemas.DatasetPatch, await _body(request))
    _known_certificate(request, patch.upstream_tls)
    return _json(dump(await request.app[REGISTRY].update_dataset(request.match_info["id"], patch)))


async def list_terms(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return _json(dump(await request.app[REGISTRY].list_terms(request.match_info["id"])))


# -- licensees ----------------------------------------------------------------


async def list_licensees(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return _json(dump(await request.app[REGISTRY].list_licensees(principal.own_licensee)))


async def create_licensee(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.LicenseeIn, await _body(request))
    created = await request.app[REGISTRY].create_licensee(data)
    return _json(dump(created), 201, f"/admin/v1/licensees/{created.id}")


async def get_licensee(request: web.Request, principal: AdminPrincipal) -> web.Response:
    licensee_id = request.match_info["id"]
    _own(principal, licensee_id, f"licensee {licensee_id}")
    return _json(dump(await request.app[REGISTRY].get_licensee(licensee_id)))


# -- licences -----------------------------------------------------------------


async def list_licences(request: web.Request, principal: AdminPrincipal) -> web.Response:
    wanted = request.query.get("licensee")
    if principal.own_licensee is not None:
        if wanted not in (None, principal.own_licensee):
            return _json([])
        wanted = principal.own_licensee
    return _json(dump(await request.app[REGISTRY].list_licences(wanted)))


async def create_licence(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.LicenceIn, await _body(request))
    created = await request.app[REGISTRY].create_licence(data)
    return _json(dump(created), 201, f"/admin/v1/licences/{created.id}")


async def get_licence(request: web.Request, principal: AdminPrincipal) -> web.Response:
    licence = await request.app[REGISTRY].get_licence(request.match_info["id"])
    _own(principal, licence.licensee_id, f"licence {licence.id}")
    return _json(dump(licence))


async def patch_licence(request: web.Request, principal: AdminPrincipal) -> web.Response:
    patch = schemas.parse(schemas.LicencePatch, await _body(request))
    return _json(dump(await request.app[REGISTRY].update_licence(request.match_info["id"], patch)))


async def get_usage(request: web.Request, principal: AdminPrincipal) -> web.Response:
    settings = request.app[SETTINGS]
    tz = zone(settings.billing.time_zone)
    name = request.query.get("period")
    try:
        period = parse_period(name, tz) if name else period_of(request.app[CLOCK].now(), tz)
    except PeriodError as exc:
        raise ValidationFailedError("period", str(exc)) from exc
    licensee = request.query.get("licensee")
    if principal.own_licensee is not None:
        if licensee not in (None, principal.own_licensee):
            return _json([])
        licensee = principal.own_licensee
    try:
        rows = await usage_report(
            request.app[REDIS],
            request.app[CATALOGUE].current,
            period,
            licence_id=request.query.get("licence"),
            dataset_id=request.query.get("dataset"),
            licensee_id=licensee,
        )
    except QuotaStoreError as exc:
        raise QuotaUnavailableError("the quota store cannot be reached") from exc
    return _json([row.model_dump(mode="json") for row in rows])


# -- billing ------------------------------------------------------------------


def _period_param(request: web.Request, value: str) -> Period:
    try:
        return parse_period(value, zone(request.app[SETTINGS].billing.time_zone))
    except PeriodError as exc:
        raise ValidationFailedError("period", str(exc)) from exc


async def close_billing_period(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """Close a period (``billing.invoices.close_billing``) with this
    replica's Redis. ``allow_pending=true`` closes even when calls of the
    period are still in flight or in the call-record log (listed in
    ``pending``); without it such a close is refused and writes nothing: 409
    ``conflict`` while calls stay in flight, 503 ``ledger-unavailable`` when
    the log cannot be reached or moved (the problem's ``pending`` says what)."""
    period, how = _billing_run(request)
    closed = await close_billing(request.app[ENGINE], period, issue=_flag(request, "issue"), **how)
    return _json(closed.as_dict(), 200 if closed.already_closed else 201)


def _billing_run(request: web.Request) -> tuple[Period, dict[str, Any]]:
    """The period a close or an issue runs on, and how: the settings, this
    replica's Redis, the clock, ``allow_pending``."""
    client = request.app[REDIS]
    return _period_param(request, request.match_info["period"]), {
        "settings": request.app[SETTINGS],
        "redis": lambda: contextlib.nullcontext(client),
        "now": request.app[CLOCK].now(),
        "allow_pending": _flag(request, "allow_pending"),
    }


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    if raw not in ("true", "false"):
        raise ValidationFailedError(name, "true or false")
    return raw == "true"


async def issue_billing_period(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """Issue a period closed for review (``billing.invoices.issue_billing``)."""
    period, how = _billing_run(request)
    body = await _body(request) if request.body_exists else {}
    issue_in = schemas.parse(billing_schemas.IssueIn, body)
    issued = await issue_billing(request.app[ENGINE], period, expect_drafts=issue_in.drafts_hash, **how)
    return _json(issued.as_dict(), 200 if issued.already_closed else 201)


async def list_invoices_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    wanted = request.query.get("licensee")
    if principal.own_licensee is not None:
        if wanted not in (None, principal.own_licensee):
            return _json([])
        wanted = principal.own_licensee
    name = request.query.get("period")
    period = _period_param(request, name).name if name is not None else None
    return _json(
        await list_invoices(
            request.app[ENGINE], period=period, licensee_id=wanted, settings=request.app[SETTINGS]
        )
    )


#: Differences a reconciliation lists unless ``limit`` says otherwise (all are counted).
RECONCILIATION_LIMIT = 1000
RECONCILIATION_MAX_LIMIT = 100_000


async def get_reconciliation(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """Run with the deployment's ledger key file as the trusted key (as
    ``pdg audit verify``): keys stored in the ledger are not trusted."""
    period = _period_param(request, request.match_info["period"])
    raw = request.query.get("limit")
    limit = RECONCILIATION_LIMIT
    if raw is not None:
        limit = audit.parse_int(raw, "limit", 1, RECONCILIATION_MAX_LIMIT)
    path = request.app[SETTINGS].ledger_key_path
    keys = audit.read_public_keys([path]) if path.exists() else {}
    try:
        found = await reconcile(request.app[ENGINE], request.app[REDIS], period, keys, limit=limit)
    except QuotaStoreError as exc:
        raise QuotaUnavailableError("the quota counters cannot be read") from exc
    return _json(found.as_dict())


async def issue_note_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    wanted = request.match_info["id"]
    note_in = schemas.parse(billing_schemas.NoteIn, await _body(request))
    note = await issue_note(
        request.app[ENGINE],
        wanted,
        kind=note_in.kind,
        amount_fen=note_in.amount_fen,
        reason=note_in.reason,
        line_no=note_in.line_no,
        issued_by=principal.token_id,
        now=request.app[CLOCK].now(),
        issuer=Issuer.from_settings(request.app[SETTINGS]),
    )
    return _json(note, 201, location=f"/admin/v1/invoices/{wanted}/notes")


async def list_notes_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    invoice = await _visible_invoice(request, principal)
    return _json(await list_notes(request.app[ENGINE], invoice_id=invoice["id"]))


async def export_billing(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """A period's invoices and notes as a file (``format``: csv, json or xlsx; default json)."""
    period = _period_param(request, request.match_info["period"])
    fmt = request.query.get("format", "json")
    if fmt not in EXPORT_FORMATS:
        raise ValidationFailedError("format", f"one of {', '.join(EXPORT_FORMATS)}")
    wanted = request.query.get("licensee")
    if principal.own_licensee is not None:
        if wanted not in (None, principal.own_licensee):
            raise NotFoundError(f"no invoices or notes for {period.name}")
        wanted = principal.own_licensee
    books = await period_books(request.app[ENGINE], period.name, licensee_id=wanted)
    return web.Response(
        body=render(books, fmt),
        headers={
            "Content-Type": EXPORT_MEDIA_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="pdg-billing-{period.name}.{fmt}"',
            "Cache-Control": "no-store",
        },
    )


def _receivables(request: web.Request) -> dict[str, Any]:
    settings = request.app[SETTINGS]
    return {"tz": zone(settings.billing.time_zone), "payment_terms_days": settings.billing.payment_terms_days}


async def record_payment_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """A payment received against an issued invoice (``billing.payments``)."""
    wanted = request.match_info["id"]
    payment_in = schemas.parse(billing_schemas.PaymentIn, await _body(request))
    payment = await payments.record_payment(
        request.app[ENGINE],
        wanted,
        amount_fen=payment_in.amount_fen,
        paid_on=payment_in.paid_on,
        reference=payment_in.reference,
        recorded_by=principal.token_id,
        now=request.app[CLOCK].now(),
        **_receivables(request),
    )
    return _json(payment, 201, location=f"/admin/v1/invoices/{wanted}/payments")


async def invoice_account_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    invoice = await _visible_invoice(request, principal)
    terms = _receivables(request)
    today = request.app[CLOCK].now().astimezone(terms["tz"]).date()
    return _json(await payments.invoice_account(request.app[ENGINE], invoice["id"], today=today, **terms))


async def statement_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """A licensee's statement of account (``from_month``/``to_month``:
    ``YYYY-MM``; ``format``: json, the default, or pdf)."""
    licensee_id = request.match_info["id"]
    _own(principal, licensee_id, f"licensee {licensee_id}")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "pdf"):
        raise ValidationFailedError("format", "json or pdf")
    terms = _receivables(request)
    found = await payments.statement(
        request.app[ENGINE],
        licensee_id,
        from_period=request.query.get("from_month"),
        to_period=request.query.get("to_month"),
        now=request.app[CLOCK].now(),
        **terms,
    )
    if fmt == "json":
        return _json(found)
    zone_name = request.app[SETTINGS].billing.time_zone
    body = await asyncio.to_thread(statement_pdf, found, time_zone=zone_name)
    return web.Response(
        body=body,
        headers={
            "Content-Type": "application/pdf",
            "Content-Disposition": f'inline; filename="statement-{licensee_id}.pdf"',
            "Cache-Control": "no-store",
        },
    )


async def ageing_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """Open balances by days past due (``as_of``: ``YYYY-MM-DD``, default today)."""
    terms = _receivables(request)
    raw = request.query.get("as_of")
    as_of = (
        payments.parse_day(raw, "as_of")
        if raw is not None
        else request.app[CLOCK].now().astimezone(terms["tz"]).date()
    )
    found = await payments.ageing(
        request.app[ENGINE], as_of=as_of, licensee_id=principal.own_licensee, **terms
    )
    return _json(found)


async def billing_summary(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return await _billing_report(request, principal, "summary")


async def billing_payouts(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return await _billing_report(request, principal, "payouts")


async def _billing_report(request: web.Request, principal: AdminPrincipal, kind: str) -> web.Response:
    """A period's summary across licensees, or its payouts per provider
    department (``format``: json, the default, csv or xlsx): the operating
    company's, so never a licensee's to see."""
    period = _period_param(request, request.match_info["period"])
    if principal.own_licensee is not None:
        raise NotFoundError(f"no report for {period.name}")
    fmt = request.query.get("format", "json")
    if fmt not in reports.FORMATS:
        raise ValidationFailedError("format", f"one of {', '.join(reports.FORMATS)}")
    engine = request.app[ENGINE]
    report = await (reports.period_summary if kind == "summary" else reports.period_payouts)(
        engine, period.name
    )
    if fmt == "json":
        return _json(report)
    return web.Response(
        body=await asyncio.to_thread(reports.render, report, fmt),
        headers={
            "Content-Type": EXPORT_MEDIA_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="pdg-billing-{kind}-{period.name}.{fmt}"',
            "Cache-Control": "no-store",
        },
    )


async def _visible_invoice(request: web.Request, principal: AdminPrincipal) -> dict[str, Any]:
    """The ``{id}`` invoice, if the principal may see it (else 404)."""
    wanted = request.match_info["id"]
    invoice = await get_invoice(request.app[ENGINE], wanted, request.app[SETTINGS])
    if invoice is None:
        raise NotFoundError(f"no invoice {wanted}")
    _own(principal, invoice["licensee_id"], f"invoice {wanted}")
    return invoice


async def get_invoice_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return _json(await _visible_invoice(request, principal))


async def invoice_pdf_handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """The invoice as a PDF (``lang``: zh, the default, or en)."""
    lang = request.query.get("lang", "zh")
    if lang not in PDF_LANGUAGES:
        raise ValidationFailedError("lang", f"one of {', '.join(PDF_LANGUAGES)}")
    invoice = await _visible_invoice(request, principal)
    zone_name = request.app[SETTINGS].billing.time_zone
    body = await asyncio.to_thread(invoice_pdf, invoice, lang=lang, time_zone=zone_name)
    name = invoice.get("number") or invoice["id"]
    return web.Response(
        body=body,
        headers={
            "Content-Type": "application/pdf",
            "Content-Disposition": f'inline; filename="{name}.pdf"',
            "Cache-Control": "no-store",
        },
    )


async def top_up_licence(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """Prepaid calls bought for a licence, invoiced at once (``billing.prepaid``)."""
    data = schemas.parse(schemas.TopUpIn, await _body(request))
    settings, now = request.app[SETTINGS], request.app[CLOCK].now()
    licence_id = request.match_info["id"]
    top_up = await request.app[REGISTRY].top_up(
        licence_id, data, bought_by=principal.token_id, now=now, invoice=prepaid.invoicer(settings, now)
    )
    return _json(dump(top_up), 201, location=f"/admin/v1/licences/{licence_id}/top-ups")


async def list_top_ups(request: web.Request, principal: AdminPrincipal) -> web.Response:
    licence = await request.app[REGISTRY].get_licence(request.match_info["id"])
    _own(principal, licence.licensee_id, f"licence {licence.id}")
    return _json(dump(await request.app[REGISTRY].list_top_ups(licence.id)))


async def prepaid_balance(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """A prepaid licence's balance in calls and money (``billing.prepaid.balance``)."""
    licence = await request.app[REGISTRY].get_licence(request.match_info["id"])
    _own(principal, licence.licensee_id, f"licence {licence.id}")
    return _json(await prepaid.balance(request.app[ENGINE], licence.id))


def _licence_action(action: str) -> Handler:
    async def handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
        return _json(dump(await request.app[REGISTRY].set_licence_status(request.match_info["id"], action)))

    handler.__name__ = f"{action}_licence"
    return handler


# -- apps ---------------------------------------------------------------------


async def list_apps(request: web.Request, principal: AdminPrincipal) -> web.Response:
    wanted = request.query.get("licensee")
    if principal.own_licensee is not None:
        if wanted not in (None, principal.own_licensee):
            return _json([])
        wanted = principal.own_licensee
    return _json(dump(await request.app[REGISTRY].list_apps(wanted)))


async def create_app(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.AppIn, await _body(request))
    created = await request.app[REGISTRY].create_app(data)
    return _json(dump(created), 201, f"/admin/v1/apps/{created.id}")


async def get_app(request: web.Request, principal: AdminPrincipal) -> web.Response:
    app = await request.app[REGISTRY].get_app(request.match_info["id"])
    _own(principal, app.licensee_id, f"app {app.id}")
    return _json(dump(app))


async def rotate_app_secret(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.SecretRotationIn, await _body(request))
    rotated = await request.app[REGISTRY].rotate_app_secret(request.match_info["id"], data.overlap_seconds)
    return _json(dump(rotated))


async def set_app_jwks(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.AppJwksIn, await _body(request))
    return _json(dump(await request.app[REGISTRY].set_app_jwks(request.match_info["id"], data)))


def _app_switch(enabled: bool) -> Handler:
    async def handler(request: web.Request, principal: AdminPrincipal) -> web.Response:
        return _json(dump(await request.app[REGISTRY].set_app_enabled(request.match_info["id"], enabled)))

    handler.__name__ = "enable_app" if enabled else "disable_app"
    return handler


# -- signing keys ---------------------------------------------------------------


def _key_store(request: web.Request) -> KeyStore:
    store = request.app.get(KEYS)
    if store is None:
        raise ConflictError(FILE_KEYS)
    return store


def _key_out(info: KeyInfo) -> dict[str, Any]:
    return schemas.SigningKeyInfo.model_validate(info.as_dict()).model_dump(mode="json")


async def list_keys(request: web.Request, principal: AdminPrincipal) -> web.Response:
    return _json([_key_out(info) for info in await _key_store(request).listing()])


async def rotate_keys(request: web.Request, principal: AdminPrincipal) -> web.Response:
    data = schemas.parse(schemas.KeyRotationIn, await _body(request))
    store = _key_store(request)
    key = await store.rotate(data.algorithm or request.app[SETTINGS].tokens.algorithm)
    # This replica signs with it at once; the others within a refresh.
    await request.app[TOKENS].refresh_keys(force=True)
    info = next(info for info in await store.listing() if info.kid == key.kid)
    return _json(_key_out(info))


# -- call records ---------------------------------------------------------------


async def get_call(request: web.Request, principal: AdminPrincipal) -> web.Response:
    call_id = request.match_info["id"]
    record = await audit.get_call(request.app[ENGINE], call_id)
    if record is None or principal.own_licensee not in (None, record["licensee_id"]):
        raise NotFoundError(f"no call {call_id}")
    return _json(record)


async def list_calls(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """Oldest first (by ``seq``): pages stay put while new calls are appended.
    The next page is ``after=<seq of the last call>``, also given as a ``Link``
    header (``rel="next"``) when there is one."""
    query = audit.CallQuery.from_params(request.query)
    if principal.own_licensee is not None:
        if query.licensee not in (None, principal.own_licensee):
            return _json([])
        query = replace(query, licensee=principal.own_licensee)
    page = await audit.find_calls(request.app[ENGINE], query)
    response = _json(page.calls)
    if page.next_after is not None:
        response.headers["Link"] = f'<{request.rel_url.update_query(after=page.next_after)}>; rel="next"'
    return response


async def list_admin_log(request: web.Request, principal: AdminPrincipal) -> web.Response:
    """The admin audit log, oldest first; the next page is ``after=<seq of
    the last entry>``."""
    after = audit.parse_int(request.query.get("after", "0"), "after", 0, 2**62)
    limit = audit.parse_int(request.query.get("limit", "100"), "limit", 1, audit.MAX_PAGE)
    return _json(await admin_log.read(request.app[ENGINE], after=after, limit=limit))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/datasets", list_datasets, "read", "List datasets", None, schemas.Dataset, True),
    Route(
        "POST",
        "/datasets",
        create_dataset,
        "catalogue:write",
        "Create a dataset",
        schemas.DatasetIn,
        schemas.Dataset,
        status=201,
        conflict=True,
    ),
    Route("GET", "/datasets/{id}", get_dataset, "read", "Get a dataset", None, schemas.Dataset),
    Route(
        "PATCH",
        "/datasets/{id}",
        patch_dataset,
        "catalogue:write",
        "Change a dataset",
        schemas.DatasetPatch,
        schemas.Dataset,
    ),
    Route(
        "GET",
        "/datasets/{id}/terms",
        list_terms,
        "read",
        "List the versions of a dataset's terms (prices, tiers, revenue split)",
        None,
        schemas.Terms,
        True,
    ),
    Route("GET", "/licensees", list_licensees, "read", "List licensees", None, schemas.Licensee, True),
    Route(
        "POST",
        "/licensees",
        create_licensee,
        "licensing:write",
        "Register a licensee",
        schemas.LicenseeIn,
        schemas.Licensee,
        status=201,
        conflict=True,
    ),
    Route("GET", "/licensees/{id}", get_licensee, "read", "Get a licensee", None, schemas.Licensee),
    Route(
        "GET",
        "/licences",
        list_licences,
        "read",
        "List licences",
        None,
        schemas.Licence,
        True,
        query=("licensee",),
    ),
    Route(
        "POST",
        "/licences",
        create_licence,
        "licensing:write",
        "Issue a licence",
        schemas.LicenceIn,
        schemas.Licence,
        status=201,
        conflict=True,
    ),
    Route("GET", "/licences/{id}", get_licence, "read", "Get a licence", None, schemas.Licence),
    Route(
        "PATCH",
        "/licences/{id}",
        patch_licence,
        "licensing:write",
        "Change a licence's grant or terms (a top-up raises paid; counters are never touched)",
        schemas.LicencePatch,
        schemas.Licence,
        conflict=True,
    ),
    Route(
        "POST",
        "/licences/{id}/top-ups",
        top_up_licence,
        "billing:write",
        "Buy prepaid calls for a licence with prepaid terms: its limit rises by them, and an invoice for "
        "calls x the unit price paid (the licence's prepaid_unit_price_fen unless given) is issued at once",
        schemas.TopUpIn,
        schemas.TopUp,
        status=201,
        conflict=True,
    ),
    Route(
        "GET",
        "/licences/{id}/top-ups",
        list_top_ups,
        "read",
        "A licence's top-ups",
        None,
        schemas.TopUp,
        True,
    ),
    Route(
        "GET",
        "/licences/{id}/prepaid",
        prepaid_balance,
        "read",
        "A prepaid licence's balance as the call record holds it: calls used and left, and per top-up "
        "calls used and left and what is left in money",
        None,
        billing_schemas.PrepaidBalance,
    ),
    Route(
        "POST",
        "/licences/{id}/suspend",
        _licence_action("suspend"),
        "licensing:write",
        "Suspend a licence (takes effect on the next call)",
        None,
        schemas.Licence,
        conflict=True,
    ),
    Route(
        "POST",
        "/licences/{id}/resume",
        _licence_action("resume"),
        "licensing:write",
        "Resume a suspended licence",
        None,
        schemas.Licence,
        conflict=True,
    ),
    Route(
        "POST",
        "/licences/{id}/revoke",
        _licence_action("revoke"),
        "licensing:write",
        "Revoke a licence (final)",
        None,
        schemas.Licence,
    ),
    Route("GET", "/apps", list_apps, "read", "List apps", None, schemas.App, True, query=("licensee",)),
    Route(
        "POST",
        "/apps",
        create_app,
        "licensing:write",
        "Register an app (returns client_secret once, or takes jwks for private_key_jwt)",
        schemas.AppIn,
        schemas.App,
        status=201,
        conflict=True,
    ),
    Route("GET", "/apps/{id}", get_app, "read", "Get an app", None, schemas.App),
    Route(
        "POST",
        "/apps/{id}/disable",
        _app_switch(False),
        "licensing:write",
        "Disable an app",
        None,
        schemas.App,
    ),
    Route(
        "POST", "/apps/{id}/enable", _app_switch(True), "licensing:write", "Enable an app", None, schemas.App
    ),
    Route(
        "POST",
        "/apps/{id}/rotate-secret",
        rotate_app_secret,
        "licensing:write",
        "A new client secret (returned once); the one before stays valid for overlap_seconds",
        schemas.SecretRotationIn,
        schemas.App,
        conflict=True,
    ),
    Route(
        "PUT",
        "/apps/{id}/jwks",
        set_app_jwks,
        "licensing:write",
        "Replace the public keys of an app that authenticates with private_key_jwt (409 for one with a "
        "client secret)",
        schemas.AppJwksIn,
        schemas.App,
        conflict=True,
    ),
    Route(
        "GET",
        "/keys",
        list_keys,
        "read",
        "The token-signing keys",
        None,
        schemas.SigningKeyInfo,
        True,
        conflict=True,
    ),
    Route(
        "POST",
        "/keys/rotate",
        rotate_keys,
        "keys:write",
        "A new signing key, active on every replica at once; the one before verifies until leaves_jwks_at",
        schemas.KeyRotationIn,
        schemas.SigningKeyInfo,
        conflict=True,
    ),
    Route(
        "GET",
        "/usage",
        get_usage,
        "read",
        "Free and paid calls used and remaining, per licence, dataset and period (default: this period)",
        None,
        UsageRow,
        True,
        query=("licence", "dataset", "period", "licensee"),
    ),
    Route(
        "GET",
        "/calls",
        list_calls,
        "read",
        "Call records, oldest first; from inclusive, to exclusive (RFC 3339); "
        "next page: after=<seq of the last one>, also in the Link header",
        None,
        audit.CallRecord,
        True,
        query=("licensee", "dataset", "from", "to", "request_id", "limit", "after"),
    ),
    Route("GET", "/calls/{id}", get_call, "read", "One call record, by call id", None, audit.CallRecord),
    Route(
        "GET",
        "/admin-log",
        list_admin_log,
        "audit:read",
        "The admin audit log (who changed what, before and after), oldest first; "
        "next page: after=<seq of the last one>",
        None,
        admin_log.AdminLogEntry,
        True,
        query=("after", "limit"),
    ),
    Route(
        "POST",
        "/billing/{period}/close",
        close_billing_period,
        "billing:write",
        "Close a period that has ended for review: its invoices are drafts, computed from the call "
        "record when read (201; again: the drafts as they are now). issue=true issues them at once. "
        "An issued period answers its invoices, unchanged (200). It first moves what waits in the "
        "call-record log and waits for the period's calls in flight; if it cannot, it is refused and "
        "writes nothing (409 while calls stay in flight, 503 ledger-unavailable when the log cannot be "
        "reached), unless allow_pending=true: then it closes and lists what was left in pending",
        None,
        billing_schemas.ClosedPeriod,
        status=201,
        query=("allow_pending", "issue"),
        conflict=True,
        also_status=(200,),
    ),
    Route(
        "POST",
        "/billing/{period}/issue",
        issue_billing_period,
        "billing:write",
        "Issue a period closed for review: its drafts made final, numbered and signed into the billing "
        "register (201); an issued period answers its invoices (200). drafts_hash: refused (409) if the "
        "drafts changed since they were reviewed",
        billing_schemas.IssueIn,
        billing_schemas.ClosedPeriod,
        status=201,
        query=("allow_pending",),
        conflict=True,
        also_status=(200,),
    ),
    Route(
        "GET",
        "/billing/{period}/export",
        export_billing,
        "read",
        "A period's invoices (each line with calls and split) and the notes issued in it, "
        "as a file: format=json (default), csv or xlsx",
        response_model=billing_schemas.BillingExport,
        query=("format", "licensee"),
        produces=tuple(EXPORT_MEDIA_TYPES.values()),
    ),
    *(
        Route(
            "GET",
            f"/billing/{{period}}/{kind}",
            handler,
            "read",
            what,
            response_model=model,
            query=("format",),
            produces=tuple(EXPORT_MEDIA_TYPES.values()),
        )
        for kind, handler, what, model in (
            (
                "summary",
                billing_summary,
                "A period across licensees: invoices, notes issued in it, totals, net revenue split",
                billing_schemas.BillingSummary,
            ),
            (
                "payouts",
                billing_payouts,
                "A period per provider department and dataset: shares billed, net of its notes",
                billing_schemas.BillingPayouts,
            ),
        )
    ),
    Route(
        "GET",
        "/invoices",
        list_invoices_handler,
        "read",
        "Closed invoices, by id",
        None,
        billing_schemas.Invoice,
        True,
        query=("period", "licensee"),
    ),
    Route("GET", "/invoices/{id}", get_invoice_handler, "read", "One invoice", None, billing_schemas.Invoice),
    Route(
        "POST",
        "/invoices/{id}/payments",
        record_payment_handler,
        "billing:write",
        "Record a payment received against an issued invoice: never more than its balance (409), "
        "paid on a day from its issue to today",
        billing_schemas.PaymentIn,
        billing_schemas.Payment,
        status=201,
        conflict=True,
    ),
    Route(
        "GET",
        "/invoices/{id}/payments",
        invoice_account_handler,
        "read",
        "An issued invoice's account today: owed with its notes, paid, balance, status, payments",
        None,
        billing_schemas.InvoiceAccount,
        conflict=True,
    ),
    Route(
        "GET",
        "/licensees/{id}/statement",
        statement_handler,
        "read",
        "A licensee's statement of account: invoices, notes and payments with a running balance "
        "(from_month/to_month: YYYY-MM; format=json or pdf)",
        None,
        billing_schemas.Statement,
        query=("from_month", "to_month", "format"),
        produces=("application/json", "application/pdf"),
    ),
    Route(
        "GET",
        "/billing/ageing",
        ageing_handler,
        "read",
        "Open balances per licensee by days past due (as_of: YYYY-MM-DD, default today)",
        None,
        billing_schemas.Ageing,
        query=("as_of",),
    ),
    Route(
        "GET",
        "/invoices/{id}/pdf",
        invoice_pdf_handler,
        "read",
        "One invoice as a PDF: lang=zh (default) or en",
        query=("lang",),
        produces=("application/pdf",),
    ),
    Route(
        "POST",
        "/invoices/{id}/notes",
        issue_note_handler,
        "billing:write",
        "Issue a credit or debit note on a closed invoice, in the current period; "
        "never more than the invoice (or line) allows (409)",
        billing_schemas.NoteIn,
        billing_schemas.Note,
        status=201,
        conflict=True,
    ),
    Route(
        "GET",
        "/invoices/{id}/notes",
        list_notes_handler,
        "read",
        "The credit and debit notes on an invoice, in order",
        None,
        billing_schemas.Note,
        True,
    ),
    Route(
        "GET",
        "/reconciliation/{period}",
        get_reconciliation,
        "billing:reconcile",
        "Reconcile a closed period: its invoices, the verified call record and the quota counters; "
        "every difference by call id and cause (clean: zero differences)",
        None,
        billing_schemas.ReconciliationReport,
        query=("limit",),
        conflict=True,
    ),
)


def _unstorable(value: str) -> bool:
    """NUL or a lone surrogate: text no database stores (PostgreSQL refuses it
    even as a query parameter), so no stored id or filter value equals it."""
    return "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value)


def _unmatchable(route: Route, request: web.Request) -> web.Response | None:
    """Answer a request naming text no database can hold without asking one,
    as the registry answers an impossible id: an ``{id}`` is not found, a list
    filtered by such a value is empty, and any other query value is a 400."""
    if _unstorable(request.match_info.get("id", "")):
        raise NotFoundError("no such resource")
    for name, value in request.query.items():
        if _unstorable(value):
            if route.response_list:
                return _json([])
            raise ValidationFailedError(name, "text must be valid Unicode without NUL characters")
    return None


async def admin_principal(request: web.Request) -> AdminPrincipal:
    """The admin token's principal; failed checks are throttled per token id
    and per address (``gateway.throttle``)."""
    authorization = request.headers.get("Authorization")
    tokens, throttle = request.app[ADMIN_TOKENS], request.app[THROTTLE]
    claimed = tokens.claimed_id(authorization)
    address = client_address(request, request.app[SETTINGS].server.trusted_proxies)
    await throttle.check("admin", claimed, address)
    try:
        return await tokens.authenticate(authorization)
    except AdminAuthError:
        if authorization:  # a credential was tried (not merely left out)
            await throttle.failed("admin", claimed, address)
        raise


def _wrap(route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        principal = await admin_principal(request)
        principal.require(route.permission)
        with admin_log.acting_as(f"admin-token:{principal.token_id} ({principal.role})"):
            return _unmatchable(route, request) or await route.handler(request, principal)

    return handler


async def openapi_document(request: web.Request) -> web.Response:
    return _json(build_openapi(ROUTES))


def setup(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, "/admin/v1" + route.path, _wrap(route))
    app.router.add_get("/admin/v1/openapi.json", openapi_document)
