"""The operations endpoints apart from the public port: ``/metrics`` on
``server.metrics_listen`` only, behind ``server.metrics_token`` when set; the
public port keeps ``/healthz`` and ``/readyz`` and serves no ``/metrics``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from config.settings import ConfigurationError, load_settings
from tests.conftest import World, free_port

WorldFactory = Callable[..., Awaitable[World]]


async def test_metrics_on_their_own_address_behind_a_token(world_factory: WorldFactory) -> None:
    port = free_port()
    world = await world_factory(server__metrics_listen=f"127.0.0.1:{port}", server__metrics_token="m-token")
    ds, _lic, _app, token = await world.licensed()
    status, body, _ = await world.call(f"/data/{ds['id']}/records", token)
    assert status == 200, body
    async with world.client.get("/metrics") as resp:
        assert resp.status == 404
    for path in ("/healthz", "/readyz"):
        async with world.client.get(path) as resp:
            assert resp.status == 200, path

    ops = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{ops}/metrics") as resp:
            assert resp.status == 401
            assert resp.headers["Content-Type"].startswith("application/problem+json")
            assert resp.headers["Server"] == "pdg"
        async with http.get(f"{ops}/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(f"{ops}/metrics", headers={"Authorization": "Bearer m-token"}) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert f'pdg_data_calls_total{{dataset="{ds["id"]}",outcome="2xx"}} 1.0' in text
        for path, expected in (("/healthz", 200), ("/readyz", 200), ("/admin/v1/datasets", 404)):
            async with http.get(f"{ops}{path}") as resp:
                assert resp.status == expected, path
        async with http.get(
            f"{ops}/data/{ds['id']}/records", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 404


async def test_a_metrics_token_on_the_public_port(world_factory: WorldFactory) -> None:
    world = await world_factory(server__metrics_token="m-token")
    async with world.client.get("/metrics") as resp:
        assert resp.status == 401
    async with world.client.get("/metrics", headers={"Authorization": "Bearer m-token"}) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("value", ["9464", "localhost", "127.0.0.1:", "127.0.0.1:99999", ":9464"])
def test_a_bad_listen_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError, match="metrics_listen"):
        load_settings(env={"PDG_METRICS_LISTEN": value})
