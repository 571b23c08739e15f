"""A call's bounds in time and size, and what its record says when it ends
early (DESIGN §4, §5; issue 16, faults 2, 5 and 6): a caller hanging up
mid-response, an upstream that trickles or falls silent, a chunked upload
over the limit. A real gateway, a real upstream, raw sockets where a client
library would be too polite."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import World
from tests.test_data_plane import EVERY_METHOD, WorldFactory, check_problem
from tests.test_operations import record_of
from tests.test_quota import usage

pytestmark = pytest.mark.usefixtures("backend")

BIG = 32 * 1024 * 1024
INCOMPLETE_UPSTREAM = ("incomplete", "upstream-unavailable", 0)


async def _head(reader: asyncio.StreamReader) -> dict[str, str]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = raw.decode("latin-1").split("\r\n")
    fields = {"status": lines[0].split(" ")[1]}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return fields


async def test_a_caller_hanging_up_mid_response_is_recorded_as_it_was(world: World) -> None:
    """Fault 2: a client that hung up after 200 and megabytes of body was
    recorded as an upstream failure (502, the size of a problem body)."""
    ds, lic, _app, token = await world.licensed()
    reader, writer = await asyncio.open_connection("127.0.0.1", world.client.server.port)
    try:
        head = f"GET /data/{ds['id']}/big?bytes={BIG} HTTP/1.1\r\nHost: x\r\n"
        writer.write(f"{head}Authorization: Bearer {token}\r\n\r\n".encode())
        await writer.drain()
        fields = await _head(reader)
        assert fields["status"] == "200", fields
        got = 0
        while got < 2 * 1024 * 1024:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, "the body ended early"
            got += len(chunk)
    finally:
        # Hang up hard (RST), as a client process killed mid-download does.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
    row = await record_of(world, fields["x-call-id"])
    assert (row["outcome"], row["problem"]) == ("incomplete", "client-disconnected"), row
    assert (row["status"], row["upstream_status"]) == (200, 200), row
    assert got <= row["bytes"] < BIG, (got, row["bytes"])
    assert row["charge_e4"] == 0
    # Released: the free allowance is as it was.
    assert (await usage(world, lic, ds, row["period"]))["free"]["used"] == 0


async def _cut_short(world: World, path: str, token: str) -> tuple[int, bytes, str]:
    """GET ``path``: the status, the body received, the call id; the body is
    cut short (the connection closes before it is whole)."""
    async with world.client.get(path, headers={"Authorization": f"Bearer {token}"}) as resp:
        received = b""
        try:
            async for chunk in resp.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            return resp.status, received, resp.headers["X-Call-Id"]
        raise AssertionError(f"the body was not cut short: {received[:100]!r}")


async def test_a_trickling_upstream_is_cut_at_the_call_deadline(world: World) -> None:
    """Fault 5: a body dripping for 20 s on a 5 s timeout was served and
    charged: the timeout bounded the silence between chunks, not the call."""
    ds, lic, _app, token = await world.licensed(dataset_fields={"timeout_seconds": 1.0})
    path = f"/data/{ds['id']}/trickle"
    status, received, call_id = await _cut_short(world, f"{path}?seconds=6&every=0.1", token)
    assert status == 200
    assert 0 < len(received) < 60, received
    row = await record_of(world, call_id)
    assert (row["outcome"], row["problem"], row["charge_e4"]) == INCOMPLETE_UPSTREAM, row
    assert row["bytes"] == len(received)
    # Within the deadline: served whole, and charged.
    status, body, _resp = await world.call(f"{path}?seconds=0.3&every=0.1", token)
    assert status == 200
    assert set(body) == {ord(".")}
    assert (await usage(world, lic, ds, row["period"]))["free"]["used"] == 1


async def test_an_upstream_silent_past_its_idle_timeout_is_cut(world: World) -> None:
    ds, _lic, _app, token = await world.licensed(
        dataset_fields={"timeout_seconds": 30.0, "idle_timeout_seconds": 0.5}
    )
    status, received, call_id = await _cut_short(world, f"/data/{ds['id']}/drip", token)
    assert (status, received) == (200, b"first;")
    row = await record_of(world, call_id)
    assert (row["outcome"], row["problem"], row["charge_e4"]) == INCOMPLETE_UPSTREAM, row
    # Silent before its answer: 504, nothing sent, never charged.
    status, body, resp = await world.call(f"/data/{ds['id']}/slow?seconds=3", token)
    check_problem(status, body, resp, 504, "upstream-unavailable")
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["outcome"], row["status"], row["charge_e4"]) == ("upstream-failure", 504, 0), row


async def test_timeouts_are_dataset_fields_with_bounds(world: World) -> None:
    ds = await world.dataset(timeout_seconds=5.0, idle_timeout_seconds=2.0)
    assert (ds["timeout_seconds"], ds["idle_timeout_seconds"]) == (5.0, 2.0)
    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}", json={"idle_timeout_seconds": 0}, headers=world.admin
    ) as resp:
        assert resp.status == 400, await resp.text()
    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}", json={"idle_timeout_seconds": None}, headers=world.admin
    ) as resp:
        body: Any = await resp.json()
        assert resp.status == 200, body
        assert body["idle_timeout_seconds"] is None


async def test_a_chunked_body_over_the_limit_never_reaches_the_upstream(world_factory: WorldFactory) -> None:
    """Fault 6: a chunked request body over the limit reached the upstream
    (its head, and the body up to the limit) before the caller got 413."""
    world = await world_factory(proxy__max_body_bytes=64 * 1024)
    ds, _lic, _app, token = await world.licensed(dataset_fields=EVERY_METHOD)

    async def chunks(total: int) -> AsyncIterator[bytes]:
        for _ in range(total // 16384):
            yield b"b" * 16384
            await asyncio.sleep(0.02)

    auth = {"Authorization": f"Bearer {token}"}
    before = len(world.upstream.arrived)
    async with world.client.post(f"/data/{ds['id']}/digest", data=chunks(512 * 1024), headers=auth) as resp:
        check_problem(resp.status, await resp.json(content_type=None), resp, 413, "request-too-large")
        call_id = resp.headers["X-Call-Id"]
    await asyncio.sleep(0.2)
    assert world.upstream.arrived[before:] == []
    row = await record_of(world, call_id)
    assert (row["status"], row["outcome"], row["charge_e4"]) == (413, "refused", 0), row
    # Within the limit, chunked: forwarded whole.
    async with world.client.post(f"/data/{ds['id']}/digest", data=chunks(64 * 1024), headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["length"] == 64 * 1024
