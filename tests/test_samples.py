"""The sample upstream services (samples.upstreams), exercised over real HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from licensing.credit_code import validate_credit_code
from samples.upstreams import SAMPLE_DATASETS, SampleDataset, sample_app, start_sample_upstream

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> Client:
    return await aiohttp_client(sample_app())


async def get_json(client: Client, path: str, status: int = 200, **params: str | int) -> Any:
    resp = await client.get(path, params=params or None)
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    body = await resp.json()
    if status == 200:
        expected = len(body) if isinstance(body, list) else 1
        assert resp.headers["X-Record-Count"] == str(expected)
    else:
        assert set(body) == {"error"}
    return body


# ------------------------------------------------------------------ datasets


def test_sample_datasets() -> None:
    assert [d.id for d in SAMPLE_DATASETS] == ["ent-registry", "weather-obs", "bus-lines"]
    assert [d.prefix for d in SAMPLE_DATASETS] == ["/ent-registry", "/weather", "/bus"]
    assert [d.classification for d in SAMPLE_DATASETS] == [2, 1, 1]
    assert [d.open_class for d in SAMPLE_DATASETS] == ["conditional", "open", "open"]
    with pytest.raises(AttributeError):
        SAMPLE_DATASETS[0].id = "x"  # type: ignore[misc]


@pytest.mark.parametrize("dataset", SAMPLE_DATASETS, ids=lambda d: d.id)
async def test_example_paths_answer(client: Client, dataset: SampleDataset) -> None:
    body = await get_json(client, f"{dataset.prefix}/{dataset.example_path}")
    assert isinstance(body, list)
    assert body


# ------------------------------------------------------------ enterprise registry


async def test_enterprise_list_shape(client: Client) -> None:
    body = await get_json(client, "/ent-registry/enterprises")
    assert len(body) == 20
    fields = {
        "credit_code",
        "name",
        "legal_representative",
        "registered_capital",
        "establishment_date",
        "district",
        "industry",
        "status",
        "address",
    }
    for ent in body:
        assert set(ent) == fields
        assert ent["name"].startswith("武汉")
        assert ent["name"].endswith("公司")
        assert isinstance(ent["registered_capital"], int)
        assert ent["status"] in {"存续", "在业", "注销"}
        datetime.fromisoformat(ent["establishment_date"])


async def test_enterprise_all_codes_valid_and_unique(client: Client) -> None:
    everything: list[dict[str, Any]] = []
    page = 1
    while batch := await get_json(client, "/ent-registry/enterprises", page=page, size=100):
        everything.extend(batch)
        page += 1
    assert 400 <= len(everything) <= 600
    codes = [e["credit_code"] for e in everything]
    assert len(set(codes)) == len(codes)
    assert len({e["name"] for e in everything}) == len(everything)
    for code in codes:
        assert validate_credit_code(code) == code
        assert code.startswith("914201")
    statuses = [e["status"] for e in everything]
    assert statuses.count("存续") > len(statuses) / 2


async def test_enterprise_size_cap_and_paging(client: Client) -> None:
    assert len(await get_json(client, "/ent-registry/enterprises", size=1000)) == 100
    first = await get_json(client, "/ent-registry/enterprises", page=1, size=5)
    second = await get_json(client, "/ent-registry/enterprises", page=2, size=5)
    ten = await get_json(client, "/ent-registry/enterprises", page=1, size=10)
    assert first + second == ten
    assert await get_json(client, "/ent-registry/enterprises", page=999) == []


@pytest.mark.parametrize(("param", "value"), [("size", "0"), ("size", "abc"), ("page", "-1"), ("page", "x")])
async def test_enterprise_bad_paging(client: Client, param: str, value: str) -> None:
    await get_json(client, "/ent-registry/enterprises", status=400, **{param: value})


async def test_enterprise_filters(client: Client) -> None:
    body = await get_json(client, "/ent-registry/enterprises", name="光谷", size=3)
    assert len(body) == 3
    assert all("光谷" in e["name"] for e in body)
    hongshan = await get_json(client, "/ent-registry/enterprises", district="洪山区", size=100)
    assert hongshan
    assert all(e["district"] == "洪山区" for e in hongshan)
    assert await get_json(client, "/ent-registry/enterprises", district="420111", size=100) == hongshan
    assert await get_json(client, "/ent-registry/enterprises", district="洪山", size=100) == hongshan
    assert await get_json(client, "/ent-registry/enterprises", name="不存在的名字") == []


async def test_enterprise_lookup(client: Client) -> None:
    ent = (await get_json(client, "/ent-registry/enterprises", size=1))[0]
    code = ent["credit_code"]
    assert await get_json(client, f"/ent-registry/enterprises/{code}") == ent
    assert await get_json(client, f"/ent-registry/enterprises/{code.lower()}") == ent
    body = await get_json(client, "/ent-registry/enterprises/91420100MA4K000000", status=404)
    assert body == {"error": "not found"}


async def test_enterprise_deterministic(client: Client) -> None:
    a = await get_json(client, "/ent-registry/enterprises", size=100, page=3)
    b = await get_json(client, "/ent-registry/enterprises", size=100, page=3)
    assert a == b


async def test_non_ascii_is_utf8(client: Client) -> None:
    resp = await client.get("/ent-registry/enterprises", params={"size": "1"})
    raw = await resp.read()
    assert "武汉".encode() in raw
    assert b"\\u" not in raw


# -------------------------------------------------------------------- weather


async def test_stations(client: Client) -> None:
    stations = await get_json(client, "/weather/stations")
    assert 10 <= len(stations) <= 15
    ids = [s["id"] for s in stations]
    assert "57494" in ids
    assert len(set(ids)) == len(ids)
    for s in stations:
        assert {"id", "name", "district", "lat", "lon"} <= set(s)
        assert 29.9 < s["lat"] < 31.4
        assert 113.6 < s["lon"] < 115.1


async def test_observations(client: Client) -> None:
    obs = await get_json(client, "/weather/observations", station="57494", date="2026-11-26")
    assert len(obs) == 24
    assert [o["time"] for o in obs] == [f"2026-11-26T{h:02d}:00:00+08:00" for h in range(24)]
    for o in obs:
        assert o["station"] == "57494"
        assert -15 < o["temperature_c"] < 30
        assert round(o["temperature_c"], 1) == o["temperature_c"]
        assert 0 <= o["humidity_pct"] <= 100
        assert o["wind_speed_ms"] >= 0
        assert isinstance(o["wind_direction"], str)
        assert o["precipitation_mm"] >= 0
        assert 980 < o["pressure_hpa"] < 1045
    temps = [o["temperature_c"] for o in obs]
    assert sum(temps[12:17]) > sum(temps[3:8])  # afternoon warmer than early morning


async def test_observations_seasonal(client: Client) -> None:
    winter = await get_json(client, "/weather/observations", station="57484", date="2026-01-20")
    summer = await get_json(client, "/weather/observations", station="57484", date="2026-07-20")
    mean_winter = sum(o["temperature_c"] for o in winter) / 24
    mean_summer = sum(o["temperature_c"] for o in summer) / 24
    assert mean_summer - mean_winter > 12


async def test_observations_deterministic(client: Client) -> None:
    a = await get_json(client, "/weather/observations", station="57494", date="2026-03-01")
    b = await get_json(client, "/weather/observations", station="57494", date="2026-03-01")
    other_day = await get_json(client, "/weather/observations", station="57494", date="2026-03-02")
    other_station = await get_json(client, "/weather/observations", station="57491", date="2026-03-01")
    assert a == b
    assert a != other_day
    assert a != other_station


async def test_observations_default_date_is_today_in_shanghai(client: Client) -> None:
    before = datetime.now(timezone(timedelta(hours=8))).date().isoformat()
    obs = await get_json(client, "/weather/observations", station="57494")
    after = datetime.now(timezone(timedelta(hours=8))).date().isoformat()
    assert obs[0]["time"][:10] in {before, after}


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"station": ""},
        {"station": "99999"},
        {"station": "57494", "date": "2026-13-01"},
        {"station": "57494", "date": "yesterday"},
    ],
)
async def test_observations_bad_request(client: Client, params: dict[str, str]) -> None:
    await get_json(client, "/weather/observations", status=400, **params)


# ------------------------------------------------------------------------ bus


async def test_bus_lines(client: Client) -> None:
    lines = await get_json(client, "/bus/lines")
    assert 35 <= len(lines) <= 45
    names = {line["name"] for line in lines}
    assert {"1路", "402路", "电车1路"} <= names
    assert len({line["id"] for line in lines}) == len(lines)
    for line in lines:
        assert "stops" not in line
        assert {"id", "name", "operator", "first_bus", "last_bus", "fare_yuan"} <= set(line)
        assert line["first_bus"] < line["last_bus"]
        assert line["fare_yuan"] > 0
        assert 10 <= line["stop_count"] <= 30


async def test_bus_line_detail_and_stops(client: Client) -> None:
    lines = await get_json(client, "/bus/lines")
    for summary in lines[:5]:
        detail = await get_json(client, f"/bus/lines/{summary['id']}")
        stops = detail.pop("stops")
        assert detail == summary
        assert len(stops) == summary["stop_count"]
        assert [s["seq"] for s in stops] == list(range(1, len(stops) + 1))
        assert len({s["name"] for s in stops}) == len(stops)
        assert stops[0]["name"] == summary["origin"]
        assert stops[-1]["name"] == summary["terminus"]
        for s in stops:
            assert 29.9 < s["lat"] < 31.4
            assert 113.6 < s["lon"] < 115.1
        assert await get_json(client, f"/bus/lines/{summary['id']}/stops") == stops


async def test_bus_line_by_name(client: Client) -> None:
    by_name = await get_json(client, "/bus/lines/402路")
    by_id = await get_json(client, "/bus/lines/402")
    assert by_name == by_id
    assert by_name["name"] == "402路"


async def test_bus_deterministic(client: Client) -> None:
    assert await get_json(client, "/bus/lines/1") == await get_json(client, "/bus/lines/1")


@pytest.mark.parametrize("path", ["/bus/lines/9999", "/bus/lines/9999/stops", "/bus/nothing", "/nowhere"])
async def test_unknown_is_404_json(client: Client, path: str) -> None:
    assert await get_json(client, path, status=404) == {"error": "not found"}


async def test_wrong_method_is_405_json(client: Client) -> None:
    resp = await client.post("/bus/lines")
    assert resp.status == 405
    assert await resp.json() == {"error": "method not allowed"}
    assert "GET" in resp.headers["Allow"]


# ------------------------------------------------------------------- upstream


async def test_start_sample_upstream() -> None:
    runner, port = await start_sample_upstream()
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/weather/stations") as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
            assert resp.headers["X-Record-Count"] == str(len(body))
    finally:
        await runner.cleanup()
