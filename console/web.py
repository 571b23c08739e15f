"""The console's pages and forms, mounted under ``/console/`` on the
gateway's application (the decisions are in ``console``'s docstring).

Handlers call the service layer the admin API calls (``Registry``,
``usage_report``), inside ``acting_as`` the signed-in user, so the admin
audit log names who made each change.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import date, datetime, time
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from multidict import MultiDictProxy
from sqlalchemy import exc as sa_exc

from config.settings import Settings
from console.i18n import LANGUAGES, translator
from console.users import ConsolePrincipal, ConsoleUsers
from core.actor import acting_as
from core.errors import (
    ConflictError,
    ForbiddenError,
    GatewayError,
    NotFoundError,
    ValidationFailedError,
)
from gateway.state import CATALOGUE, CLOCK, ENGINE, REDIS, REGISTRY, SESSIONS, SETTINGS, THROTTLE
from gateway.throttle import client_address
from ledger import admin_log
from licensing import schemas
from licensing.registry import Registry, dump
from metering.periods import period_of, zone
from metering.quota import QuotaStoreError
from metering.usage import usage_report
from storage.db import utcnow

PREFIX = "/console"
SESSION_COOKIE = "pdg_console"
LOGIN_COOKIE = "pdg_console_login"
LANG_COOKIE = "pdg_console_lang"
LOGIN_COOKIE_SECONDS = 600
LANG_COOKIE_SECONDS = 365 * 86400
ACTIONS = ("suspend", "resume", "revoke")
#: The licence actions each stored status allows.
_ALLOWED_ACTIONS = {"active": ("suspend", "revoke"), "suspended": ("resume", "revoke"), "revoked": ()}

TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
USER = web.RequestKey("console_user", ConsolePrincipal)
LANG = web.RequestKey("console_lang", str)
CSRF = web.RequestKey("console_csrf", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)

#: A store out of reach (as ``gateway.problems`` sees it): a 503 page.
_OUT_OF_REACH = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    OSError,
    TimeoutError,
)

_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def csrf_of(secret: str) -> str:
    """The synchronizer token of a session (or sign-in cookie): nothing to
    store, nothing a page of another origin can compute."""
    return hmac.new(secret.encode(), b"pdg-console-csrf", hashlib.sha256).hexdigest()


def _settings(request: web.Request) -> Settings:
    return request.config_dict[SETTINGS]


def _users(request: web.Request) -> ConsoleUsers:
    return ConsoleUsers(request.config_dict[SESSIONS], _settings(request).console)


def _registry(request: web.Request) -> Registry:
    return request.config_dict[REGISTRY]


def _secure(request: web.Request) -> bool:
    settings = _settings(request)
    return (
        settings.console.secure_cookies or request.secure or settings.server.public_url.startswith("https://")
    )


def _set_cookie(
    request: web.Request,
    response: web.StreamResponse,
    name: str,
    value: str,
    *,
    max_age: int | None = None,
    samesite: str = "Strict",
) -> None:
    response.set_cookie(
        name,
        value,
        path=f"{PREFIX}/",
        max_age=max_age,
        httponly=True,
        samesite=samesite,
        secure=_secure(request),
    )


def _forget_cookie(request: web.Request, response: web.StreamResponse, name: str) -> None:
    _set_cookie(request, response, name, "", max_age=0)


def _environment(tz_name: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    tz = zone(tz_name)

    def when(value: Any) -> str:
        """A time as the billing time zone reads it (``YYYY-MM-DD HH:MM``)."""
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if not isinstance(value, datetime):
            return "—" if value is None else str(value)
        return value.astimezone(tz).strftime("%Y-%m-%d %H:%M")

    env.filters["when"] = when
    return env


def redirect(location: str) -> web.Response:
    """303 See Other: after a form, the next page is fetched with GET."""
    return web.Response(status=303, headers={"Location": location})


def render(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    lang = request.get(LANG, "zh")
    other = "en" if lang == "zh" else "zh"
    lang_href = (
        str(request.rel_url.update_query(lang=other))
        if request.method == "GET"
        else f"{PREFIX}/?lang={other}"
    )
    page = (
        request.config_dict[TEMPLATES]
        .get_template(template)
        .render(
            t=translator(lang),
            lang=lang,
            lang_href=lang_href,
            user=request.get(USER),
            csrf=request.get(CSRF, ""),
            notice=context.pop("notice", None),
            title=context.pop("title", ""),
            **context,
        )
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def _error_page(request: web.Request, status: int, detail: str = "") -> web.Response:
    t = translator(request.get(LANG, "zh"))
    heading = t(f"error.{status}") if status in (400, 403, 404, 405, 409, 429, 503) else t("error.other")
    return render(
        request,
        "error.html",
        status=status,
        status_code=status,
        heading=heading,
        detail=detail,
        title=heading,
    )


# -- middleware -------------------------------------------------------------------


def _same_origin(request: web.Request) -> bool:
    """A POST's ``Origin`` (when sent) is this console's."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    allowed = {request.host}
    public = _settings(request).server.public_url
    if public:
        allowed.add(urlsplit(public).netloc)
    return urlsplit(origin).netloc in allowed


async def _csrf_ok(request: web.Request) -> bool:
    if not _same_origin(request):
        return False
    form = await request.post()
    token = form.get("csrf")
    cookie = LOGIN_COOKIE if request.path == f"{PREFIX}/login" else SESSION_COOKIE
    secret = request.cookies.get(cookie)
    return isinstance(token, str) and bool(secret) and hmac.compare_digest(token, csrf_of(secret or ""))


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    wanted = request.query.get("lang")
    chosen = wanted if wanted in LANGUAGES else request.cookies.get(LANG_COOKIE)
    request[LANG] = chosen if chosen in LANGUAGES else "zh"
    response: web.StreamResponse
    try:
        if not request.path.startswith(f"{PREFIX}/static/"):
            await _load_user(request)
            if request.method == "POST" and not await _csrf_ok(request):
                raise ForbiddenError("the form was not sent from this console's page (CSRF check failed)")
        response = await handler(request)
    except web.HTTPRedirection as exc:
        response = web.Response(status=exc.status, headers={"Location": exc.headers.get("Location", "")})
    except web.HTTPException as exc:
        response = _error_page(request, exc.status, exc.reason if exc.status != 404 else "")
    except ValidationFailedError as exc:
        response = _error_page(request, 400, exc.detail)
    except GatewayError as exc:
        response = _error_page(request, exc.status, exc.detail)
        for key, value in exc.headers.items():
            if key == "Retry-After":
                response.headers[key] = value
    except _OUT_OF_REACH as exc:
        log.warning("%s %s: a store is out of reach: %s", request.method, request.path, type(exc).__name__)
        response = _error_page(request, 503, "the database is out of reach; try again shortly")
        response.headers["Retry-After"] = "5"
    if wanted in LANGUAGES:
        _set_cookie(request, response, LANG_COOKIE, str(wanted), max_age=LANG_COOKIE_SECONDS, samesite="Lax")
    if not request.path.startswith(f"{PREFIX}/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


async def _load_user(request: web.Request) -> None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 200:
        return
    request[CSRF] = csrf_of(token)
    principal = await _users(request).principal(token, utcnow())
    if principal is not None:
        request[USER] = principal


def _next_page(value: Any) -> str:
    """Where to go after signing in: a console page, never another site."""
    if (
        isinstance(value, str)
        and value.startswith(f"{PREFIX}/")
        and "\\" not in value
        and len(value) < 500
        and all(c.isprintable() for c in value)
    ):
        return value
    return f"{PREFIX}/"


def _signed_in(request: web.Request) -> ConsolePrincipal:
    user: ConsolePrincipal | None = request.get(USER)
    if user is None:
        if request.method == "GET":
            raise web.HTTPSeeOther(f"{PREFIX}/login?next={quote(request.path_qs, safe='/')}")
        raise ForbiddenError("signed out: sign in again")
    return user


def _staff(request: web.Request) -> ConsolePrincipal:
    user = _signed_in(request)
    if not user.staff:
        raise ForbiddenError("this page is the operating company's")
    return user


def _writer(request: web.Request) -> ConsolePrincipal:
    user = _staff(request)
    if not user.licensing_writer:
        raise ForbiddenError(f"role {user.role} may not change licences")
    return user


def _developer(request: web.Request) -> ConsolePrincipal:
    user = _signed_in(request)
    if user.licensee_id is None:
        raise ForbiddenError("the developer portal is for licensees' developers")
    return user


# -- signing in and out -------------------------------------------------------------


async def login_page(request: web.Request) -> web.StreamResponse:
    if request.get(USER) is not None:
        raise web.HTTPSeeOther(_next_page(request.query.get("next")))
    return _login_form(request, failed=False, username="", next_page=_next_page(request.query.get("next")))


def _login_form(request: web.Request, *, failed: bool, username: str, next_page: str) -> web.Response:
    secret = secrets.token_urlsafe(32)
    request[CSRF] = csrf_of(secret)
    t = translator(request.get(LANG, "zh"))
    response = render(
        request,
        "login.html",
        status=401 if failed else 200,
        failed=failed,
        username=username,
        next=next_page,
        title=t("login.title"),
    )
    _set_cookie(request, response, LOGIN_COOKIE, secret, max_age=LOGIN_COOKIE_SECONDS)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    username = str(form.get("username", ""))[:64]
    password = str(form.get("password", ""))[:1024]
    next_page = _next_page(form.get("next"))
    address = client_address(request, _settings(request).server.trusted_proxies)
    throttle = request.config_dict[THROTTLE]
    await throttle.check("console", username, address)
    result = await _users(request).sign_in(username, password, address=address, now=utcnow())
    if result.outcome == "failed" or result.token is None:
        await throttle.failed("console", username, address)
        return _login_form(request, failed=True, username=username, next_page=next_page)
    await _users(request).sweep(utcnow())  # sessions past their longest life, anyone's
    target = next_page if result.outcome == "ok" else f"{PREFIX}/login/totp?next={quote(next_page, safe='/')}"
    response = redirect(target)
    _set_cookie(request, response, SESSION_COOKIE, result.token)
    _forget_cookie(request, response, LOGIN_COOKIE)
    return response


async def totp_page(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(SESSION_COOKIE, "")
    if not token or await _users(request).pending_user(token, utcnow()) is None:
        raise web.HTTPSeeOther(f"{PREFIX}/login")
    t = translator(request.get(LANG, "zh"))
    next_page = _next_page(request.query.get("next"))
    return render(request, "totp.html", failed=False, next=next_page, title=t("totp.title"))


async def totp(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = request.cookies.get(SESSION_COOKIE, "")
    next_page = _next_page(form.get("next"))
    address = client_address(request, _settings(request).server.trusted_proxies)
    users = _users(request)
    username = await users.pending_user(token, utcnow()) if token else None
    if username is None:
        raise web.HTTPSeeOther(f"{PREFIX}/login")
    throttle = request.config_dict[THROTTLE]
    await throttle.check("console", username, address)
    result = await users.verify_totp(token, str(form.get("code", ""))[:16], address=address, now=utcnow())
    if result.outcome != "ok" or result.token is None:
        await throttle.failed("console", username, address)
        if await users.pending_user(token, utcnow()) is None:
            raise web.HTTPSeeOther(f"{PREFIX}/login")
        t = translator(request.get(LANG, "zh"))
        return render(request, "totp.html", status=401, failed=True, next=next_page, title=t("totp.title"))
    response = redirect(next_page)
    _set_cookie(request, response, SESSION_COOKIE, result.token)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    token = request.cookies.get(SESSION_COOKIE)
    user: ConsolePrincipal | None = request.get(USER)
    if token and user is not None:
        await _users(request).sign_out(token, user.username)
    response = redirect(f"{PREFIX}/login")
    _forget_cookie(request, response, SESSION_COOKIE)
    return response


# -- the operating company ----------------------------------------------------------


async def home(request: web.Request) -> web.StreamResponse:
    user = _signed_in(request)
    if not user.staff:
        raise web.HTTPSeeOther(f"{PREFIX}/portal/")
    registry = _registry(request)
    licences = await registry.list_licences()
    counts = {
        "datasets": len(await registry.list_datasets()),
        "licensees": len(await registry.list_licensees()),
        "active": sum(1 for lic in licences if lic.status == "active"),
        "apps": len(await registry.list_apps()),
    }
    from console.overview import overview_page  # the charts and the ledger's state

    return await overview_page(request, counts)


async def datasets_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    t = translator(request[LANG])
    found = dump(await _registry(request).list_datasets())
    return render(request, "datasets.html", datasets=found, title=t("datasets.title"))


async def dataset_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    registry = _registry(request)
    dataset_id = request.match_info["id"]
    found = dump(await registry.get_dataset(dataset_id))
    terms = dump(await registry.list_terms(dataset_id))
    return render(request, "dataset.html", d=found, terms=terms, title=found["name"])


async def licensees_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    t = translator(request[LANG])
    found = dump(await _registry(request).list_licensees())
    return render(request, "licensees.html", licensees=found, title=t("licensees.title"))


async def licensee_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    registry = _registry(request)
    licensee_id = request.match_info["id"]
    found = dump(await registry.get_licensee(licensee_id))
    return render(
        request,
        "licensee.html",
        l=found,
        licences=dump(await registry.list_licences(licensee_id)),
        apps=dump(await registry.list_apps(licensee_id)),
        title=found["name"],
    )


async def licences_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    t = translator(request[LANG])
    found = dump(await _registry(request).list_licences(request.query.get("licensee")))
    return render(request, "licences.html", licences=found, title=t("licences.title"))


async def apps_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    t = translator(request[LANG])
    found = dump(await _registry(request).list_apps(request.query.get("licensee")))
    return render(request, "apps.html", apps=found, title=t("apps.title"))


async def licence_page(request: web.Request) -> web.StreamResponse:
    _staff(request)
    licence = await _registry(request).get_licence(request.match_info["id"])
    t = translator(request[LANG])
    done = request.query.get("done")
    return render(
        request,
        "licence.html",
        lic=dump(licence),
        actions=_ALLOWED_ACTIONS.get(licence.stored_status, ()),
        notice=t(f"done.{done}") if done in (*ACTIONS, "issue") else None,
        title=f"{t('licence.title')} {licence.id}",
    )


def _licence_form(data: MultiDictProxy[Any] | None, licensee: str | None = None) -> dict[str, Any]:
    if data is None:
        today = utcnow().date()
        return {
            "licensee_id": licensee or "",
            "datasets": [],
            "max_classification": "2",
            "purposes": ["public-interest"],
            "valid_from": today.isoformat(),
            "valid_until": today.replace(year=today.year + 1).isoformat(),
            "security_officer": "",
            "conditions": "",
            "free_monthly_calls": "",
            "prepaid_calls": "",
            "credit_limit_fen": "",
        }
    form: dict[str, Any] = {
        name: str(data.get(name, ""))
        for name in (
            "licensee_id",
            "max_classification",
            "valid_from",
            "valid_until",
            "security_officer",
            "conditions",
            "free_monthly_calls",
            "prepaid_calls",
            "credit_limit_fen",
        )
    }
    form["datasets"] = [str(v) for v in data.getall("datasets", [])]
    form["purposes"] = [str(v) for v in data.getall("purposes", [])]
    return form


async def _licence_form_page(
    request: web.Request, form: dict[str, Any], error: str | None = None
) -> web.Response:
    registry = _registry(request)
    t = translator(request[LANG])
    return render(
        request,
        "licence_new.html",
        status=400 if error else 200,
        form=form,
        error=error,
        licensees=dump(await registry.list_licensees()),
        datasets=dump(await registry.list_datasets()),
        zone=_settings(request).billing.time_zone,
        title=t("licences.issue"),
    )


async def licence_new_page(request: web.Request) -> web.StreamResponse:
    _writer(request)
    return await _licence_form_page(request, _licence_form(None, request.query.get("licensee")))


def _day_start(value: str, field: str, tz_name: str) -> str:
    try:
        day = date.fromisoformat(value)
    except ValueError as exc:
        raise ValidationFailedError(field, "a date, YYYY-MM-DD") from exc
    return datetime.combine(day, time(), zone(tz_name)).isoformat()


def _whole(value: str, field: str) -> int | None:
    if not value.strip():
        return None
    try:
        return int(value.strip())
    except ValueError as exc:
        raise ValidationFailedError(field, "a whole number") from exc


async def licence_create(request: web.Request) -> web.StreamResponse:
    user = _writer(request)
    form = _licence_form(await request.post())
    tz_name = _settings(request).billing.time_zone
    try:
        payload: dict[str, Any] = {
            "licensee_id": form["licensee_id"],
            "datasets": form["datasets"],
            "max_classification": _whole(form["max_classification"], "max_classification"),
            "purposes": form["purposes"],
            "valid_from": _day_start(form["valid_from"], "valid_from", tz_name),
            "valid_until": _day_start(form["valid_until"], "valid_until", tz_name),
            "security_officer": form["security_officer"],
            "conditions": form["conditions"],
            "free_monthly_calls": _whole(form["free_monthly_calls"], "free_monthly_calls"),
        }
        prepaid = _whole(form["prepaid_calls"], "prepaid_calls")
        credit = _whole(form["credit_limit_fen"], "credit_limit_fen")
        if prepaid is not None or credit is not None:
            payload["paid"] = {"prepaid_calls": prepaid, "credit_limit_fen": credit}
        data = schemas.parse(schemas.LicenceIn, payload)
        with acting_as(user.actor):
            created = await _registry(request).create_licence(data)
    except (ValidationFailedError, ConflictError) as exc:
        return await _licence_form_page(request, form, exc.detail)
    raise web.HTTPSeeOther(f"{PREFIX}/licences/{created.id}?done=issue")


def _action(request: web.Request) -> str:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise NotFoundError(f"no action {action[:20]!r}")
    return action


async def licence_action_page(request: web.Request) -> web.StreamResponse:
    _writer(request)
    action = _action(request)
    licence = await _registry(request).get_licence(request.match_info["id"])
    t = translator(request[LANG])
    return render(
        request,
        "licence_action.html",
        lic=dump(licence),
        action=action,
        error=None,
        title=t(f"action.{action}"),
    )


async def licence_action(request: web.Request) -> web.StreamResponse:
    """Suspend, resume or revoke, with the reason written to the admin audit
    log beside the change."""
    user = _writer(request)
    action = _action(request)
    registry = _registry(request)
    licence_id = request.match_info["id"]
    form = await request.post()
    reason = str(form.get("reason", "")).strip()[:500]
    t = translator(request[LANG])
    if not reason:
        licence = await registry.get_licence(licence_id)
        return render(
            request,
            "licence_action.html",
            status=400,
            lic=dump(licence),
            action=action,
            error=t("confirm.reason_required"),
            title=t(f"action.{action}"),
        )
    with acting_as(user.actor):
        changed = await registry.set_licence_status(licence_id, action)
        await _log_reason(request, f"licence.{action}.reason", changed.id, reason)
    raise web.HTTPSeeOther(f"{PREFIX}/licences/{changed.id}?done={action}")


async def _log_reason(request: web.Request, action: str, target: str, reason: str) -> None:
    """The reason for a change, as its own admin-log entry."""
    sessions = request.config_dict[SESSIONS]
    async with sessions() as session, session.begin():
        await admin_log.record(await session.connection(), action, target, after={"reason": reason})


# -- the developer portal -----------------------------------------------------------


def _covers(licence: dict[str, Any], dataset: dict[str, Any]) -> bool:
    grants = licence["datasets"]
    named = dataset["id"] in grants or f"{dataset['provider']}/*" in grants
    return bool(named and dataset["classification"] <= licence["max_classification"])


async def _own_datasets(request: web.Request, licensee_id: str) -> list[tuple[dict[str, Any], list[str]]]:
    """The datasets the licensee's licences cover, with the purposes granted."""
    registry = _registry(request)
    licences = [lic for lic in dump(await registry.list_licences(licensee_id)) if lic["status"] != "revoked"]
    found = []
    for dataset in dump(await registry.list_datasets()):
        purposes = sorted({p for lic in licences if _covers(lic, dataset) for p in lic["purposes"]})
        if purposes:
            for name in (
                "upstream_url",
                "upstream_pool",
                "upstream_tls",
                "timeout_seconds",
                "idle_timeout_seconds",
            ):
                dataset.pop(name, None)
            found.append((dataset, purposes))
    return found


async def portal(request: web.Request) -> web.StreamResponse:
    user = _developer(request)
    assert user.licensee_id is not None  # noqa: S101 - _developer checked it
    registry = _registry(request)
    licensee = dump(await registry.get_licensee(user.licensee_id))
    apps = dump(await registry.list_apps(user.licensee_id))
    settings = _settings(request)
    period = period_of(request.config_dict[CLOCK].now(), zone(settings.billing.time_zone))
    usage: list[dict[str, Any]] = []
    usage_error = False
    try:
        rows = await usage_report(
            request.config_dict[REDIS],
            request.config_dict[CATALOGUE].current,
            period,
            licensee_id=user.licensee_id,
        )
        usage = [row.model_dump(mode="json") for row in rows]
    except QuotaStoreError:
        usage_error = True
    t = translator(request[LANG])
    datasets = [d for d, _ in await _own_datasets(request, user.licensee_id)]
    from console.overview import charts, count_calls, window  # the overview's charts, of its own calls

    today = request.config_dict[CLOCK].now().astimezone(zone(settings.billing.time_zone)).date()
    first, last = window({}, today)
    async with request.config_dict[ENGINE].connect() as conn:
        counts = await count_calls(
            conn, first, last, settings.billing.time_zone, licensee_id=user.licensee_id
        )
    drawn = charts(t, counts, {d["id"]: d["name"] for d in datasets}, {})
    return render(
        request,
        "portal.html",
        licensee=licensee,
        apps=apps,
        usage=usage,
        usage_error=usage_error,
        period=period.name,
        datasets=datasets,
        usage_charts=[drawn["calls"], drawn["pools"]],
        title=t("portal.title"),
    )


async def _own_app(request: web.Request, user: ConsolePrincipal) -> dict[str, Any]:
    app_id = request.match_info["id"]
    found = await _registry(request).get_app(app_id)
    if found.licensee_id != user.licensee_id:
        raise NotFoundError(f"no app {app_id}")
    result: dict[str, Any] = dump(found)
    return result


async def portal_app_new_page(request: web.Request) -> web.StreamResponse:
    _developer(request)
    t = translator(request[LANG])
    return render(request, "portal_app_new.html", error=None, name="", title=t("portal.new_app"))


def _base_url(request: web.Request) -> str:
    public = _settings(request).server.public_url
    return public.rstrip("/") if public else f"{request.scheme}://{request.host}"


async def portal_app_create(request: web.Request) -> web.StreamResponse:
    user = _developer(request)
    form = await request.post()
    name = str(form.get("name", "")).strip()
    t = translator(request[LANG])
    try:
        data = schemas.parse(schemas.AppIn, {"licensee_id": user.licensee_id, "name": name})
        with acting_as(user.actor):
            created = await _registry(request).create_app(data)
    except ValidationFailedError as exc:
        return render(
            request, "portal_app_new.html", status=400, error=exc.detail, name=name, title=t("portal.new_app")
        )
    return render(
        request,
        "portal_secret.html",
        status=201,
        app=dump(created),
        secret=created.client_secret,
        base=_base_url(request),
        title=t("portal.secret_title"),
    )


async def portal_app_page(request: web.Request) -> web.StreamResponse:
    user = _developer(request)
    found = await _own_app(request, user)
    return render(request, "portal_app.html", app=found, title=found["name"])


async def portal_app_rotate(request: web.Request) -> web.StreamResponse:
    user = _developer(request)
    found = await _own_app(request, user)
    form = await request.post()
    overlap = str(form.get("overlap_seconds", "3600"))
    if overlap not in ("0", "3600", "86400") or form.get("confirm") != "yes":
        raise ValidationFailedError("overlap_seconds", "confirm, and choose one of the overlaps offered")
    with acting_as(user.actor):
        rotated = await _registry(request).rotate_app_secret(found["id"], int(overlap))
    t = translator(request[LANG])
    return render(
        request,
        "portal_secret.html",
        app=dump(rotated),
        secret=rotated.client_secret,
        base=_base_url(request),
        title=t("portal.secret_title"),
    )


async def portal_dataset(request: web.Request) -> web.StreamResponse:
    """A dataset's documentation, made from the catalogue, with examples to
    paste: the token request and a call (with DPoP where it is required)."""
    user = _developer(request)
    assert user.licensee_id is not None  # noqa: S101 - _developer checked it
    wanted = request.match_info["id"]
    found = [(d, p) for d, p in await _own_datasets(request, user.licensee_id) if d["id"] == wanted]
    if not found:
        raise NotFoundError(f"no dataset {wanted} in your licences")
    dataset, purposes = found[0]
    example = next((p for p in dataset["paths"] if "*" not in p and "{" not in p), "")
    return render(
        request,
        "portal_dataset.html",
        d=dataset,
        purposes=purposes,
        dpop=dataset["classification"] >= 3,
        example_path=example,
        base=_base_url(request),
        title=dataset["name"],
    )


# -- static files -------------------------------------------------------------------

_STATIC = {
    "console.css": (("console", "static/console.css"), "text/css"),
    "cjk.ttf": (("billing", "fonts/NotoSansCJKsc-Regular-subset.ttf"), "font/ttf"),
}


async def static(request: web.Request) -> web.StreamResponse:
    entry = _STATIC.get(request.match_info["name"])
    if entry is None:
        raise web.HTTPNotFound()
    (package, name), media_type = entry
    body = importlib.resources.files(package).joinpath(name).read_bytes()
    return web.Response(
        body=body, content_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )


async def _redirect_to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(f"{PREFIX}/")


def setup(app: web.Application) -> None:
    """Mount the console under ``/console/`` (``console.enabled``)."""
    console = web.Application(middlewares=[console_middleware])
    console[TEMPLATES] = _environment(app[SETTINGS].billing.time_zone)
    routes = console.router
    routes.add_get("/", home)
    routes.add_get("/static/{name}", static)
    routes.add_get("/login", login_page)
    routes.add_post("/login", login)
    routes.add_get("/login/totp", totp_page)
    routes.add_post("/login/totp", totp)
    routes.add_post("/logout", logout)
    routes.add_get("/datasets", datasets_page)
    routes.add_get("/datasets/{id}", dataset_page)
    routes.add_get("/licensees", licensees_page)
    routes.add_get("/licensees/{id}", licensee_page)
    routes.add_get("/licences", licences_page)
    routes.add_post("/licences", licence_create)
    routes.add_get("/licences/new", licence_new_page)
    routes.add_get("/licences/{id}", licence_page)
    routes.add_get("/licences/{id}/{action}", licence_action_page)
    routes.add_post("/licences/{id}/{action}", licence_action)
    routes.add_get("/apps", apps_page)
    routes.add_get("/portal/", portal)
    routes.add_get("/portal/apps/new", portal_app_new_page)
    routes.add_post("/portal/apps", portal_app_create)
    routes.add_get("/portal/apps/{id}", portal_app_page)
    routes.add_post("/portal/apps/{id}/rotate", portal_app_rotate)
    routes.add_get("/portal/datasets/{id}", portal_dataset)
    from console import audit, finance, portal_more  # they use this module's helpers

    finance.add_routes(routes)
    audit.add_routes(routes)
    portal_more.add_routes(routes)
    app.router.add_get(PREFIX, _redirect_to_console)
    app.add_subapp(f"{PREFIX}/", console)
