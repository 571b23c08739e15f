"""RFC 9457 problem details: the one place where errors become responses.

Every error the gateway produces is a :class:`core.errors.GatewayError`
(or is mapped to one here) and leaves as ``application/problem+json`` with
``type``, ``title``, ``status``, ``detail``, ``instance`` (the call id) and the
stable ``code`` of DESIGN §3.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from sqlalchemy import exc as sa_exc

from core.errors import GatewayError, ServiceUnavailableError
from licensing.ids import new_call_id

log = logging.getLogger(__name__)

PROBLEM_TYPE_BASE = "https://pdg.dev/problems/"
REQUEST_CALL_ID = web.RequestKey("call_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: ("bad-request", "Bad request"),
    401: ("token-required", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("request-too-large", "Request body too large"),
    414: ("bad-request", "URI too long"),
    431: ("bad-request", "Request header fields too large"),
}


def call_id_of(request: web.Request) -> str:
    """The call id of this request, made on first use."""
    call_id = request.get(REQUEST_CALL_ID)
    if call_id is None:
        call_id = new_call_id()
        request[REQUEST_CALL_ID] = call_id
    return call_id


#: An ``X-Request-Id`` passed on (and recorded) as the caller sent it; any
#: other is replaced by the call id.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(request: web.Request, call_id: str) -> str:
    incoming = request.headers.get("X-Request-Id", "")
    return incoming if REQUEST_ID.match(incoming) else call_id


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "code": code,
    }
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
    response = web.Response(
        body=orjson.dumps(body), status=status, content_type="application/problem+json", headers=headers
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Call-Id"] = instance
    return response


def render(error: GatewayError, request: web.Request) -> web.Response:
    return problem_response(
        error.http_status,
        error.code,
        error.title,
        error.detail,
        call_id_of(request),
        error.headers,
        error.extra,
    )


#: What a store out of reach raises: SQLAlchemy's connection and pool errors,
#: a driver's refused or timed-out connection.
_OUT_OF_REACH = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    OSError,
    TimeoutError,
)


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as error:
        return render(error, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, title = _HTTP_CODES.get(
            exc.status, ("bad-request" if exc.status < 500 else "internal-error", exc.reason)
        )
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return problem_response(exc.status, code, title, exc.reason, call_id_of(request), headers)
    except _OUT_OF_REACH as exc:
        # A store out of reach (the SQL database, above all): the admin API
        # and the token endpoint answer 503 until it is back; data calls go
        # on from memory (gateway.health). One line in the log, no trace.
        log.warning(
            "%s %s: a store is out of reach: %s", request.method, request.rel_url.path, type(exc).__name__
        )
        unavailable = ServiceUnavailableError(
            "the database is out of reach; try again shortly", headers={"Retry-After": "5"}
        )
        return render(unavailable, request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.rel_url.path)
        return problem_response(
            500,
            "internal-error",
            "Internal error",
            "the gateway failed unexpectedly; the call id identifies it in the logs",
            call_id_of(request),
        )


#: The ``Server`` field of every response the gateway itself makes: no
#: software or version named (an upstream's own is relayed as it sent it).
SERVER_NAME = "pdg"


async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: replace aiohttp's ``Server: Python/… aiohttp/…``,
    and echo the request id on every response: the caller's ``X-Request-Id``
    when it is well-formed (what the data plane passes upstream and records),
    else the call id (an upstream's own is replaced)."""
    if response.headers.get("Server") == SERVER_SOFTWARE:
        response.headers["Server"] = SERVER_NAME
    response.headers["X-Request-Id"] = request_id(request, call_id_of(request))


_HTTP_LAYER_DETAIL = {
    400: "the request is not well-formed HTTP/1.1 (request line, header fields or framing)",
    413: "the request is larger than this gateway accepts",
    414: "the request target is longer than this gateway accepts",
    431: "the request header fields are larger than this gateway accepts",
    500: "the gateway failed unexpectedly",
    504: "the gateway did not answer in time",
}


def http_layer_problem(status: int) -> web.Response:
    """The problem answering an error of the HTTP server itself (a request
    that cannot be parsed, a handler that timed out): never echoing what the
    client sent, and closing the connection."""
    code, title = _HTTP_CODES.get(status, ("bad-request" if status < 500 else "internal-error", "Error"))
    if status == 500:
        title = "Internal error"
    detail = _HTTP_LAYER_DETAIL.get(status, title)
    response = problem_response(status, code, title, detail, new_call_id())
    response.headers["Server"] = SERVER_NAME
    response.force_close()
    return response


_aiohttp_handle_error = RequestHandler.handle_error


def _handle_error(
    self: RequestHandler,
    request: BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    # aiohttp's own handling logs the error and refuses to answer on a
    # connection that has sent bytes already; its text/plain body (which
    # may quote the request) is replaced by a problem.
    _aiohttp_handle_error(self, request, status, exc, message)
    return http_layer_problem(status)


def install_http_layer_problems() -> None:
    """Make the errors aiohttp's HTTP server answers by itself (outside any
    application handler or middleware) problem documents too. aiohttp has no
    hook for these, so its ``RequestHandler.handle_error`` is wrapped, once
    per process; every aiohttp server of the process answers so."""
    RequestHandler.handle_error = _handle_error  # type: ignore[method-assign]
