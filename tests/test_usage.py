"""Usage per licence, dataset and period (DESIGN §3 "usage", §4): the admin
API ``GET /admin/v1/usage``, what a licensee-scoped admin token sees of it, and
the command line (``pdg usage``, ``pdg licence update`` for top-ups), all read
from the counters the gateway charges, after calls made through the running
gateway."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.state import ADMIN_TOKENS
from licensing.schemas import AdminTokenIn
from tests.conftest import World
from tests.test_cli import apdg, environment
from tests.test_data_plane import check_problem, eventually
from tests.test_quota import NOW, PERIOD, WorldFactory, refused, served, stop_clock, usage, usage_rows


@pytest.fixture
async def world(world_factory: WorldFactory) -> World:
    """The gateway of ``conftest``, its clock stopped at ``NOW`` (in ``PERIOD``)."""
    started = await world_factory()
    stop_clock(started, NOW)
    return started


def row(
    licence: dict[str, Any], dataset: dict[str, Any], period: str, free: tuple[int, int], paid: Any
) -> Any:
    """The usage row expected: ``free`` as (limit, used)."""
    return {
        "licence_id": licence["id"],
        "licensee_id": licence["licensee_id"],
        "dataset": dataset["id"],
        "period": period,
        "free": {"limit": free[0], "used": free[1], "remaining": free[0] - free[1]},
        "paid": paid,
    }


def prepaid(calls: int, limit: int, used: int) -> dict[str, Any]:
    return {
        "terms": "prepaid",
        "calls": calls,
        "limit": str(limit),
        "used": str(used),
        "remaining": str(limit - used),
        "unit": "calls",
    }


def cli_env(world: World, tmp_path: Path) -> dict[str, str]:
    """``pdg`` on the world's own database and quota store."""
    return environment(
        tmp_path / "cli-data",
        PDG_DATABASE_URL=world.backend.database_url,
        PDG_REDIS_URL=world.backend.redis_url,
    )


async def test_usage_per_licence_dataset_and_period(world: World) -> None:
    clock = stop_clock(world, datetime(2026, 11, 30, 15, 59, 59, tzinfo=UTC))
    ds_a = await world.dataset(free_monthly_calls=5)
    ds_b = await world.dataset(free_monthly_calls=7)
    licensee = await world.licensee()
    lic = await world.licence(licensee["id"], [ds_a["id"], ds_b["id"]], paid={"prepaid_calls": 10})
    app = await world.app_client(licensee["id"])
    both = f"dataset:{ds_a['id']} dataset:{ds_b['id']}"
    free = await world.token(app, f"purpose:public-interest {both}")
    paid = await world.token(app, f"purpose:industrial {both}")
    # Another licensee, on ds_a only, with a licence's own free allowance.
    other_ee = await world.licensee()
    other = await world.licence(other_ee["id"], [ds_a["id"]], free_monthly_calls=2)
    other_app = await world.app_client(other_ee["id"])
    other_free = await world.token(other_app, f"purpose:public-interest dataset:{ds_a['id']}")

    for path, token in [("a", free), ("a", free), ("a", paid), ("b", free), ("a", other_free)]:
        await served(world, f"/data/{(ds_a if path == 'a' else ds_b)['id']}/x", token)
    clock.now += timedelta(seconds=1)  # 2026-12 in Shanghai
    for path, token in [("a", free), ("b", paid)]:
        await served(world, f"/data/{(ds_a if path == 'a' else ds_b)['id']}/x", token)

    # A prepaid balance has no period: every row shows it as it stands now,
    # beside the paid calls made on the row's dataset in the row's period.
    november = [
        row(lic, ds_a, "2026-11", (5, 2), prepaid(1, 10, 2)),
        row(lic, ds_b, "2026-11", (7, 1), prepaid(0, 10, 2)),
    ]
    december = [
        row(lic, ds_a, "2026-12", (5, 1), prepaid(0, 10, 2)),
        row(lic, ds_b, "2026-12", (7, 0), prepaid(1, 10, 2)),
    ]
    assert await usage_rows(world, licence=lic["id"], period="2026-11") == november
    assert await usage_rows(world, licence=lic["id"], period="2026-12") == december
    assert await usage_rows(world, licence=lic["id"]) == december  # the gateway's current period
    assert await usage_rows(world, licence=lic["id"], dataset=ds_b["id"], period="2026-12") == december[1:]
    assert await usage_rows(world, dataset=ds_a["id"], period="2026-11") == sorted(
        [november[0], row(other, ds_a, "2026-11", (2, 1), prepaid(0, 1000, 0))], key=lambda r: r["licence_id"]
    )
    assert await usage_rows(world, licensee=other_ee["id"], period="2026-11") == [
        row(other, ds_a, "2026-11", (2, 1), prepaid(0, 1000, 0))
    ]
    # Before anything was used; and names that match nothing.
    assert await usage_rows(world, licence=lic["id"], period="2026-10") == [
        row(lic, ds_a, "2026-10", (5, 0), prepaid(0, 10, 2)),
        row(lic, ds_b, "2026-10", (7, 0), prepaid(0, 10, 2)),
    ]
    assert await usage_rows(world, licence="no-such-licence", period="2026-11") == []
    assert await usage_rows(world, licence=other["id"], dataset=ds_b["id"], period="2026-11") == []


async def test_paid_calls_stay_reported_after_paid_terms_end(world: World) -> None:
    ds, lic, _app, token = await world.licensed(purpose="industrial")
    await served(world, f"/data/{ds['id']}/x", token)
    async with world.client.patch(
        f"/admin/v1/licences/{lic['id']}", json={"paid": None}, headers=world.admin
    ) as resp:
        assert resp.status == 200, await resp.text()
    await refused(world, f"/data/{ds['id']}/x", token, 402, "payment-required")
    assert (await usage(world, lic, ds, PERIOD))["paid"] == {
        "terms": "none", "calls": 1, "limit": "0", "used": "0", "remaining": "0", "unit": "calls",
    }  # fmt: skip


async def test_a_bad_period_is_refused_naming_it(world: World) -> None:
    fullwidth = "\uff12\uff10\uff12\uff16-11"  # digits, but not ASCII ones
    bad = (
        "2026-13",
        "2026-00",
        "2026-1",
        "26-11",
        "2026/11",
        "2026-11-01",
        "Nov",
        fullwidth,
        "0000-01",
        "9999-12",
    )
    for period in bad:
        async with world.client.get(
            "/admin/v1/usage", params={"period": period}, headers=world.admin
        ) as resp:
            body = await resp.json(content_type=None)
            check_problem(resp.status, body, resp, 400, "bad-request")
        assert body["field"] == "period", body
        assert body["detail"].startswith("period:"), body


async def test_a_licensee_sees_only_its_own_usage(world: World, tmp_path: Path) -> None:
    ds = await world.dataset(free_monthly_calls=10)
    other_ds = await world.dataset(free_monthly_calls=10)
    mine, theirs = await world.licensee(), await world.licensee()
    my_lic = await world.licence(mine["id"], [ds["id"]])
    their_lic = await world.licence(theirs["id"], [ds["id"], other_ds["id"]])
    for licensee, times in ((mine, 1), (theirs, 3)):
        app = await world.app_client(licensee["id"])
        token = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
        for _ in range(times):
            await served(world, f"/data/{ds['id']}/x", token)

    # One token from the command line, one from the service itself.
    created = await apdg(
        "admin-token", "create", "--role", "licensee", "--licensee", mine["id"], "--json",
        env=cli_env(world, tmp_path), cwd=tmp_path,
    )  # fmt: skip
    my_token = created.json()["token"]
    their_token = (
        await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="licensee", licensee_id=theirs["id"]))
    ).token

    as_me = {"Authorization": f"Bearer {my_token}"}
    as_them = {"Authorization": f"Bearer {their_token}"}
    assert await usage_rows(world, as_me, period=PERIOD) == [
        row(my_lic, ds, PERIOD, (10, 1), prepaid(0, 1000, 0))
    ]
    assert await usage_rows(world, as_them, period=PERIOD) == [
        row(their_lic, ds, PERIOD, (10, 3), prepaid(0, 1000, 0)),
        row(their_lic, other_ds, PERIOD, (10, 0), prepaid(0, 1000, 0)),
    ]
    # Asking for another licensee's rows by any name finds nothing.
    for query in ({"licence": their_lic["id"]}, {"licensee": theirs["id"]}, {"dataset": other_ds["id"]}):
        assert await usage_rows(world, as_me, period=PERIOD, **query) == []
    assert await usage_rows(world, as_me, dataset=ds["id"]) == await usage_rows(
        world, as_me, licensee=mine["id"]
    )
    assert len(await usage_rows(world, period=PERIOD)) == 3  # the operator sees everyone
    # A licensee can read its balance, not top it up.
    async with world.client.patch(
        f"/admin/v1/licences/{my_lic['id']}", json={"paid": {"prepaid_calls": 10**6}}, headers=as_me
    ) as resp:
        body = await resp.json(content_type=None)
        check_problem(resp.status, body, resp, 403, "forbidden")


async def test_pdg_usage_prints_what_the_admin_api_shows(world: World, tmp_path: Path) -> None:
    ds, lic, app, free = await world.licensed(
        dataset_fields={"price": {"per_call_fen": "0.0125", "per_record_fen": "0"}},
        licence_fields={"paid": {"credit_limit_fen": 1}},
    )
    paid = await world.token(app, f"purpose:industrial dataset:{ds['id']}")
    for token in (free, free, paid, paid, paid):
        await served(world, f"/data/{ds['id']}/x", token)
    credit = {
        "terms": "credit",
        "calls": 3,
        "limit": "1",
        "used": "0.0375",
        "remaining": "0.9625",
        "unit": "fen",
    }
    expected = [row(lic, ds, PERIOD, (100, 2), credit)]
    assert await usage_rows(world, licence=lic["id"], period=PERIOD) == expected

    env = cli_env(world, tmp_path)
    one_row = ("--licence", lic["id"], "--dataset", ds["id"])
    everything, one, bad = await asyncio.gather(
        apdg("usage", "--period", PERIOD, "--json", env=env, cwd=tmp_path),
        apdg("usage", *one_row, "--period", PERIOD, "--json", env=env, cwd=tmp_path),
        apdg("usage", "--period", "2026-13", env=env, cwd=tmp_path),
    )
    assert one.json() == expected
    assert everything.json() == await usage_rows(world, period=PERIOD)
    assert "period" in bad.failed(code=1)


async def test_pdg_licence_update_tops_up_a_prepaid_balance(world: World, tmp_path: Path) -> None:
    ds, lic, _app, token = await world.licensed(
        purpose="industrial", licence_fields={"paid": {"prepaid_calls": 2}}
    )
    path = f"/data/{ds['id']}/x"
    for _ in range(2):
        await served(world, path, token)
    await refused(world, path, token, 402, "payment-required")

    env = cli_env(world, tmp_path)
    updated = await apdg(
        "licence", "update", lic["id"], "--prepaid-calls", "4", "--json", env=env, cwd=tmp_path
    )
    assert updated.json()["paid"] == {"prepaid_calls": 4, "credit_limit_fen": None}

    # The gateway learns of a change made elsewhere within 2 s (DESIGN §7).
    async def topped_up() -> bool:
        status, _, _ = await world.call(path, token)
        return status == 200

    await eventually(topped_up, within=2.5)
    await served(world, path, token)
    await refused(world, path, token, 402, "payment-required")
    expected = prepaid(4, 4, 4)
    assert (await usage(world, lic, ds, PERIOD))["paid"] == expected
    shown = await apdg("usage", "--licence", lic["id"], "--period", PERIOD, "--json", env=env, cwd=tmp_path)
    assert [r["paid"] for r in shown.json()] == [expected]
