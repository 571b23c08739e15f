"""Nothing bypasses the meter (DESIGN §3 datasets and errors, §4, §5): a
dataset serves only the methods and paths it declares, narrowed by the
licence; a response is relayed only up to its size limit and its records
bound, and its records are counted exactly however large it is.

Everything runs through the real gateway in front of the real upstream of
``conftest`` on both backends; what was charged is read back through the
usage API, and what was recorded from the SQL ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from gateway.state import ENGINE
from ledger.models import CallRow
from tests.conftest import World
from tests.test_cli import DATASET_FLAGS, apdg, environment
from tests.test_data_plane import EVERY_METHOD, check_problem, eventually
from tests.test_path_escape import raw_request
from tests.test_quota import NOW, PERIOD, stop_clock, usage

WorldFactory = Callable[..., Awaitable[World]]
WRITES = ("POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MIB = 1024 * 1024


@pytest.fixture
async def world(world_factory: WorldFactory) -> World:
    started = await world_factory()
    stop_clock(started, NOW)
    return started


async def record_of(world: World, call_id: str) -> dict[str, Any]:
    """The call's row in the SQL ledger, once the writer moved it there."""
    engine = world.app[ENGINE]
    for _ in range(150):
        async with engine.connect() as conn:
            row = (await conn.execute(select(CallRow).where(CallRow.call_id == call_id))).first()
        if row is not None:
            return dict(row._mapping)
        await asyncio.sleep(0.1)
    raise AssertionError(f"call {call_id} was never recorded")


async def refused_unforwarded(
    world: World, path: str, token: str, expected: int, code: str, method: str = "GET", **kw: Any
) -> aiohttp.ClientResponse:
    """Refused with ``code``, the upstream never hearing of it, and recorded so."""
    arrived = len(world.upstream.arrived)
    status, body, resp = await world.call(path, token, method=method, **kw)
    if method == "HEAD":  # the problem without its body
        assert (status, body) == (expected, None)
        assert resp.headers["Content-Type"].startswith("application/problem+json")
    else:
        check_problem(status, body, resp, expected, code)
    assert world.upstream.arrived[arrived:] == [], method
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["status"], row["outcome"], row["problem"], row["charge_e4"]) == (expected, "refused", code, 0)
    assert row["method"] == method
    return resp


# == operations: methods and paths ==============================================


async def test_writes_to_a_read_only_dataset_are_refused_never_forwarded(world: World) -> None:
    ds, lic, _app, token = await world.licensed(purpose="industrial")
    path = f"/data/{ds['id']}/rows"
    untouched = await usage(world, lic, ds, PERIOD)
    for method in (*WRITES, "TRACE"):
        resp = await refused_unforwarded(
            world, path, token, 405, "method-not-allowed", method=method, data=b"payload"
        )
        assert resp.headers["Allow"] == "GET, HEAD", method
    assert await usage(world, lic, ds, PERIOD) == untouched
    assert world.upstream.seen == []

    # With Expect: 100-continue the body is not even invited.
    reader, writer = await asyncio.open_connection("127.0.0.1", world.client.server.port)
    try:
        head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nExpect: 100-continue\r\n"
        writer.write(head.encode() + b"Content-Length: 5000\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 405 "), answer
    assert b"\r\nAllow: GET, HEAD\r\n" in answer, answer
    assert world.upstream.arrived == []

    # What the dataset serves is served, and charged.
    for method in ("GET", "HEAD"):
        status, _body, _resp = await world.call(path, token, method=method)
        assert status == 200, method
    assert [s["method"] for s in world.upstream.seen] == ["GET", "HEAD"]
    assert (await usage(world, lic, ds, PERIOD))["paid"]["calls"] == 2

    # A dataset that declares writes serves them.
    writable = await world.dataset(methods=["GET", "POST"])
    lic2 = await world.licence(lic["licensee_id"], [writable["id"]])
    app = await world.app_client(lic["licensee_id"])
    token2 = await world.token(app, f"purpose:public-interest dataset:{writable['id']} licence:{lic2['id']}")
    status, body, _resp = await world.call(f"/data/{writable['id']}/rows", token2, method="POST", data=b"x")
    assert (status, body["method"], body["body"]) == (200, "POST", "x")
    resp = await refused_unforwarded(
        world, f"/data/{writable['id']}/rows", token2, 405, "method-not-allowed", method="DELETE"
    )
    assert resp.headers["Allow"] == "GET, POST"


async def test_paths_outside_the_patterns_are_unknown_operations(world: World) -> None:
    ds, lic, _app, token = await world.licensed(
        dataset_fields={"paths": ["stations/*", "observations", "archive/**", "v1/*/latest"]}
    )
    base = f"/data/{ds['id']}"
    for rest in (
        "stations/42",
        "stations/42?from=2024",
        "observations",
        "archive",
        "archive/",
        "archive/2024/01/02",
        "v1/x/latest",
    ):
        status, body, _resp = await world.call(f"{base}/{rest}", token)
        assert status == 200, (rest, body)
        assert world.upstream.last["raw_path"] == f"/svc/{rest}"
    served = len(world.upstream.seen)
    untouched = await usage(world, lic, ds, PERIOD)
    for rest in (
        "",
        "stations",
        "stations/",
        "stations/42/x",
        "Stations/42",
        "observations/1",
        "observations/",
        "archives",
        "v1/x",
        "v1/x/latest/y",
        "other?stations/42",
    ):
        resp = await refused_unforwarded(world, f"{base}/{rest}", token, 404, "unknown-operation")
        assert "Allow" not in resp.headers, rest
    assert len(world.upstream.seen) == served
    assert await usage(world, lic, ds, PERIOD) == untouched

    # Segments compare decoded: %34%32 is 42, %2A is a literal '*', not a wildcard.
    port = world.client.server.port
    auth = [("Authorization", f"Bearer {token}")]
    raw = await raw_request(port, f"{base}/%73tations/%34%32".encode(), headers=auth)
    assert raw.status == 200, raw.body
    raw = await raw_request(port, f"{base}/v1/%2A/latest".encode(), headers=auth)
    assert raw.status == 200, raw.body  # '*' is one segment, whatever it holds
    # A path that is not served has no methods: 404 before 405.
    await refused_unforwarded(world, f"{base}/other", token, 404, "unknown-operation", method="DELETE")
    resp = await refused_unforwarded(
        world, f"{base}/observations", token, 405, "method-not-allowed", "DELETE"
    )
    assert resp.headers["Allow"] == "GET, HEAD"


async def test_a_licence_narrows_methods_and_paths(world: World) -> None:
    a = await world.dataset(**EVERY_METHOD)
    b = await world.dataset(**EVERY_METHOD, paths=["public/**", "stations/*"])
    licensee = await world.licensee()
    lic = await world.licence(
        licensee["id"],
        [a["id"], b["id"]],
        methods=["GET", "POST"],
        paths=[f"{b['id']}/stations/1", f"{b['id']}/private/**"],
    )
    assert (lic["methods"], lic["paths"]) == (
        ["GET", "POST"],
        [f"{b['id']}/stations/1", f"{b['id']}/private/**"],
    )
    app = await world.app_client(licensee["id"])
    token = await world.token(app, f"purpose:public-interest dataset:{a['id']} dataset:{b['id']}")

    # Methods: every granted dataset, narrowed to GET and POST.
    assert (await world.call(f"/data/{a['id']}/anything/at/all", token, method="POST"))[0] == 200
    for method in ("HEAD", "PUT", "DELETE"):
        resp = await refused_unforwarded(
            world, f"/data/{a['id']}/x", token, 405, "method-not-allowed", method
        )
        assert resp.headers["Allow"] == "GET, POST"
    # Paths: b is named, so only its licensed patterns that it serves itself.
    assert (await world.call(f"/data/{b['id']}/stations/1", token))[0] == 200
    for rest in ("stations/2", "public/x", "private/x"):  # not licensed / licensed, not served
        await refused_unforwarded(world, f"/data/{b['id']}/{rest}", token, 404, "unknown-operation")

    # A change of the licence reaches the next calls.
    async with world.client.patch(
        f"/admin/v1/licences/{lic['id']}", json={"methods": ["PUT"], "paths": None}, headers=world.admin
    ) as resp:
        assert resp.status == 200, await resp.text()

    async def narrowed() -> bool:
        return (await world.call(f"/data/{b['id']}/public/x", token, method="PUT"))[0] == 200

    await eventually(narrowed)
    resp = await refused_unforwarded(world, f"/data/{a['id']}/x", token, 405, "method-not-allowed")
    assert resp.headers["Allow"] == "PUT"
    # Nothing left in common with a read-only dataset: an empty Allow.
    c = await world.dataset()
    lic_c = await world.licence(licensee["id"], [c["id"]], methods=["POST"])
    token_c = await world.token(app, f"purpose:public-interest dataset:{c['id']} licence:{lic_c['id']}")
    resp = await refused_unforwarded(world, f"/data/{c['id']}/x", token_c, 405, "method-not-allowed")
    assert resp.headers["Allow"] == ""


async def test_operation_flags_of_the_cli_round_trip(world: World, tmp_path: Path) -> None:
    env = environment(tmp_path / "cli-data", PDG_DATABASE_URL=world.backend.database_url)
    created = await apdg(
        "dataset", "create", "--id", "cli-ops", *DATASET_FLAGS, "--split", "0.5,0.5,0",
        "--upstream-url", world.upstream.url, "--classification", "1",
        "--method", "get", "--method", "POST", "--path", "stations/*", "--path", "archive/**",
        "--free-monthly-calls", "100", "--max-response-bytes", "4096", "--max-records-per-call", "50",
        "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    dataset = created.json()
    assert (dataset["methods"], dataset["paths"]) == (["GET", "POST"], ["stations/*", "archive/**"])
    assert (dataset["max_response_bytes"], dataset["max_records_per_call"]) == (4096, 50)
    shown = (await apdg("dataset", "show", "cli-ops", "--json", env=env, cwd=tmp_path)).json()
    assert {k: shown[k] for k in ("methods", "paths")} == {k: dataset[k] for k in ("methods", "paths")}
    licensee = await world.licensee()
    licence_run = await apdg(
        "licence", "create", "--licensee", licensee["id"], "--dataset", "cli-ops",
        "--max-classification", "2", "--purpose", "public-interest",
        "--valid-from", "2020-01-01T00:00:00Z", "--valid-until", "2099-01-01T00:00:00Z",
        "--security-officer", "Officer Li", "--method", "GET", "--path", "cli-ops/stations/1",
        "--json", env=env, cwd=tmp_path,
    )  # fmt: skip
    licence = licence_run.json()
    assert (licence["methods"], licence["paths"]) == (["GET"], ["cli-ops/stations/1"])
    bad = await apdg("dataset", "update", "cli-ops", "--method", "TRACE", env=env, cwd=tmp_path)
    bad.failed(mentions="methods")

    app = await world.app_client(licensee["id"])

    async def served() -> bool:
        status, _body, _resp = await world.call("/data/cli-ops/stations/1", token)
        return status == 200

    token = await world.token(app, "purpose:public-interest dataset:cli-ops")
    await eventually(served)
    await refused_unforwarded(world, "/data/cli-ops/stations/2", token, 404, "unknown-operation")
    resp = await refused_unforwarded(
        world, "/data/cli-ops/stations/1", token, 405, "method-not-allowed", "POST"
    )
    assert resp.headers["Allow"] == "GET"

    updated = await apdg(
        "licence",
        "update",
        licence["id"],
        "--method",
        "GET",
        "--method",
        "POST",
        "--json",
        env=env,
        cwd=tmp_path,
    )
    assert updated.json()["methods"] == ["GET", "POST"]

    async def posted() -> bool:
        status, _body, _resp = await world.call("/data/cli-ops/stations/1", token, method="POST")
        return status == 200

    await eventually(posted)


# == limits: response size and records ===========================================


async def read_until_cut(world: World, path: str, token: str) -> tuple[int, str]:
    """Bytes the caller got before the connection was cut (it must be), and
    the call id."""
    received = 0
    async with world.client.get(path, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200
        try:
            async for chunk in resp.content.iter_any():
                received += len(chunk)
        except aiohttp.ClientPayloadError:
            return received, resp.headers["X-Call-Id"]
    raise AssertionError(f"{path}: the whole body ({received} bytes) arrived")


async def test_a_response_over_the_size_limit_is_cut_and_never_charged(world_factory: WorldFactory) -> None:
    world = await world_factory()
    stop_clock(world, NOW)
    assert world.settings.proxy.max_response_bytes == 64 * MIB
    ds, lic, _app, token = await world.licensed(
        purpose="industrial", dataset_fields={"max_response_bytes": 2 * MIB}
    )
    base = f"/data/{ds['id']}"
    untouched = await usage(world, lic, ds, PERIOD)

    async def unchanged() -> bool:
        return bool(await usage(world, lic, ds, PERIOD) == untouched)

    # 200 MB streamed: cut at the limit, recorded incomplete, released.
    received, call_id = await read_until_cut(world, f"{base}/big?bytes=200000000", token)
    row = await record_of(world, call_id)
    assert (row["status"], row["outcome"], row["problem"]) == (200, "incomplete", "upstream-unavailable")
    # What was sent (the caller may lose the last of it to the cut), within the limit.
    assert 0 < received <= row["bytes"] <= 2 * MIB
    assert row["charge_e4"] == 0
    await eventually(unchanged)

    # A Content-Length over the limit: 502 before anything is sent.
    status, body, resp = await world.call(f"{base}/big?bytes={2 * MIB + 1}&announce=1", token)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    assert body["upstream_status"] == 200
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["status"], row["outcome"], row["charge_e4"]) == (502, "upstream-failure", 0)
    await eventually(unchanged)

    # At the limit: served whole, announced or streamed, and charged.
    for query in ("&announce=1", ""):
        status, body, _resp = await world.call(f"{base}/big?bytes={2 * MIB}{query}", token)
        assert (status, len(body)) == (200, 2 * MIB)
    assert (await usage(world, lic, ds, PERIOD))["paid"]["calls"] == 2

    # Without a dataset limit, the settings' default applies.
    small = await world_factory(proxy__max_response_bytes=MIB)
    small.counter = 1000  # ids apart from the first gateway's
    stop_clock(small, NOW)
    ds2, lic2, _app2, token2 = await small.licensed()
    before = await usage(small, lic2, ds2, PERIOD)
    received, call_id = await read_until_cut(small, f"/data/{ds2['id']}/big?bytes={3 * MIB}", token2)
    assert received <= (await record_of(small, call_id))["bytes"] <= MIB
    status, body, resp = await small.call(f"/data/{ds2['id']}/big?bytes={MIB + 1}&announce=1", token2)
    check_problem(status, body, resp, 502, "upstream-unavailable")

    async def unchanged2() -> bool:
        return bool(await usage(small, lic2, ds2, PERIOD) == before)

    await eventually(unchanged2)


PER_RECORD = {"price": {"per_call_fen": "1", "per_record_fen": "0.0001"}}


async def test_records_of_a_large_array_are_counted_exactly(world: World) -> None:
    """No X-Record-Count and a body far larger than any copy a counter could
    keep: every record is counted and priced."""
    n = 150_000
    ds, lic, _app, token = await world.licensed(
        purpose="industrial",
        dataset_fields={**PER_RECORD, "max_records_per_call": n},
        licence_fields={"paid": {"credit_limit_fen": 1000}},
    )
    status, body, resp = await world.call(f"/data/{ds['id']}/array?n={n}", token)
    assert status == 200
    assert len(body) == n
    assert "Content-Length" not in resp.headers  # streamed, chunked
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert row["bytes"] > 8 * MIB
    assert (row["outcome"], row["records"], row["charge_e4"]) == ("served", n, 10000 + n)
    paid = (await usage(world, lic, ds, PERIOD))["paid"]
    assert (paid["calls"], paid["used"]) == (1, "16")


async def test_a_count_over_max_records_per_call_is_cut_and_never_charged(world: World) -> None:
    ds, lic, _app, token = await world.licensed(
        purpose="industrial",
        dataset_fields={**PER_RECORD, "max_records_per_call": 1000},
        licence_fields={"paid": {"credit_limit_fen": 1000}},
    )
    base = f"/data/{ds['id']}"
    untouched = await usage(world, lic, ds, PERIOD)

    async def unchanged() -> bool:
        return bool(await usage(world, lic, ds, PERIOD) == untouched)

    # Counted: the first elements are relayed, then the 1001st cuts the call.
    async with world.client.get(
        f"{base}/array?n=5000&gate=1", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(100), 5)
        assert first.startswith(b'[{"id": 0,')
        world.upstream.array_release.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        call_id = resp.headers["X-Call-Id"]
    row = await record_of(world, call_id)
    assert (row["status"], row["outcome"], row["problem"]) == (200, "incomplete", "upstream-unavailable")
    assert (row["records"], row["charge_e4"]) == (0, 0)
    await eventually(unchanged)

    # Announced: X-Record-Count over the bound is refused before anything is sent.
    status, body, resp = await world.call(f"{base}/records?n=1001", token)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["outcome"], row["charge_e4"]) == ("upstream-failure", 0)
    await eventually(unchanged)

    # At the bound: served and priced.
    for path in (f"{base}/records?n=1000", f"{base}/array?n=1000"):
        status, body, resp = await world.call(path, token)
        assert (status, len(body)) == (200, 1000)
        row = await record_of(world, resp.headers["X-Call-Id"])
        assert (row["records"], row["charge_e4"]) == (1000, 10000 + 1000)
    paid = (await usage(world, lic, ds, PERIOD))["paid"]
    assert (paid["calls"], paid["used"]) == (2, "2.2")


async def test_metered_records_are_never_left_uncounted_in_an_encoded_body(world: World) -> None:
    """Where records are priced or bounded the upstream is asked for a plain
    body; one that sends an encoded body anyway, without X-Record-Count, is
    refused rather than served uncounted. Elsewhere encodings pass as asked."""
    ds, lic, _app, token = await world.licensed(
        purpose="industrial",
        dataset_fields={**PER_RECORD, "max_records_per_call": 100},
        licence_fields={"paid": {"credit_limit_fen": 1000}},
    )
    gzip_please = {"Accept-Encoding": "gzip"}
    status, body, resp = await world.call(f"/data/{ds['id']}/gzipped?n=5", token, headers=gzip_please)
    assert (status, len(body)) == (200, 5)
    assert world.upstream.last["headers"]["Accept-Encoding"] == "identity"
    assert "Content-Encoding" not in resp.headers
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["records"], row["charge_e4"]) == (5, 10000 + 5)
    paid = await usage(world, lic, ds, PERIOD)

    status, body, resp = await world.call(f"/data/{ds['id']}/gzipped?n=5&force=1", token, headers=gzip_please)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    assert "gzip" in body["detail"]

    async def unchanged() -> bool:
        return bool(await usage(world, lic, ds, PERIOD) == paid)

    await eventually(unchanged)

    plain, _lic, _app, plain_token = await world.licensed()
    status, _body, resp = await world.call(
        f"/data/{plain['id']}/gzipped?n=5", plain_token, headers=gzip_please
    )
    assert status == 200
    assert world.upstream.last["headers"]["Accept-Encoding"] == "gzip"
    assert resp.headers["Content-Encoding"] == "gzip"


async def test_priced_records_are_never_served_uncounted_in_another_format(world: World) -> None:
    """A licensee that asks a priced dataset's upstream for CSV (which has no
    X-Record-Count and is not JSON) does not get its records free: the call
    is refused (502) before anything is sent and not charged. As JSON the
    same call is counted and priced; where records are not priced the CSV
    is served."""
    ds, lic, _app, token = await world.licensed(
        purpose="industrial",
        dataset_fields={**PER_RECORD, "max_records_per_call": 100},
        licence_fields={"paid": {"credit_limit_fen": 1000}},
    )
    path = f"/data/{ds['id']}/negotiated?n=7"
    status, body, resp = await world.call(path, token)
    assert (status, len(body)) == (200, 7)
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["records"], row["charge_e4"]) == (7, 10000 + 7)
    paid = await usage(world, lic, ds, PERIOD)

    status, body, resp = await world.call(path, token, headers={"Accept": "text/csv"})
    check_problem(status, body, resp, 502, "upstream-unavailable")
    assert "cannot be counted" in body["detail"]
    assert world.upstream.last["headers"]["Accept"] == "text/csv"
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["outcome"], row["records"], row["charge_e4"]) == ("upstream-failure", 0, 0)

    async def unchanged() -> bool:
        return bool(await usage(world, lic, ds, PERIOD) == paid)

    await eventually(unchanged)

    plain, _lic, _app, plain_token = await world.licensed(purpose="industrial")
    status, body, resp = await world.call(
        f"/data/{plain['id']}/negotiated?n=7", plain_token, headers={"Accept": "text/csv"}
    )
    assert status == 200
    assert body.startswith(b"id\n0\n")
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["outcome"], row["records"]) == ("served", 0)
