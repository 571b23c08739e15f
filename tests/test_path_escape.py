"""The data plane never lets a request path leave its dataset's upstream prefix.

Requests are written as raw bytes on a plain TCP connection, so no client
library normalises, re-encodes or refuses the request target before the
gateway sees it. The upstream records every raw path it receives; for every
hostile target it must have received nothing at all.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from tests.conftest import World

# -- raw HTTP/1.1 -----------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


async def raw_request(
    port: int,
    target: bytes,
    *,
    method: bytes = b"GET",
    headers: list[tuple[str, str]] | None = None,
    connection: str = "close",
    body: bytes = b"",
    host: str = "127.0.0.1",
) -> RawResponse:
    """Send one request exactly as given (``Connection`` is always sent, with
    ``connection`` as its value) and read the answer until the server closes."""
    lines = [
        method + b" " + target + b" HTTP/1.1",
        b"Host: " + host.encode(),
        b"Connection: " + connection.encode(),
    ]
    lines += [f"{name}: {value}".encode() for name, value in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}".encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("Transfer-Encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    return RawResponse(int(status_line.split(" ")[1]), parsed, payload)


def check_problem(resp: RawResponse, status: int, code: str) -> None:
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers["Content-Type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["code"] == code, body
    assert body["status"] == status, body
    assert body["instance"] == resp.headers["X-Call-Id"], body
    assert body["type"].endswith("/" + code), body
    assert body["title"], body
    assert body["detail"], body


# -- hostile targets ------------------------------------------------------------

#: ``{ds}`` is replaced by a licensed dataset id. Every one of these must be
#: refused (400 bad-request), or answered 404 without reaching any upstream.
HOSTILE = [
    "/data/{ds}/../admin/v1/datasets",
    "/data/{ds}/..",
    "/data/{ds}/.",
    "/data/{ds}/a/./b",
    "/data/{ds}/a/../../x",
    "/data/{ds}/a/..",
    "/data/{ds}/%2e%2e/admin/v1/datasets",
    "/data/{ds}/%2E%2e/x",
    "/data/{ds}/%2E%2e/",
    "/data/{ds}/.%2e/x",
    "/data/{ds}/%2e./x",
    "/data/{ds}/%2e/x",
    "/data/{ds}/..%2fadmin",
    "/data/{ds}/%2F..%2F..%2Fadmin",
    "/data/{ds}/a%2fb",
    "/data/{ds}/..%5c..%5cadmin",
    "/data/{ds}/a%5Cb",
    "/data/{ds}/%252e%252e/x",
    "/data/{ds}/%252E%252E%252Fx",
    "/data/{ds}/%25252e%25252e/x",
    "/data/{ds}/%252f",
    "/data/{ds}/%255c",
    "/data/{ds}/%2500",
    "/data/{ds}/%00",
    "/data/{ds}/x%00.json",
    "/data/{ds}/%0d%0aX-Injected:%201",
    "/data/{ds}/%7f",
    "/data/{ds}/a\\..\\..\\admin",
    "/data/{ds}/..\\admin",
    "/data/{ds}/\\\\evil\\x",
    # Tomcat reads "..;x" as "..", Windows "..." and ". ." as ".."
    "/data/{ds}/..;/admin",
    "/data/{ds}/..;jsessionid=1/admin",
    "/data/{ds}/%2e%2e;/admin",
    "/data/{ds}/.../admin",
    "/data/{ds}/..%20/admin",
    # Unicode compatibility forms of "." "/" "\" (NFKC), overlong UTF-8
    "/data/{ds}/%EF%BC%8E%EF%BC%8E/admin",
    "/data/{ds}/%E2%80%A5/admin",
    "/data/{ds}/a%EF%BC%8Fb",
    "/data/{ds}/a%EF%BC%BCb",
    "/data/{ds}/%c0%ae%c0%ae/admin",
    "/data/{ds}/%C0%AF",
    "/data/{ds}/%e0%80%ae%e0%80%ae/admin",
    # empty inner segments: "/svc//etc/passwd" is an absolute path to os.path.join
    "/data/{ds}//etc/passwd",
    "/data/{ds}/a//b",
    # malformed escapes an upstream may decode its own way
    "/data/{ds}/%zz",
    "/data/{ds}/%2",
    "/data/{ds}/a%",
    "/data/{ds}/%%32%65%%32%65/x",
    # not origin-form, or the dataset segment itself
    "http://127.0.0.1/data/{ds}/x",
    "//data/{ds}/x",
    "/data/../admin/v1/datasets",
    "/data/%2e%2e/admin/v1/datasets",
    "/data/{ds}%2f..%2f..%2fadmin/x",
    "/data//{ds}/x",
    "/data/{ds}/../{ds}/x",
]


#: Bytes aiohttp's request-line parser refuses before any handler runs.
RAW_BYTES = [b"\x01", b"\x7f", b"\xc3\xa9", b"\x00", b" x"]


async def test_hostile_targets_never_leave_the_dataset_prefix(world: World) -> None:
    ds, _licence, _app, token = await world.licensed()
    port = world.client.server.port
    auth = [("Authorization", f"Bearer {token}")]
    failures: list[str] = []
    for template in HOSTILE:
        target = template.replace("{ds}", ds["id"])
        resp = await raw_request(port, target.encode(), headers=auth)
        try:
            if resp.status == 404:
                check_problem(resp, 404, resp.json()["code"])
                assert resp.json()["code"] in ("unknown-dataset", "not-found")
            else:
                check_problem(resp, 400, "bad-request")
        except (AssertionError, ValueError, KeyError) as exc:
            failures.append(f"{target!r}: {exc}")
    assert not failures, "\n".join(failures)
    assert world.upstream.arrived == []

    # Raw control or non-ASCII bytes: refused by the HTTP parser itself.
    for raw in RAW_BYTES:
        resp = await raw_request(port, f"/data/{ds['id']}/x".encode() + raw, headers=auth)
        assert resp.status == 400, (raw, resp.status)
    assert world.upstream.arrived == []

    # Without a token the caller learns nothing about the path and reaches nothing.
    for target in (f"/data/{ds['id']}/../admin/v1/datasets", f"/data/{ds['id']}/%2e%2e/x"):
        resp = await raw_request(port, target.encode())
        check_problem(resp, 401, "token-required")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert world.upstream.arrived == []

    # A well-formed call on the same kind of connection does reach the upstream.
    resp = await raw_request(port, f"/data/{ds['id']}/ok".encode(), headers=auth)
    assert resp.status == 200, resp.body
    assert world.upstream.arrived == ["/svc/ok"]


#: Ordinary targets, forwarded byte for byte below the upstream's prefix.
ORDINARY = [
    ("/data/{ds}/a%20b", "/svc/a%20b"),
    ("/data/{ds}/caf%C3%A9/%E4%B8%AD%E6%96%87", "/svc/caf%C3%A9/%E4%B8%AD%E6%96%87"),
    ("/data/{ds}/x%2Cy/a+b/~user", "/svc/x%2Cy/a+b/~user"),
    ("/data/{ds}/v1.2/..a/a..b/.well-known", "/svc/v1.2/..a/a..b/.well-known"),
    ("/data/{ds}/matrix;p=1/x", "/svc/matrix;p=1/x"),
    ("/data/{ds}/dir/", "/svc/dir/"),
    ("/data/{ds}/", "/svc/"),
    ("/data/{ds}", "/svc/"),
    ("/data/{ds}?q=../../admin&p=%2e%2e%2f", "/svc/?q=../../admin&p=%2e%2e%2f"),
    ("/data/{ds}/s?a=%2F&b=a+b&c=&c=2&%E4%B8%AD=1", "/svc/s?a=%2F&b=a+b&c=&c=2&%E4%B8%AD=1"),
]


async def test_ordinary_encoded_paths_are_forwarded_unchanged(world: World) -> None:
    ds, _licence, _app, token = await world.licensed()
    port = world.client.server.port
    for template, expected in ORDINARY:
        target = template.replace("{ds}", ds["id"])
        resp = await raw_request(port, target.encode(), headers=[("Authorization", f"Bearer {token}")])
        assert resp.status == 200, (target, resp.status, resp.body[:300])
        assert resp.json()["raw_path"] == expected, target
        assert world.upstream.last["raw_path"] == expected, target
        assert resp.headers["X-Call-Id"]
    assert len(world.upstream.seen) == len(ORDINARY)


async def test_raw_control_bytes_get_a_problem(world: World) -> None:
    """aiohttp's own parser refuses the request line; the answer is still a
    problem, names no software version and does not quote the request."""
    ds = await world.dataset()
    marker = b"ECHO-ME-NOT"
    resp = await raw_request(world.client.server.port, f"/data/{ds['id']}/x".encode() + marker + b"\x01")
    check_problem(resp, 400, "bad-request")
    assert marker not in resp.body
    assert resp.headers["Server"] == "pdg"


async def test_every_answer_of_the_http_layer_is_a_problem_naming_no_version(world: World) -> None:
    """Requests aiohttp's server refuses before any handler runs (a header
    name with a space, a header too long, a bad Content-Length, a non-HTTP
    method), and answers of the handlers: every one names the server ``pdg``
    only, and the refusals are problems that do not quote the request."""
    port = world.client.server.port
    marker = "ECHO-ME-NOT"
    refused = {
        "header name with a space": await raw_request(port, b"/healthz", headers=[(marker + " x", "1")]),
        "header too long": await raw_request(port, b"/healthz", headers=[("X-Long", marker * 3000)]),
        "bad content-length": await raw_request(port, b"/healthz", headers=[("Content-Length", marker)]),
        "bad method": await raw_request(port, b"/healthz", method=marker.encode() + b"\x01"),
    }
    for name, resp in refused.items():
        assert 400 <= resp.status < 500, (name, resp.status, resp.body[:200])
        check_problem(resp, resp.status, "bad-request")
        assert marker.encode() not in resp.body, name
        assert resp.headers["Server"] == "pdg", (name, resp.headers)
    for target in (b"/healthz", b"/data/nope/x", b"/admin/v1/datasets", b"/.well-known/jwks.json"):
        resp = await raw_request(port, target)
        assert resp.headers["Server"] == "pdg", (target, resp.headers)
