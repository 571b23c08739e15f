"""The operations endpoints apart from the public port: ``/metrics`` on
``server.metrics_listen`` only, behind ``server.metrics_token`` when set; the
public port keeps ``/healthz`` and ``/readyz`` and serves no ``/metrics``. The
admin API on ``server.admin_listen``, likewise."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from config.settings import ConfigurationError, load_settings
from gateway import __version__
from tests.conftest import World, credit_code, free_port

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
        labels = f'dataset="{ds["id"]}",outcome="2xx",purpose="public-interest"'
        assert f"pdg_data_calls_total{{{labels}}} 1.0" in text
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


async def test_the_admin_api_on_its_own_address(world_factory: WorldFactory) -> None:
    """``server.admin_listen``: ``/admin/v1`` answers there only; what it
    changes applies to the data plane on the public port at once."""
    port = free_port()
    world = await world_factory(server__admin_listen=f"127.0.0.1:{port}")
    async with world.client.get("/admin/v1/datasets", headers=world.admin) as resp:
        assert resp.status == 404
    admin = f"http://127.0.0.1:{port}/admin/v1"
    async with aiohttp.ClientSession(headers=world.admin) as http:
        async with http.get(f"{admin}/datasets") as resp:
            assert resp.status == 200
            assert resp.headers["Server"] == "pdg"
        async with http.get(f"{admin}/openapi.json") as resp:
            assert resp.status == 200
        dataset = {
            "id": "apart",
            "name": "Apart",
            "provider": "p",
            "upstream_url": world.upstream.url,
            "classification": 1,
            "open_class": "open",
            "free_monthly_calls": 10,
            "price": {"per_call_fen": "1", "per_record_fen": "0"},
            "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
        }
        async with http.post(f"{admin}/datasets", json=dataset) as resp:
            assert resp.status == 201, await resp.text()
        async with http.post(
            f"{admin}/licensees", json={"name": "Apart Co", "credit_code": credit_code()}
        ) as resp:
            licensee = await resp.json()
        licence = {
            "licensee_id": licensee["id"],
            "datasets": ["apart"],
            "max_classification": 1,
            "purposes": ["public-interest"],
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2099-01-01T00:00:00Z",
            "security_officer": "Officer Li",
        }
        async with http.post(f"{admin}/licences", json=licence) as resp:
            assert resp.status == 201, await resp.text()
        async with http.post(f"{admin}/apps", json={"licensee_id": licensee["id"], "name": "a"}) as resp:
            app = await resp.json()
        async with http.get(f"http://127.0.0.1:{port}/data/apart/records") as resp:
            assert resp.status == 404  # the data plane is not served there
    token = await world.token(app, "purpose:public-interest dataset:apart")
    status, body, _ = await world.call("/data/apart/records", token)
    assert status == 200, body


def samples(exposition: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample in a Prometheus exposition."""
    out: dict[str, float] = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_a_scrape_reports_what_the_gateway_depends_on(world_factory: WorldFactory) -> None:
    world = await world_factory(ledger__checkpoint_seconds=0.2)
    ds, _lic, _app, token = await world.licensed()
    status, body, _ = await world.call(f"/data/{ds['id']}/x", token)
    assert status == 200, body
    for _ in range(100):  # until the record is under a signed checkpoint
        async with world.client.get("/metrics") as resp:
            seen = samples(await resp.text())
        if not math.isnan(seen.get("pdg_ledger_last_checkpoint_age_seconds", math.nan)):
            break
        await asyncio.sleep(0.1)
    assert seen["pdg_database_up"] == 1
    assert seen["pdg_redis_up"] == 1
    assert seen[f'pdg_build_info{{version="{__version__}"}}'] == 1
    assert 0 <= seen["pdg_ledger_log_backlog"] < 1000
    assert 0 <= seen["pdg_licence_view_age_seconds"] < 2
    assert 0 <= seen["pdg_ledger_last_checkpoint_age_seconds"] < 60
    assert seen[f'pdg_data_calls_total{{dataset="{ds["id"]}",outcome="2xx",purpose="public-interest"}}'] == 1
    # A served call's time, split: the upstream's share and the gateway's.
    label = f'{{dataset="{ds["id"]}"}}'
    assert seen[f"pdg_upstream_seconds_count{label}"] == 1
    assert seen[f"pdg_gateway_overhead_seconds_count{label}"] == 1
    total = seen[f"pdg_data_call_seconds_sum{label}"]
    upstream = seen[f"pdg_upstream_seconds_sum{label}"]
    overhead = seen[f"pdg_gateway_overhead_seconds_sum{label}"]
    assert 0 < upstream < total
    assert abs(upstream + overhead - total) < 1e-6
