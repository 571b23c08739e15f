"""The data plane: ``/data/{dataset}/{path...}``.

One path for every call (DESIGN §1): authenticate the token, apply the licence
rules, then forward to the dataset's upstream as ``{upstream}/{path}?{query}``
and stream the answer back.

Forwarding rules:

- request and response bodies stream in both directions; a request body over
  ``proxy.max_body_bytes`` is refused with 413 (by ``Content-Length`` before
  anything is sent, or while streaming a chunked body); a call with an
  ``Idempotency-Key`` is the exception: its body is read whole (within the
  same limit) before anything is reserved, since the key is bound to its
  digest, and forwarded from memory; a retry of a served idempotent call is
  answered from the kept response and never forwarded (``gateway.charging``);
- hop-by-hop headers (RFC 9110 §7.6.1, and any named in ``Connection``) are
  stripped both ways; the caller's ``Authorization``, ``DPoP``, ``Cookie`` and
  ``Proxy-*`` headers never go upstream;
- ``X-Forwarded-For`` / ``-Proto`` are set (extended only when the peer is a
  trusted proxy); ``X-Forwarded-Host`` is the gateway's public host
  (``server.public_url``), never the caller's ``Host``, so an upstream that
  builds links from it cannot be steered elsewhere; ``X-Request-Id`` is
  passed on or made;
- upstream redirects are never followed or relayed (502), so an upstream can
  not bounce a caller elsewhere; ``304 Not Modified`` is relayed; a
  ``Location`` / ``Content-Location`` on a relayed answer is rewritten to the
  gateway's own path when it points inside the dataset's upstream, and dropped
  otherwise, so upstream addresses never reach callers;
- the path is taken from the raw request target, segment by segment: dot
  segments (also encoded, with ``;params``, or in Unicode compatibility
  forms), encoded slashes or backslashes, double encoding, malformed
  percent-escapes, empty inner segments and control characters are refused,
  so no path leaves the upstream's prefix, however the upstream decodes it;
- after the licence rules, the operation rules
  (``licensing.catalogue.check_operation``): a path outside the dataset's
  (and the licence's) patterns is 404 ``unknown-operation``, a method the
  dataset does not serve or the licence does not allow 405
  ``method-not-allowed`` with ``Allow``: recorded, never forwarded, never
  charged;
- ``Expect: 100-continue`` is answered only after the token, the licence and
  operation rules and ``Content-Length`` pass, so a refused caller never
  uploads;
- a response is relayed up to the dataset's ``max_response_bytes`` (else
  ``proxy.max_response_bytes``): a larger ``Content-Length`` is 502 before
  anything is sent; a longer streamed body is cut (the connection closes),
  recorded ``incomplete`` and released;
- records are ``X-Record-Count``, else counted as the body streams
  (``gateway.counting``: the elements of a top-level JSON array, exactly, with
  no copy of the body); more than the dataset's ``max_records_per_call`` is
  502 when the header says so, else the response is cut as soon as the count
  passes it: ``incomplete``, never charged; where records are priced or
  bounded the upstream is asked for a plain body (``Accept-Encoding:
  identity``), and an encoded body without ``X-Record-Count`` is 502; where
  records are priced, a body without it that is no JSON array or object (a
  CSV, say) is 502 too, or cut (``incomplete``) if that shows only later;
- datasets at classification 3 or above need sender-constrained tokens
  (DESIGN §3): a DPoP-bound token with a valid, unused proof of its key
  (``licensing.dpop``); any other token is refused there
  (``sender-constraint-failed``);
- upstream 5xx, timeouts and connection errors become ``upstream-unavailable``
  problems (502 / 504 / 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from core.errors import (
    AuthenticationError,
    BadRequestError,
    GatewayError,
    InvalidTokenError,
    LedgerUnavailableError,
    LicenceError,
    QuotaUnavailableError,
    RequestTooLargeError,
    SenderConstraintError,
    TokenRequiredError,
    UnknownDatasetError,
    UpstreamUnavailableError,
)
from gateway import charging
from gateway.access_log import RECORD, UPSTREAM_MS
from gateway.call import Call
from gateway.counting import RecordCounter
from gateway.problems import call_id_of, problem_response, render, request_id
from gateway.state import (
    CALLS,
    CATALOGUE,
    CLOCK,
    DPOP,
    METRICS,
    POOLS,
    SETTINGS,
    TOKENS,
    TRACING,
    UPSTREAM,
    UPSTREAMS,
)
from gateway.throttle import trusted_peer
from gateway.tracing import OpenTelemetryTracing
from gateway.upstreams import Pool
from ledger.record import INCOMPLETE, REFUSED, SERVED, UPSTREAM_FAILURE
from licensing.catalogue import DatasetView, Grant, check_operation
from licensing.dpop import ALGORITHMS as DPOP_ALGORITHMS
from licensing.dpop import ProofError
from licensing.schemas import PURPOSES
from licensing.tokens import AccessClaims

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NEVER_UPSTREAM = HOP_BY_HOP | {
    "host",
    "authorization",
    "dpop",
    "cookie",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "forwarded",
    "expect",
}
NEVER_DOWNSTREAM = HOP_BY_HOP | {"content-length", "x-call-id", "set-cookie", "server"}
#: In a decoded segment: a slash or backslash, a control character, or a
#: percent-escape (the segment was encoded twice).
_BAD_DECODED = re.compile(r"[/\\\x00-\x1f\x7f]|%[0-9a-f]{2}", re.IGNORECASE)
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
#: Overlong UTF-8 forms of ".", "/", "\\" and NUL, which lenient decoders accept.
_OVERLONG = re.compile(
    r"%c0%(a[ef]|80)|%c1%9c|%e0%80%(a[ef]|80)|%e0%81%9c|%f0%80%80%(a[ef]|80)|%f0%80%81%9c", re.IGNORECASE
)
_BAD_PATH = "the path may not contain dot segments, encoded slashes or control characters"
#: Classification from which DESIGN §3 requires sender-constrained tokens.
SENDER_CONSTRAINED_FROM = 3
_WWW_AUTH = 'Bearer realm="pdg"'
_STATUS_CLASS = tuple(f"{n}xx" for n in range(10))


def _credentials(request: web.Request) -> tuple[str, str]:
    """The scheme (``bearer`` or ``dpop``) and the access token."""
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise InvalidTokenError(
            "send exactly one Authorization header",
            headers={"WWW-Authenticate": f'{_WWW_AUTH}, error="invalid_request"'},
        )
    header = headers[0] if headers else ""
    if not header:
        raise TokenRequiredError(
            "send an access token: 'Authorization: Bearer <token>' (or 'DPoP <token>' with a DPoP proof)",
            headers={"WWW-Authenticate": _WWW_AUTH},
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    scheme = scheme.lower()
    if scheme not in ("bearer", "dpop") or not token or " " in token:
        raise InvalidTokenError(
            "the Authorization header must be 'Bearer <token>' or 'DPoP <token>'",
            headers={"WWW-Authenticate": f'{_WWW_AUTH}, error="invalid_request"'},
        )
    return scheme, token


def _sender_constraint(
    detail: str, error: str = "invalid_token", nonce: str | None = None
) -> SenderConstraintError:
    headers = {"WWW-Authenticate": f'DPoP realm="pdg", error="{error}", algs="{" ".join(DPOP_ALGORITHMS)}"'}
    if nonce is not None:
        headers["DPoP-Nonce"] = nonce
    return SenderConstraintError(detail, headers=headers)


async def authenticate(request: web.Request) -> AccessClaims:
    """The verified claims of the call's access token. A DPoP-bound token
    (``cnf.jkt``) is accepted only under the ``DPoP`` scheme with a valid,
    unused proof of its key for this request (RFC 9449 §7); every other
    token only under ``Bearer`` (a ``DPoP`` header beside it is ignored, and
    never forwarded)."""
    app = request.app
    scheme, token = _credentials(request)
    if app[CATALOGUE].stale:  # behind its poll: confirm the view before serving on it
        await app[CATALOGUE].confirm()
    claims = await app[TOKENS].verify(token)
    if scheme == "bearer":
        if claims.jkt is not None:
            raise _sender_constraint(
                "this token is DPoP-bound: send it as 'Authorization: DPoP <token>' with a proof"
            )
        return claims
    if claims.jkt is None:
        raise InvalidTokenError(
            "this token is not DPoP-bound: send it as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": f'{_WWW_AUTH}, error="invalid_token"'},
        )
    try:
        proof = await app[DPOP].check(
            request.headers.getall("DPoP", []),
            method=request.method,
            path=request.raw_path,
            access_token=token,
        )
    except ProofError as refused:
        raise _sender_constraint(refused.detail, refused.error, refused.nonce) from refused
    if proof.jkt != claims.jkt:
        raise _sender_constraint("the DPoP proof is signed with another key than the token is bound to")
    return claims


#: A segment of unreserved characters that does not begin with a dot: never
#: refused (the checks below pass it), so it skips them.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")


def _refused_segment(segment: str) -> bool:
    """A path segment that an upstream could read as leaving its prefix."""
    if _PLAIN_SEGMENT.fullmatch(segment):
        return False
    if _MALFORMED_ESCAPE.search(segment) or _OVERLONG.search(segment):
        return True
    decoded = unquote(segment)
    for form in (decoded, unicodedata.normalize("NFKC", decoded)):
        if _BAD_DECODED.search(form):
            return True
        # ".", "..", "..;jsessionid=x" (Tomcat), ". ." and "..." (Windows).
        head = form.split(";", 1)[0]
        if "." in head and not head.strip(". "):
            return True
    return False


def upstream_path(raw_path: str) -> tuple[str, str]:
    """Split the raw target ``/data/{dataset}/{rest}?{query}`` into the dataset
    id and the checked, still-encoded rest (with its query)."""
    target, sep, query = raw_path.partition("?")
    segments = target.split("/")
    if len(segments) < 3 or segments[0] or segments[1] != "data" or not segments[2]:
        raise BadRequestError("the path must be /data/{dataset}/{path}")
    dataset = unquote(segments[2])
    rest = segments[3:]
    for index, segment in enumerate(rest):
        if not segment and index < len(rest) - 1:
            raise BadRequestError("the path may not contain empty segments ('//')")
        if _refused_segment(segment):
            raise BadRequestError(_BAD_PATH)
    path = "/".join(rest)
    return dataset, path + (sep + query if sep else "")


def _forward_headers(
    request: web.Request, request_id: str, trusted_proxies: tuple[str, ...], public_host: str
) -> CIMultiDict[str]:
    connection_named = {
        name.strip().lower()
        for value in request.headers.getall("Connection", [])
        for name in value.split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in NEVER_UPSTREAM or lower in connection_named or lower.startswith("proxy-"):
            continue
        headers.add(name, value)
    peer = request.remote or ""
    if trusted_peer(peer, trusted_proxies):
        prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.headers.get("X-Forwarded-Proto", request.scheme)
    else:
        headers["X-Forwarded-For"] = peer
        headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = public_host
    headers["X-Request-Id"] = request_id
    if request.body_exists and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    return headers


async def _limited(content: aiohttp.StreamReader, limit: int, exceeded: list[bool]) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in content.iter_any():
        seen += len(chunk)
        if seen > limit:
            exceeded[0] = True
            raise RequestTooLargeError(f"the request body exceeds {limit} bytes")
        yield chunk


def _authorize(request: web.Request, claims: AccessClaims, call: Call | None = None) -> tuple[Grant, str]:
    """The licence and operation rules for this call: the grant and the
    checked upstream rest. With ``call``, a path of a dataset with personal
    segments is recorded masked first, whatever the rules decide."""
    dataset_id, rest = upstream_path(request.raw_path)
    catalogue = request.app[CATALOGUE].fresh()
    if call is not None:
        dataset = catalogue.datasets.get(dataset_id)
        if dataset is not None and dataset.personal:
            call.mask_path(request.raw_path.partition("?")[0], dataset, rest.partition("?")[0])
    grant = catalogue.authorize(
        app_id=claims.app_id,
        licensee_id=claims.licensee_id,
        licence_id=claims.licence_id,
        token_datasets=claims.datasets,
        purpose=claims.purpose,
        dataset_id=dataset_id,
        now=request.app[CLOCK].now(),
    )
    check_operation(grant, request.method, rest.partition("?")[0])
    if grant.dataset.classification >= SENDER_CONSTRAINED_FROM and claims.jkt is None:
        # DESIGN §3: a DPoP-bound token (cnf.jkt), whose proof authenticate() checked.
        raise _sender_constraint(
            f"dataset {grant.dataset.id} is classification {grant.dataset.classification}; "
            "it needs a sender-constrained (DPoP) token"
        )
    return grant, rest


async def _authorized(
    request: web.Request, claims: AccessClaims, call: Call | None = None
) -> tuple[Grant, str]:
    """:func:`_authorize`; a refusal by the licence rules first reloads the
    view (bounded in rate) when it may lack what the token names — an app,
    licence or dataset made through another replica or worker a moment ago —
    and the rules run again on the reloaded view."""
    try:
        return _authorize(request, claims, call)
    except (InvalidTokenError, LicenceError, UnknownDatasetError):
        if not await request.app[CATALOGUE].reload_for_unknown():
            raise
    return _authorize(request, claims, call)


def _with_challenge(error: GatewayError) -> GatewayError:
    """Every 401 of the data plane carries a challenge (RFC 6750 §3)."""
    if isinstance(error, AuthenticationError) and "WWW-Authenticate" not in error.headers:
        error.headers["WWW-Authenticate"] = f'{_WWW_AUTH}, error="invalid_token"'
    return error


def _dataset_label(request: web.Request) -> str:
    """The metrics' dataset label: the id in the path when the catalogue
    knows it (a closed or unlicensed one too), else ``unknown`` — a label
    never carries raw input."""
    parts = request.raw_path.partition("?")[0].split("/", 3)
    dataset_id = parts[2] if len(parts) > 2 else ""
    return dataset_id if dataset_id in request.app[CATALOGUE].current.datasets else "unknown"


def _purpose_label(purpose: str) -> str:
    """The metrics' purpose label: one of the purposes DESIGN names, else
    ``other`` (a purpose comes from a signed token, but labels stay bounded
    whatever an external issuer puts there)."""
    return purpose if purpose in PURPOSES else "other"


async def handle_data(request: web.Request) -> web.StreamResponse:
    app = request.app
    started = time.perf_counter()
    call_id = call_id_of(request)
    metrics = app[METRICS]
    tracing = app[TRACING]
    dataset_label = _dataset_label(request)
    purpose_label = "unknown"
    try:
        with tracing.stage("pdg.authenticate"):
            claims = await authenticate(request)
        purpose_label = _purpose_label(claims.purpose)
        # From here on the call is recorded, whatever its outcome.
        call = Call(
            app[CALLS],
            claims,
            call_id=call_id,
            request_id=request_id(request, call_id),
            method=request.method,
            raw_path=request.raw_path,
            client_address=request.remote or "",
        )
        # The access log writes the path as the record keeps it (masked).
        request[RECORD] = call.record
    except GatewayError as error:
        metrics.refusal(dataset_label, purpose_label, error.code)
        _with_challenge(error)
        raise
    try:
        try:
            with tracing.stage("pdg.authorize"):
                grant, rest = await _authorized(request, claims, call)
            dataset_label = grant.dataset.id
            call.authorised(grant)
            key = charging.idempotency_key(request)
            body: bytes | None = None
            fingerprint = ""
            if key is not None or (request.content_length is None and request.body_exists):
                # A body of unannounced length (chunked) is read whole, within
                # the limit, before anything is reserved or forwarded: one over
                # it never reaches the upstream. So is an idempotent call's,
                # whose key is bound to its digest.
                body = await _read_body(request, app[SETTINGS].proxy.max_body_bytes)
            if key is not None:
                fingerprint = charging.fingerprint(request.method, request.raw_path, body or b"")
            with tracing.stage("pdg.reserve"):
                charge = await call.reserve(grant, key=key, fingerprint=fingerprint)
            if charge.replay is not None:
                response, served = await _replay(request, charge.replay, charge, call)
            else:
                response, served = await _forward(request, grant, rest, charge, call, body)
        except LedgerUnavailableError as error:
            metrics.refusal(dataset_label, purpose_label, error.code)
            raise
        except GatewayError as error:
            metrics.refusal(dataset_label, purpose_label, error.code)
            refusal = render(_with_challenge(error), request)
            body = bytes(refusal.body) if isinstance(refusal.body, bytes) else b""
            upstream_status = error.extra.get("upstream_status")
            try:
                with tracing.stage("pdg.record"):
                    await call.finish(
                        status=refusal.status,
                        outcome=UPSTREAM_FAILURE if isinstance(error, UpstreamUnavailableError) else REFUSED,
                        problem=error.code,
                        upstream_status=upstream_status if isinstance(upstream_status, int) else None,
                        size=len(body),
                        digest=call.digest_of(body),
                    )
            except LedgerUnavailableError:
                if isinstance(error, QuotaUnavailableError):
                    # Redis, the home of both, is out of reach: the caller
                    # learns why the call was refused. Nothing was reserved
                    # or forwarded; the refusal is in the metrics only.
                    return refusal
                raise
            return refusal
    except BaseException:
        # No record, or no finish: the ledger writer ends the call.
        call.abandon()
        raise
    if not served.complete:
        # The call is recorded and finished (or handed to the ledger writer):
        # cutting the connection now, which may cancel this handler, is safe.
        _abort(request)
    metrics.data_call(dataset_label, purpose_label, _STATUS_CLASS[response.status // 100])
    took = time.perf_counter() - started
    metrics.data_call_seconds(dataset_label, took)
    if call.upstream_seconds is not None:
        metrics.split_seconds(dataset_label, call.upstream_seconds, took)
        request[UPSTREAM_MS] = round(call.upstream_seconds * 1000, 1)
    return response


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: invite the body only from a caller the data
    plane would serve, with a body within the limit."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        return problem_response(
            417,
            "bad-request",
            "Expectation failed",
            "the only expectation this gateway meets is 100-continue",
            call_id_of(request),
        )
    try:
        claims = await authenticate(request)
        await _authorized(request, claims)
        limit = request.app[SETTINGS].proxy.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RequestTooLargeError(f"the request body exceeds {limit} bytes")
    except GatewayError as error:
        response = render(_with_challenge(error), request)
        # The body was never invited: the connection can not be reused.
        response.force_close()
        return response
    if request.version >= aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


#: A request body read whole is forwarded in one write up to this size.
_ONE_WRITE = 1024 * 1024


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (413 beyond)."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLargeError(f"the request body exceeds {limit} bytes")
    if not request.body_exists:
        return b""
    chunks = []
    try:
        async for chunk in _limited(request.content, limit, [False]):
            chunks.append(chunk)
    except (OSError, aiohttp.ClientError, HttpProcessingError) as exc:
        raise BadRequestError("the request body could not be read whole") from exc
    return b"".join(chunks)


async def _replay(
    request: web.Request,
    kept: charging.KeptResponse,
    charge: charging.Charge,
    call: Call,
) -> tuple[web.StreamResponse, Served]:
    """Answer a retry of a served idempotent call with the response kept for
    its key, as the first call's caller got it, but for this call's own
    ``X-Call-Id`` and ``RateLimit`` fields. Recorded first, like any call."""
    response = web.StreamResponse(status=kept.status, reason=kept.reason or None)
    for name, value in kept.headers:
        response.headers.add(name, value)
    response.headers["X-Call-Id"] = call.record["call_id"]
    response.headers.update(charge.headers)
    if kept.length is not None:
        if "Content-Encoding" in response.headers:
            response.headers["Content-Length"] = str(kept.length)
        else:
            response.content_length = kept.length
    digest = call.new_digest()
    digest.update(kept.body)
    await call.finish(
        status=kept.status,
        outcome=SERVED,
        records=kept.records,
        size=len(kept.body),
        digest=digest.hexdigest(),
    )
    try:
        await response.prepare(request)
        await response.write_eof(kept.body)
    except ConnectionResetError:
        pass  # the caller left at the last moment; the call was recorded
    return response, Served(complete=True, records=kept.records)


async def _forward(
    request: web.Request,
    grant: Grant,
    rest: str,
    charge: charging.Charge,
    call: Call,
    buffered: bytes | None = None,
) -> tuple[web.StreamResponse, Served]:
    """Forward the call to a target of the dataset's pool and relay its
    answer; another target is tried (``upstream_pool.retries``) for an
    idempotent call whose body is held whole, when one fails before its
    answer began to be relayed (``gateway.upstreams``)."""
    settings = request.app[SETTINGS]
    limit = settings.proxy.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLargeError(f"the request body exceeds {limit} bytes")
    route = upstream_of(request.app, grant.dataset)
    pool = route.pool
    headers = _forward_headers(
        request, call.record["request_id"], settings.server.trusted_proxies, settings.public_host
    )
    if route.metered:
        # Records priced or bounded are counted from the body: ask for it plain.
        headers["Accept-Encoding"] = "identity"
    timeout_s = route.timeout_s
    exceeded = [False]
    streamed = buffered is None and request.body_exists
    retries = pool.may_retry(request.method, not streamed)
    session = request.app[UPSTREAM]
    tracing = request.app[TRACING]
    loop = asyncio.get_running_loop()
    # The call's whole time upstream, to the last byte relayed, across
    # attempts: one timer for each request and another for the relay (its
    # record is written after).
    asked = loop.time()
    deadline = asked + timeout_s
    tried: set[str] = set()
    while True:
        target = pool.choose(tried)
        tried.add(target.name)
        call.record["upstream_target"] = target.name
        last = len(tried) > retries or not pool.more_to_try(tried)
        body: bytes | io.BytesIO | AsyncIterator[bytes] | None = None
        if buffered is not None:
            # aiohttp writes bytes in one go; a large body goes as a stream.
            body = buffered if len(buffered) <= _ONE_WRITE else io.BytesIO(buffered)
        elif streamed:
            body = _limited(request.content, limit, exceeded)
        url = URL(f"{target.base}/{rest}", encoded=True)
        try:
            with tracing.client("pdg.upstream", headers, **{"pdg.upstream_target": target.name}) as span:
                async with asyncio.timeout_at(deadline):
                    upstream = await session.request(
                        request.method,
                        url,
                        headers=headers,
                        data=body,
                        allow_redirects=False,
                        timeout=route.timeout,
                        compress=None,
                        auto_decompress=False,
                        ssl=pool.tls,
                    )
                if span is not None:
                    span.set_attribute("http.response.status_code", upstream.status)
        except (RequestTooLargeError, LedgerUnavailableError):
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if exceeded[0]:
                raise RequestTooLargeError(f"the request body exceeds {limit} bytes") from exc
            pool.failed(target)
            if last or loop.time() >= deadline:
                raise _unanswered(grant.dataset.id, exc, timeout_s) from exc
            continue
        if upstream.status >= 500:
            pool.failed(target)
            if not last:
                upstream.release()
                continue
        else:
            pool.answered(target)
        call.upstream_seconds = loop.time() - asked
        async with upstream:
            with tracing.stage("pdg.relay"):
                return await _relay(request, upstream, grant, route, url, target.url, charge, call, deadline)


def _unanswered(dataset_id: str, exc: BaseException, timeout_s: float) -> UpstreamUnavailableError:
    """The problem of a call no target answered, by the last failure."""
    if isinstance(exc, TimeoutError):
        return UpstreamUnavailableError(
            f"upstream of {dataset_id} timed out (at most {timeout_s:g} s a call)", status=504
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return UpstreamUnavailableError(f"upstream of {dataset_id} failed TLS verification", status=502)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailableError(f"upstream of {dataset_id} is unreachable", status=503)
    return UpstreamUnavailableError(f"upstream of {dataset_id} failed: {type(exc).__name__}")


def _gateway_location(value: str, requested: URL, base_url: URL, grant: Grant) -> str | None:
    """A ``Location`` of the upstream as the caller must see it: the gateway's
    own path when it points inside the answering target (``base_url``), else
    ``None``."""
    try:
        target = requested.join(URL(value))
        if target.origin() != base_url.origin():
            return None
    except ValueError:
        return None
    base = base_url.raw_path.rstrip("/")
    path = target.raw_path
    if path != base and not path.startswith(base + "/"):
        return None
    location = f"/data/{grant.dataset.id}/{path[len(base) + 1 :]}"
    return f"{location}?{target.raw_query_string}" if target.raw_query_string else location


@dataclass(slots=True)
class Served:
    """How the relay went: the whole body sent, and the records it held
    (``X-Record-Count``, else counted when the body is a JSON array)."""

    complete: bool
    records: int


@dataclass(frozen=True, slots=True)
class Upstream:
    """How calls to one dataset are forwarded and relayed, made once per
    catalogue view of the dataset (:func:`upstream_of`)."""

    dataset: DatasetView
    #: The upstream's base URL, without its last slash.
    base: str
    #: The call's whole time upstream: from forwarding to the last byte relayed.
    timeout_s: float
    #: The longest silence of the upstream (connect, answer, between chunks).
    timeout: aiohttp.ClientTimeout
    #: The largest response relayed.
    limit: int
    #: Records are priced or bounded, so they must be known.
    metered: bool
    #: Records are priced.
    priced: bool
    #: The targets and their health (``gateway.upstreams``).
    pool: Pool


def upstream_of(app: web.Application, dataset: DatasetView) -> Upstream:
    kept: Upstream | None = app[UPSTREAMS].get(dataset.id)
    if kept is not None and kept.dataset is dataset:
        return kept
    pool = app[POOLS].of(dataset)
    proxy = app[SETTINGS].proxy
    timeout_s = dataset.timeout_seconds or proxy.default_timeout_seconds
    idle_s = min(dataset.idle_timeout_seconds or proxy.default_idle_timeout_seconds, timeout_s)
    made = Upstream(
        dataset=dataset,
        base=str(dataset.upstream).rstrip("/"),
        timeout_s=timeout_s,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=idle_s, sock_read=idle_s),
        limit=dataset.max_response_bytes or proxy.max_response_bytes,
        metered=dataset.per_record_e4 > 0 or dataset.max_records_per_call is not None,
        priced=dataset.per_record_e4 > 0,
        pool=pool,
    )
    app[UPSTREAMS][dataset.id] = made
    return made


def _declared_records(upstream: aiohttp.ClientResponse) -> int | None:
    header = upstream.headers.get("X-Record-Count", "")
    return int(header) if header.isascii() and header.isdigit() else None


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    grant: Grant,
    route: Upstream,
    url: URL,
    base_url: URL,
    charge: charging.Charge,
    call: Call,
    deadline: float,
) -> tuple[web.StreamResponse, Served]:
    status = upstream.status
    if 300 <= status < 400 and status != 304:
        raise UpstreamUnavailableError(
            f"upstream of {grant.dataset.id} answered with a redirect ({status}); redirects are not relayed",
            upstream_status=status,
        )
    if status >= 500:
        headers = (
            {"Retry-After": upstream.headers["Retry-After"]} if "Retry-After" in upstream.headers else None
        )
        raise UpstreamUnavailableError(
            f"upstream of {grant.dataset.id} answered {status}", headers=headers, upstream_status=status
        )
    connection_named = {
        name.strip().lower()
        for value in upstream.headers.getall("Connection", [])
        for name in value.split(",")
    }
    response = web.StreamResponse(status=status, reason=upstream.reason)
    for name, value in upstream.headers.items():
        lower = name.lower()
        if lower in NEVER_DOWNSTREAM or lower in connection_named:
            continue
        if lower in ("location", "content-location"):
            rewritten = _gateway_location(value, url, base_url, grant)
            if rewritten is not None:
                response.headers.add(name, rewritten)
            continue
        response.headers.add(name, value)
    dataset = grant.dataset
    limit = route.limit
    # Content-Length parsed once (the property parses the header each time).
    expected = upstream.content_length
    if expected is not None and expected > limit:
        raise UpstreamUnavailableError(
            f"upstream of {dataset.id} announced {expected} bytes; at most {limit} are relayed",
            upstream_status=status,
        )
    declared = _declared_records(upstream)
    max_records = dataset.max_records_per_call
    if declared is not None and max_records is not None and declared > max_records:
        raise UpstreamUnavailableError(
            f"upstream of {dataset.id} announced {declared} records; "
            f"at most {max_records} are relayed per call",
            upstream_status=status,
        )
    relayed = charging.kept_headers(response.headers.items()) if charge.keeps_response else []
    response.headers["X-Call-Id"] = call.record["call_id"]
    response.headers.update(charge.headers)
    if expected is not None and "Content-Encoding" not in upstream.headers:
        response.content_length = expected
    elif expected is not None:
        response.headers["Content-Length"] = str(expected)
    # Records are counted as the body streams when the upstream does not say
    # and the body is JSON, or records are priced or bounded. An encoded body
    # (gzip, ...: sent although plain was asked for) cannot be counted: where
    # records are metered, it is refused rather than served uncounted.
    metered = route.metered
    encoding = upstream.headers.get("Content-Encoding", "").strip().lower()
    encoded = encoding not in ("", "identity")
    counter = (
        RecordCounter(request.app[SETTINGS].proxy.max_counted_depth)
        if declared is None
        and not encoded
        and (metered or "json" in upstream.headers.get("Content-Type", ""))
        else None
    )
    uncountable = declared is None and encoded and metered
    # Priced records must be counted: a body that turns out not to be JSON
    # (a CSV asked for with Accept, say) is refused, or cut, never served free.
    priced = route.priced
    # The body kept for the retries of an idempotent call, if small enough.
    keep_max = request.app[SETTINGS].proxy.idempotent_response_max_bytes if charge.keeps_response else 0
    stored: list[bytes] | None = [] if charge.keeps_response else None
    digest = call.new_digest()
    size = 0
    # What tells the caller the response is whole leaves only once the record
    # is durable: the body's last chunk when a Content-Length announces it
    # (a small body's only chunk: then headers and body leave together, in
    # one write), else the end of the chunked body (write_eof); an empty
    # body's headers. Everything before streams as it comes.
    held = b""
    content = upstream.content
    # Why the response is cut short, and the status sent; the record is
    # written outside the deadline's scope, never cancelled by it.
    cut: tuple[int, str] | None = None
    try:
        async with asyncio.timeout_at(deadline):
            while chunk := await content.readany():
                over = None
                if uncountable:
                    over = f"the response of {dataset.id} is {encoding[:32]}-encoded without X-Record-Count"
                elif size + len(chunk) > limit:
                    over = f"the response of {dataset.id} exceeds {limit} bytes"
                elif counter is not None:
                    counter.feed(chunk)
                    if max_records is not None and counter.count > max_records:
                        over = f"the response of {dataset.id} holds more than {max_records} records"
                    elif priced and not counter.countable:
                        over = (
                            f"the response of {dataset.id} is no JSON array or object and has no "
                            "X-Record-Count: its records, which are priced, cannot be counted"
                        )
                if over is not None:
                    if not response.prepared:
                        raise UpstreamUnavailableError(over, upstream_status=status)
                    cut = status, "upstream-unavailable"
                    break
                if stored is not None:
                    if size + len(chunk) <= keep_max:
                        stored.append(chunk)
                    else:
                        stored = None
                if expected is not None and size + len(chunk) >= expected:
                    # The last chunk: it leaves once the record is durable.
                    held = chunk
                else:
                    try:
                        if not response.prepared:
                            await response.prepare(request)
                        await response.write(chunk)
                    except ConnectionError:
                        # The caller hung up: what it was sent is recorded.
                        cut = status if response.prepared else 0, "client-disconnected"
                        break
                digest.update(chunk)
                size += len(chunk)
    except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
        if not response.prepared:
            # Nothing was sent: the caller is told why.
            timed_out = isinstance(exc, TimeoutError)
            raise UpstreamUnavailableError(
                f"upstream of {dataset.id} "
                + (f"timed out (at most {route.timeout_s:g} s a call)" if timed_out else "failed mid-body"),
                status=504 if timed_out else 502,
                upstream_status=status,
            ) from exc
        cut = status, "upstream-unavailable"
    except asyncio.CancelledError:
        # A server run with handler cancellation cancels the handler of a
        # caller that left: what it was sent is recorded all the same.
        await _cut(call, status if response.prepared else 0, size, digest, "client-disconnected", status)
        raise
    if cut is not None:
        return response, await _cut(call, cut[0], size, digest, cut[1], status)
    records = declared if declared is not None else counter.result() if counter is not None else 0
    if stored is not None:
        charge.keep(
            charging.KeptResponse(status, upstream.reason or "", relayed, expected, records, b"".join(stored))
        )
    try:
        await call.finish(
            status=status,
            outcome=SERVED,
            upstream_status=status,
            records=records,
            size=size,
            digest=digest.hexdigest(),
        )
    except LedgerUnavailableError:
        if not response.prepared:
            raise  # nothing left yet: the caller is told 503
        return response, Served(complete=False, records=0)
    try:
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof(held)
    except ConnectionError:
        pass  # the caller left at the last moment; the call was served and recorded
    return response, Served(complete=True, records=records)


def _abort(request: web.Request) -> None:
    """Cut the connection: after the headers, the only honest signal left
    that the body is not whole."""
    if request.transport is not None:
        request.transport.abort()


async def _cut(
    call: Call, status: int, size: int, digest: Any, problem: str, upstream_status: int | None = None
) -> Served:
    """The response could not be sent whole: record it ``incomplete`` with
    the ``status`` and ``size`` sent (0: no header left), and release it (the
    caller then cuts the connection). If the record cannot be written the
    call is the ledger writer's to end."""
    with contextlib.suppress(LedgerUnavailableError):
        await call.finish(
            status=status,
            outcome=INCOMPLETE,
            problem=problem,
            upstream_status=status if upstream_status is None else upstream_status,
            size=size,
            digest=digest.hexdigest(),
        )
    return Served(complete=False, records=0)


async def traced_data(request: web.Request) -> web.StreamResponse:
    """:func:`handle_data` in the call's span (``gateway.tracing``)."""
    tracing = request.app[TRACING]
    assert isinstance(tracing, OpenTelemetryTracing)  # noqa: S101 - only routed with one
    with tracing.call(request) as span:
        try:
            response = await handle_data(request)
        except GatewayError as error:
            tracing.ended(span, request, error.status, error.code)
            raise
        except web.HTTPException as exc:
            tracing.ended(span, request, exc.status, None)
            raise
        tracing.ended(span, request, response.status, None)
        return response


def setup(app: web.Application) -> None:
    handler = traced_data if app[TRACING].enabled else handle_data
    # [\s\S], not ".": an encoded newline in the path is the handler's 400, not the router's 404.
    app.router.add_route("*", r"/data/{dataset}/{path:[\s\S]*}", handler, expect_handler=expect_continue)
    app.router.add_route("*", "/data/{dataset}", handler, expect_handler=expect_continue)
