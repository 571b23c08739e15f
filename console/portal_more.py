"""The developer portal's public keys, invoices and statement
(``/console/portal/...``), for a licensee's developers: their own licensee's
only; another licensee's app or invoice answers 404, as one that does not
exist.

- **Public keys**: an app that authenticates with ``private_key_jwt`` takes
  a JWK Set of public keys when it is registered (``Registry.create_app``)
  and has it replaced later (``Registry.set_app_jwks``, logged as
  ``app.set-jwks``); the private keys never reach the gateway.
- **Invoices**: the licensee's invoices as the admin API lists them for a
  licensee-scoped token (the drafts of a period closed for review too),
  each with its lines and totals, and its PDF (``billing.pdf``).
- **Statement**: ``billing.payments.statement`` for the months asked for
  (``from_month``/``to_month``, ``YYYY-MM``), on the page or as a PDF.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from billing import payments
from billing.invoices import get_invoice, list_invoices
from billing.pdf import LANGS as PDF_LANGUAGES
from billing.pdf import cny, invoice_pdf, statement_pdf
from console.i18n import translator
from console.users import ConsolePrincipal
from console.web import LANG, _developer, _own_app, _registry, _settings, redirect, render
from core.actor import acting_as
from core.errors import NotFoundError, ValidationFailedError
from gateway.state import CATALOGUE, CLOCK, ENGINE
from licensing import schemas
from licensing.registry import dump
from metering.periods import zone

PREFIX = "/console/portal"
#: The largest JWK Set text a form may carry.
MAX_JWKS_CHARS = 64 * 1024
#: What a key's listing shows of it (all public).
KEY_FIELDS = ("kid", "kty", "crv", "alg", "use")


def _own(request: web.Request) -> tuple[ConsolePrincipal, str]:
    user = _developer(request)
    assert user.licensee_id is not None  # noqa: S101 - _developer checked it
    return user, user.licensee_id


def _jwks_of(text: str) -> dict[str, Any]:
    """The JWK Set pasted into a form (checked as the admin API checks it)."""
    if len(text) > MAX_JWKS_CHARS:
        raise ValidationFailedError("jwks", f"at most {MAX_JWKS_CHARS} characters")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValidationFailedError("jwks", f"not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise ValidationFailedError("jwks", 'a JSON object, {"keys": [...]}')
    return value


# -- public keys -------------------------------------------------------------------


async def key_app_new_page(request: web.Request) -> web.StreamResponse:
    _own(request)
    t = translator(request[LANG])
    return render(
        request, "portal_more_key_app.html", error=None, name="", jwks="", title=t("portal.new_app_key")
    )


async def key_app_create(request: web.Request) -> web.StreamResponse:
    """Register an app that authenticates with ``private_key_jwt``."""
    user, licensee_id = _own(request)
    form = await request.post()
    name = str(form.get("name", "")).strip()
    text = str(form.get("jwks", "")).strip()
    try:
        data = schemas.parse(
            schemas.AppIn, {"licensee_id": licensee_id, "name": name, "jwks": _jwks_of(text)}
        )
        with acting_as(user.actor):
            created = await _registry(request).create_app(data)
    except ValidationFailedError as exc:
        t = translator(request[LANG])
        return render(
            request,
            "portal_more_key_app.html",
            status=400,
            error=exc.detail,
            name=name,
            jwks=text,
            title=t("portal.new_app_key"),
        )
    return redirect(f"{PREFIX}/apps/{created.id}/jwks?done=created")


def _keys(request: web.Request, app_id: str) -> list[dict[str, str]]:
    """The app's public keys as the licence view holds them (current: every
    change reloads it)."""
    view = request.config_dict[CATALOGUE].current.apps.get(app_id)
    found = (view.jwks or {}).get("keys", []) if view is not None else []
    return [{name: str(key.get(name, "")) for name in KEY_FIELDS} for key in found if isinstance(key, dict)]


def _jwks_page(
    request: web.Request, app: dict[str, Any], *, status: int = 200, error: str | None = None, text: str = ""
) -> web.Response:
    t = translator(request[LANG])
    done = request.query.get("done")
    return render(
        request,
        "portal_more_jwks.html",
        status=status,
        app=app,
        keys=_keys(request, app["id"]),
        error=error,
        jwks=text,
        notice={"replaced": t("portal.jwks_done"), "created": t("portal.jwks_created")}.get(done or ""),
        title=f"{t('portal.jwks')} · {app['name']}",
    )


async def jwks_page(request: web.Request) -> web.StreamResponse:
    user, _ = _own(request)
    return _jwks_page(request, await _own_app(request, user))


async def jwks_replace(request: web.Request) -> web.StreamResponse:
    user, _ = _own(request)
    found = await _own_app(request, user)
    form = await request.post()
    text = str(form.get("jwks", "")).strip()
    try:
        data = schemas.parse(schemas.AppJwksIn, {"jwks": _jwks_of(text)})
        with acting_as(user.actor):
            await _registry(request).set_app_jwks(found["id"], data)
    except ValidationFailedError as exc:
        return _jwks_page(request, found, status=400, error=exc.detail, text=text)
    return redirect(f"{PREFIX}/apps/{found['id']}/jwks?done=replaced")


# -- invoices and statement --------------------------------------------------------


async def _own_invoice(request: web.Request, licensee_id: str) -> dict[str, Any]:
    wanted = request.match_info["id"]
    invoice = await get_invoice(request.config_dict[ENGINE], wanted, _settings(request))
    if invoice is None or invoice["licensee_id"] != licensee_id:
        raise NotFoundError(f"no invoice {wanted[:80]}")
    return invoice


async def invoices_page(request: web.Request) -> web.StreamResponse:
    _, licensee_id = _own(request)
    found = await list_invoices(
        request.config_dict[ENGINE], licensee_id=licensee_id, settings=_settings(request)
    )
    found.sort(key=lambda inv: (inv["period"], inv["id"]), reverse=True)
    t = translator(request[LANG])
    licensee = dump(await _registry(request).get_licensee(licensee_id))
    return render(
        request,
        "portal_more_invoices.html",
        invoices=found,
        licensee=licensee,
        cny=cny,
        title=t("dev_billing.invoices"),
    )


async def invoice_page(request: web.Request) -> web.StreamResponse:
    _, licensee_id = _own(request)
    invoice = await _own_invoice(request, licensee_id)
    t = translator(request[LANG])
    return render(
        request,
        "portal_more_invoice.html",
        inv=invoice,
        cny=cny,
        title=f"{t('dev_billing.invoice')} {invoice.get('number') or invoice['id']}",
    )


async def invoice_pdf_download(request: web.Request) -> web.StreamResponse:
    _, licensee_id = _own(request)
    lang = request.query.get("lang", request[LANG])
    if lang not in PDF_LANGUAGES:
        raise ValidationFailedError("lang", f"one of {', '.join(PDF_LANGUAGES)}")
    invoice = await _own_invoice(request, licensee_id)
    zone_name = _settings(request).billing.time_zone
    body = await asyncio.to_thread(invoice_pdf, invoice, lang=lang, time_zone=zone_name)
    name = invoice.get("number") or invoice["id"]
    return web.Response(
        body=body,
        headers={
            "Content-Type": "application/pdf",
            "Content-Disposition": f'inline; filename="{name}.pdf"',
        },
    )


async def _statement(request: web.Request, licensee_id: str) -> dict[str, Any]:
    settings = _settings(request)
    return await payments.statement(
        request.config_dict[ENGINE],
        licensee_id,
        from_period=request.query.get("from_month") or None,
        to_period=request.query.get("to_month") or None,
        now=request.config_dict[CLOCK].now(),
        tz=zone(settings.billing.time_zone),
        payment_terms_days=settings.billing.payment_terms_days,
    )


async def statement_page(request: web.Request) -> web.StreamResponse:
    _, licensee_id = _own(request)
    found = await _statement(request, licensee_id)
    t = translator(request[LANG])
    return render(
        request,
        "portal_more_statement.html",
        s=found,
        from_month=request.query.get("from_month", ""),
        to_month=request.query.get("to_month", ""),
        pdf_query=request.rel_url.query_string,
        cny=cny,
        title=t("dev_billing.statement"),
    )


async def statement_pdf_download(request: web.Request) -> web.StreamResponse:
    _, licensee_id = _own(request)
    found = await _statement(request, licensee_id)
    zone_name = _settings(request).billing.time_zone
    body = await asyncio.to_thread(statement_pdf, found, time_zone=zone_name)
    return web.Response(
        body=body,
        headers={
            "Content-Type": "application/pdf",
            "Content-Disposition": f'inline; filename="statement-{licensee_id}.pdf"',
        },
    )


def add_routes(routes: web.UrlDispatcher) -> None:
    """The portal's keys, invoices and statement pages."""
    routes.add_get("/portal/keys/new", key_app_new_page)
    routes.add_post("/portal/keys", key_app_create)
    routes.add_get("/portal/apps/{id}/jwks", jwks_page)
    routes.add_post("/portal/apps/{id}/jwks", jwks_replace)
    routes.add_get("/portal/invoices", invoices_page)
    routes.add_get("/portal/invoices/{id}", invoice_page)
    routes.add_get("/portal/invoices/{id}/pdf", invoice_pdf_download)
    routes.add_get("/portal/statement", statement_page)
    routes.add_get("/portal/statement/pdf", statement_pdf_download)
