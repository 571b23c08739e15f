"""Hostile input against the data plane's parsing, as properties.

hypothesis generates request targets, queries and headers from the pieces
attackers use (dot segments in every encoding, encoded slashes and
backslashes, overlong UTF-8, Unicode compatibility forms, NUL and control
characters, malformed escapes, duplicate and odd headers) and checks the
parsers one by one (``upstream_path``, ``_credentials``, ``idempotency_key``,
``parse_scope``) and then the live gateway in front of a real upstream: never
a 5xx of its own, every refusal a problem document with a DESIGN §3 code, and
the upstream never sees a path outside the dataset's prefix.

Settings are derandomized, without a deadline or an example database, and
bounded so the file runs in about a minute.
"""

from __future__ import annotations

import asyncio
import base64
import json
import posixpath
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from core.errors import BadRequestError, GatewayError, InvalidTokenError, TokenRequiredError
from gateway.charging import idempotency_key
from gateway.oauth import parse_scope
from gateway.proxy import _credentials, upstream_path
from licensing.schemas import PURPOSES
from tests.conftest import World
from tests.test_path_escape import raw_request

pytestmark = pytest.mark.timeout(600)
T = TypeVar("T")


def bounded(examples: int) -> Any:
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


#: Every problem code DESIGN §3 gives the data plane (and the OAuth endpoint).
DESIGN_CODES = {
    "bad-request",
    "unknown-operation",
    "method-not-allowed",
    "conflict",
    "idempotency-mismatch",
    "token-required",
    "invalid-token",
    "sender-constraint-failed",
    "payment-required",
    "licence-inactive",
    "dataset-not-licensed",
    "purpose-not-allowed",
    "dataset-closed",
    "unknown-dataset",
    "request-too-large",
    "rate-limited",
    "quota-exhausted",
    "upstream-unavailable",
    "ledger-unavailable",
    "quota-unavailable",
    "service-unavailable",
}

# -- generated targets ------------------------------------------------------------

#: Pieces of hostile (and ordinary) paths, as sent on the wire.
PIECES = [
    "/", "/", "/", ".", "..", "...", "%2e", "%2E", "%2e%2e", ".%2e", "%252e", "%25", "%2f", "%2F",
    "%5c", "%5C", "\\", "%00", "%0a", "%0d", "%09", "%7f", "%c0%ae", "%c0%af", "%e0%80%ae", "%c1%9c",
    "%ef%bc%8e", "%EF%BC%8F", "%ef%bc%bc", "%e2%80%a5", ";", ";x=1", "..;", "%", "%z", "%2", "~",
    "a", "b", "x.json", "data", "svc", "admin", " ", "%20", "+", "@", ":", "!", "$", "&", "'",
    "(", ")", "*", ",", "=", "-", "_", "%C3%A9", "%E4%B8%AD",
]  # fmt: skip
#: Bytes a request target may hold on the wire (visible ASCII, no "#", "?", " ").
TARGET_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#?")


def path_pieces() -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.sampled_from(PIECES),
        st.text(TARGET_CHARS, max_size=4),
        st.binary(min_size=1, max_size=3).map(lambda b: "".join(f"%{x:02x}" for x in b)),
    )
    return st.lists(piece, max_size=12).map("".join)


def queries() -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), path_pieces().map(lambda q: "?" + q.replace(" ", "+")))


def fully_decoded(text: str) -> str:
    """``text`` percent-decoded until nothing changes (as the laxest upstream might)."""
    for _ in range(10):
        decoded = unquote(text)
        if decoded == text:
            return text
        text = decoded
    return text


# -- the parsers, one by one --------------------------------------------------------


@bounded(600)
@given(dataset=st.sampled_from(["ds", "ds-1", "%64s", "a.b"]), rest=path_pieces(), query=queries())
def test_upstream_path_never_leaves_the_dataset_prefix(dataset: str, rest: str, query: str) -> None:
    answer, error = attempt(lambda: upstream_path(f"/data/{dataset}/{rest}{query}"))
    if answer is None:
        assert isinstance(error, BadRequestError)
        return
    got_dataset, got = answer
    assert got_dataset == unquote(dataset)
    path, sep, got_query = got.partition("?")
    assert path == rest
    assert sep + got_query == query
    for form in (fully_decoded(path), unicodedata.normalize("NFKC", fully_decoded(path))):
        assert "\\" not in form, got
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in form), got
        joined = posixpath.normpath("/svc/" + form)
        assert joined == "/svc" or joined.startswith("/svc/"), got
        # No segment an upstream could read as a parent or itself.
        for segment in form.split("/"):
            head = segment.split(";", 1)[0]
            assert not ("." in head and not head.strip(". ")), got


@bounded(300)
@given(target=st.text(TARGET_CHARS + "?", max_size=40))
def test_upstream_path_refuses_every_target_outside_data(target: str) -> None:
    raw = "/" + target
    answer, error = attempt(lambda: upstream_path(raw))
    if answer is None:
        assert isinstance(error, BadRequestError)
        return
    assert raw.startswith("/data/")
    assert answer[0]


def attempt(call: Callable[[], T]) -> tuple[T | None, GatewayError | None]:
    """What a parser answers: ``(result, None)`` or ``(None, the error it raised)``."""
    try:
        return call(), None
    except GatewayError as error:
        return None, error


def request_with(name: str, values: list[str]) -> Any:
    return make_mocked_request("GET", "/data/ds/x", headers=CIMultiDict((name, v) for v in values))


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
TOKENISH = st.one_of(
    HEADER_TEXT,
    st.tuples(
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "DPoP", "Bearer:", ""]),
        st.sampled_from([" ", "  ", "\t", ""]),
        st.sampled_from(["tok", "a.b.c", " tok ", "a b", "", '"tok"', "tok\t"]),
    ).map("".join),
)


@bounded(300)
@given(values=st.lists(TOKENISH, max_size=3))
def test_credentials_parser_answers_a_token_or_a_401_with_a_challenge(values: list[str]) -> None:
    found, error = attempt(lambda: _credentials(request_with("Authorization", values)))
    if found is None:
        assert isinstance(error, TokenRequiredError | InvalidTokenError)
        assert error.http_status == 401
        assert error.headers["WWW-Authenticate"].startswith('Bearer realm="pdg"')
        assert isinstance(error, TokenRequiredError) == (values in ([], [""]))
        return
    assert len(values) == 1
    scheme, token = found
    assert scheme == values[0].partition(" ")[0].lower()
    assert scheme in ("bearer", "dpop")
    assert token
    assert token == token.strip()
    assert " " not in token
    assert token in values[0]


@bounded(300)
@given(values=st.lists(st.one_of(HEADER_TEXT, st.text(max_size=300)), max_size=3))
def test_idempotency_key_parser_answers_a_key_or_a_400(values: list[str]) -> None:
    key, error = attempt(lambda: idempotency_key(request_with("Idempotency-Key", values)))
    if error is not None:
        assert (error.http_status, error.code) == (400, "bad-request")
        assert values
        return
    if not values:
        assert key is None
        return
    assert len(values) == 1
    assert key is not None
    assert 1 <= len(key) <= 255
    assert key.isprintable()
    assert key in values[0]
    # The same header always names the same key.
    assert idempotency_key(request_with("Idempotency-Key", values)) == key


SCOPE_ITEMS = st.one_of(
    st.sampled_from([f"purpose:{p}" for p in PURPOSES]),
    st.sampled_from(["purpose:", "purpose:other", "dataset:", "licence:", "x:y", ":", "purpose"]),
    st.from_regex(r"\Adataset:[a-z0-9][a-z0-9._-]{0,8}(/\*)?\Z"),
    st.from_regex(r"\Alicence:[a-z0-9-]{1,8}\Z"),
    st.text(max_size=12),
)


@bounded(500)
@given(items=st.lists(SCOPE_ITEMS, max_size=6), separator=st.sampled_from([" ", "  ", "\t", "+"]))
def test_scope_parser_answers_a_request_or_an_invalid_scope(items: list[str], separator: str) -> None:
    scope = separator.join(items)
    request, error = attempt(lambda: parse_scope(scope))
    if request is None:
        assert isinstance(error, BadRequestError)
        assert (error.http_status, error.code, error.extra["error"]) == (400, "bad-request", "invalid_scope")
        return
    words = [w for w in scope.split(" ") if w]
    assert f"purpose:{request.purpose}" in words
    assert request.purpose in PURPOSES
    assert len(set(request.datasets)) == len(request.datasets)
    assert all(f"dataset:{d}" in words for d in request.datasets)
    assert request.licence_id is None or f"licence:{request.licence_id}" in words
    # Parsing what was understood gives it back.
    again = " ".join(
        [f"purpose:{request.purpose}", *(f"dataset:{d}" for d in request.datasets)]
        + ([f"licence:{request.licence_id}"] if request.licence_id else [])
    )
    assert parse_scope(again) == request


# -- the live gateway ---------------------------------------------------------------


def check_answer(status: int, headers: Any, body: bytes, what: object) -> None:
    """The gateway's own answer: no 5xx; a refusal is a problem with a DESIGN code."""
    if headers.get("X-Upstream") == "yes":
        assert status == 200, what
        return
    assert status < 500, (what, status, body[:300])
    if status >= 400:
        assert headers.get("Content-Type", "").startswith("application/problem+json"), (what, status)
        problem = json.loads(body)
        assert problem["status"] == status, (what, problem)
        assert problem["code"] in DESIGN_CODES, (what, problem)


def check_upstream_saw_only_its_prefix(world: World) -> None:
    for raw in world.upstream.arrived:
        path = raw.partition("?")[0]
        assert path.startswith("/svc/e/"), raw
        for form in (fully_decoded(path), unicodedata.normalize("NFKC", fully_decoded(path))):
            assert "\\" not in form, raw
            assert posixpath.normpath(form).startswith("/svc/e"), raw


async def test_generated_targets_through_the_live_gateway(world: World) -> None:
    ds, _licence, _app, token = await world.licensed()
    port = world.client.server.port
    loop = asyncio.get_running_loop()
    statuses: Counter[int] = Counter()

    @bounded(150)
    @given(
        rest=path_pieces(), query=queries(), dataset=st.sampled_from([ds["id"], ds["id"], "%2e%2e", "nope"])
    )
    def check(rest: str, query: str, dataset: str) -> None:
        # A raw space would end the request target: the HTTP parser's own 400.
        target = f"/data/{dataset}/e/{rest}{query}".replace(" ", "%20").encode()
        auth = [("Authorization", f"Bearer {token}")]
        resp = asyncio.run_coroutine_threadsafe(raw_request(port, target, headers=auth), loop).result(60)
        statuses[resp.status] += 1
        check_answer(resp.status, resp.headers, resp.body, target)

    await asyncio.to_thread(check)
    check_upstream_saw_only_its_prefix(world)
    assert statuses[200] > 0, statuses
    assert statuses[400] > 0, statuses
    assert world.upstream.arrived


async def test_generated_headers_through_the_live_gateway(world: World) -> None:
    ds, _licence, _app, token = await world.licensed()
    port = world.client.server.port
    loop = asyncio.get_running_loop()
    statuses: Counter[int] = Counter()
    authorization = st.one_of(
        st.just(f"Bearer {token}"),
        st.just(f"bearer  {token} "),
        st.just(f"Bearer {token}x"),
        st.just(f"Bearer {token} {token}"),
        st.just(f"Basic {token}"),
        TOKENISH,
    )
    header = st.one_of(
        st.tuples(st.just("Authorization"), authorization),
        st.tuples(st.just("Idempotency-Key"), st.one_of(HEADER_TEXT, st.just('"k-1"'), st.just("k" * 300))),
        st.tuples(
            st.sampled_from(["X-Request-Id", "Forwarded", "X-Forwarded-For", "Accept"]),
            HEADER_TEXT,
        ),
    )

    @bounded(150)
    @given(
        headers=st.lists(header, max_size=4),
        with_token=st.booleans(),
        method=st.sampled_from([b"GET", b"POST", b"HEAD", b"DELETE", b"OPTIONS"]),
    )
    def check(headers: list[tuple[str, str]], with_token: bool, method: bytes) -> None:
        sent = [("Authorization", f"Bearer {token}")] if with_token else []
        sent += headers
        target = f"/data/{ds['id']}/e/x?q=1".encode()
        resp = asyncio.run_coroutine_threadsafe(
            raw_request(port, target, method=method, headers=sent), loop
        ).result(60)
        statuses[resp.status] += 1
        if method != b"HEAD":
            check_answer(resp.status, resp.headers, resp.body, (method, sent))
        else:
            assert resp.status < 500, (method, sent, resp.status)

    await asyncio.to_thread(check)
    check_upstream_saw_only_its_prefix(world)
    assert statuses[200] > 0, statuses
    assert statuses[401] > 0, statuses


async def test_an_encoded_line_break_in_the_path_is_a_bad_request(world: World) -> None:
    """The router once matched no route for a path holding an encoded CR or LF
    and answered its own 404 ``not-found`` (found by the generated targets)."""
    ds, _licence, _app, token = await world.licensed()
    port = world.client.server.port
    for rest in ("%0a", "%0D", "a%0ab/c", "x/%0d%0aX-Injected:%201"):
        target = f"/data/{ds['id']}/{rest}".encode()
        resp = await raw_request(port, target, headers=[("Authorization", f"Bearer {token}")])
        assert (resp.status, resp.json()["code"]) == (400, "bad-request"), (rest, resp.body)
        resp = await raw_request(port, target)
        assert (resp.status, resp.json()["code"]) == (401, "token-required"), (rest, resp.body)
    assert world.upstream.arrived == []


#: RFC 6749 §5.2 error codes the token endpoint may give.
OAUTH_ERRORS = {"invalid_request", "invalid_client", "invalid_scope", "unsupported_grant_type"}
#: The token endpoint's codes: DESIGN §3's, and ``invalid-client`` (401) for a
#: failed client authentication (core/errors.py; not in DESIGN's table).
TOKEN_CODES = DESIGN_CODES | {"invalid-client"}


async def test_generated_token_requests_through_the_live_gateway(world: World) -> None:
    """The token endpoint on generated scopes and forms: a token whose scope is
    what was asked (or everything the licence grants), or a problem with a
    DESIGN code and an RFC 6749 ``error``; never a 5xx."""
    ds, licence, app, _token = await world.licensed()
    other = await world.dataset()
    loop = asyncio.get_running_loop()
    statuses: Counter[int] = Counter()
    scope_items = st.one_of(
        SCOPE_ITEMS,
        st.sampled_from([f"dataset:{ds['id']}", f"dataset:{other['id']}", "dataset:test-provider/*"]),
        st.sampled_from([f"licence:{licence['id']}", "licence:nope"]),
    )
    form_extra = st.dictionaries(
        st.sampled_from(["grant_type", "client_id", "client_secret", "audience", "resource"]),
        st.one_of(HEADER_TEXT, st.just("client_credentials"), st.just(app["client_id"])),
        max_size=2,
    )

    @bounded(15)
    @given(items=st.lists(scope_items, max_size=5), extra=form_extra, basic=st.booleans())
    def check(items: list[str], extra: dict[str, str], basic: bool) -> None:
        form = {"grant_type": "client_credentials", "scope": " ".join(items)}
        if not basic:
            form.update(client_id=app["client_id"], client_secret=app["client_secret"])
        form.update(extra)
        status, body = asyncio.run_coroutine_threadsafe(post_token(world, app, form, basic), loop).result(60)
        statuses[status] += 1
        assert status in (200, 400, 401, 403), (form, status, body)
        if status != 200:
            assert body["status"] == status, body
            assert body["code"] in TOKEN_CODES, body
            assert body["error"] in OAUTH_ERRORS, body
            return
        granted = body["scope"].split(" ")
        assert granted[0] in [f"purpose:{p}" for p in PURPOSES], body
        asked = [w for w in form["scope"].split(" ") if w.startswith("dataset:")]
        assert set(granted[1:]) == set(asked) or (not asked and granted[1:]), (form, body)

    await asyncio.to_thread(check)
    assert statuses[200] > 0, statuses
    assert statuses[400] > 0, statuses
    assert statuses[401] > 0, statuses


async def post_token(world: World, app: dict[str, Any], form: dict[str, str], basic: bool) -> tuple[int, Any]:
    headers = {}
    if basic:
        raw = f"{app['client_id']}:{app['client_secret']}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    async with world.client.post("/oauth/token", data=form, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)
