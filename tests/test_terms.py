"""Terms at call time (issue: nothing bypasses the meter): a dataset's price,
tiers and revenue split are versioned; every call record names the version it
was charged under; a close splits each call by its own version (a line per
version); a change applies from the next call on, on every replica; and
reconciliation re-prices every billed call from the version it names
(``price-mismatch``). Through a real gateway and upstream, on SQLite +
embedded Valkey and on PostgreSQL + Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text, update

from billing.reconcile import PRICE_MISMATCH, _check_prices, _Differences
from gateway.state import ADMIN_TOKENS, CATALOGUE, CLOCK, ENGINE
from ledger.models import CallRow
from licensing.models import DatasetTermsRow
from licensing.registry import Registry
from licensing.schemas import AdminTokenIn, DatasetIn, Price, RevenueSplit, Tier
from storage.db import session_factory
from tests.conftest import World
from tests.test_billing import MID_NOV, Books, books  # noqa: F401  (the fixture)
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

IN_NOVEMBER = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
AFTER_NOVEMBER = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
V1 = {
    "price": {"per_call_fen": "2.5", "per_record_fen": "0", "tiers": [{"up_to": 2, "per_call_fen": "4"}]},
    "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
}
#: Version 2 keeps the tiers, lowers the price past them and changes the split.
V2 = {
    "price": {"per_call_fen": "3", "per_record_fen": "0", "tiers": [{"up_to": 2, "per_call_fen": "4"}]},
    "revenue_split": {"provider": "0.7", "operator": "0.2", "public_fund": "0.1"},
}


async def patch(world: World, dataset_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with world.client.patch(
        f"/admin/v1/datasets/{dataset_id}", json=payload, headers=world.admin
    ) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
        return dict(body)


async def admin_get(world: World, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with world.client.get(f"/admin/v1{path}", headers=headers or world.admin) as resp:
        return resp.status, await resp.json(content_type=None)


async def finance(world: World) -> dict[str, str]:
    token = (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    return {"Authorization": f"Bearer {token}"}


async def test_a_split_changed_between_two_calls_splits_each_its_own_way(world: World) -> None:
    """Two paid calls, a change of price and split, two more, and a free call:
    each record names its version and is charged by it (the tier positions go
    on across the change), the close bills a line per version split its own
    way, and the period reconciles. A price list altered afterwards is found
    call by call."""
    clock = StoppedClock(IN_NOVEMBER)
    world.app[CLOCK].source = clock
    ds, _lic, app, paid = await world.licensed(
        purpose="industrial",
        dataset_fields={**V1, "max_records_per_call": 100},
        licence_fields={"paid": {"credit_limit_fen": 10_000}},
    )
    assert ds["terms_version"] == 1
    free = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
    path = f"/data/{ds['id']}/records?n=1"
    for _ in range(2):
        status, body, _ = await world.call(path, paid)
        assert status == 200, body

    changed = await patch(world, ds["id"], V2)
    assert changed["terms_version"] == 2
    assert changed["revenue_split"] == {"provider": "0.7", "operator": "0.2", "public_fund": "0.1"}
    # A change that leaves the terms as they are makes no version.
    assert (await patch(world, ds["id"], {"name": "Renamed", **V2}))["terms_version"] == 2
    for token in (paid, paid, free):
        status, body, _ = await world.call(path, token)
        assert status == 200, body

    rows = await records_of(world, 5)
    assert [(r["purpose"], r["terms_version"], r["charge_e4"]) for r in rows] == [
        ("industrial", 1, 40_000),  # paid call 1: tier (up to 2) at 4 fen
        ("industrial", 1, 40_000),
        ("industrial", 2, 30_000),  # paid call 3: past the tier, version 2's 3 fen
        ("industrial", 2, 30_000),
        ("public-interest", 2, 0),
    ]

    status, versions = await admin_get(world, f"/datasets/{ds['id']}/terms")
    assert status == 200, versions
    assert [(v["version"], v["revenue_split"]["provider"], v["price"]["per_call_fen"]) for v in versions] == [
        (1, "0.5", "2.5"),
        (2, "0.7", "3"),
    ]
    assert versions[0]["effective_from"] <= versions[1]["effective_from"]
    status, problem = await admin_get(world, "/datasets/no-such-dataset/terms")
    assert (status, problem["code"]) == (404, "not-found"), problem

    clock.now = AFTER_NOVEMBER
    headers = await finance(world)
    async with world.client.post("/admin/v1/billing/2026-11/close?issue=true", headers=headers) as resp:
        closed = await resp.json(content_type=None)
        assert resp.status == 201, closed
    (invoice,) = closed["invoices"]
    lines = [
        (ln["purpose"], ln["terms_version"], ln["calls"], ln["amount_fen"], ln["split"], ln["revenue_split"])
        for ln in invoice["lines"]
    ]
    assert lines == [
        # 8 fen at 0.5/0.3/0.2: 4 / 2.4 / 1.6 -> 4 / 2 / 2 (the fen left to the largest remainder).
        (
            "industrial",
            1,
            2,
            8,
            {"provider_fen": 4, "operator_fen": 2, "public_fund_fen": 2},
            {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
        ),
        # 6 fen at 0.7/0.2/0.1: 4.2 / 1.2 / 0.6 -> 4 / 1 / 1.
        (
            "industrial",
            2,
            2,
            6,
            {"provider_fen": 4, "operator_fen": 1, "public_fund_fen": 1},
            {"provider": "0.7", "operator": "0.2", "public_fund": "0.1"},
        ),
        (
            "public-interest",
            2,
            1,
            0,
            {"provider_fen": 0, "operator_fen": 0, "public_fund_fen": 0},
            {"provider": "0.7", "operator": "0.2", "public_fund": "0.1"},
        ),
    ]
    assert invoice["subtotal_fen"] == 14

    status, report = await admin_get(world, "/reconciliation/2026-11", headers)
    assert status == 200, report
    assert report["clean"], report["differences"]

    # Version 1's price list altered in the database after the fact (its
    # guard dropped first): reconciliation re-prices the calls it names.
    async with world.app[ENGINE].begin() as conn:
        if world.backend.database_url.startswith("postgresql"):
            await conn.execute(text("DROP TRIGGER dataset_terms_append_only ON dataset_terms"))
        else:
            await conn.execute(text("DROP TRIGGER dataset_terms_no_update"))
        await conn.execute(
            update(DatasetTermsRow)
            .where(DatasetTermsRow.dataset_id == ds["id"], DatasetTermsRow.version == 1)
            .values(tiers=[{"up_to": 1, "per_call_e4": 40_000}])
        )
    status, report = await admin_get(world, "/reconciliation/2026-11", headers)
    assert status == 200, report
    found = {(d["call_id"], d["cause"]) for d in report["differences"]}
    # Paid call 2 is now past a 1-call tier: 2.5 fen, not the 4 it was charged.
    assert found == {(rows[1]["call_id"], "price-mismatch")}, report["differences"]
    (difference,) = report["differences"]
    assert "costs 25,000" in difference["detail"], difference


async def test_the_terms_are_versioned_in_the_database_and_append_only(world: World) -> None:
    """Every version is kept; none can be changed or removed in place."""
    ds = await world.dataset(**V1)
    await patch(world, ds["id"], V2)
    await patch(world, ds["id"], V1)  # back to the first terms: a third version, not the first again
    status, versions = await admin_get(world, f"/datasets/{ds['id']}/terms")
    assert status == 200, versions
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert versions[0]["price"] == versions[2]["price"]
    status, shown = await admin_get(world, f"/datasets/{ds['id']}")
    assert shown["terms_version"] == 3
    for statement in (
        "UPDATE dataset_terms SET per_call_e4 = 1 WHERE version = 1",
        "DELETE FROM dataset_terms WHERE version = 2",
    ):
        with pytest.raises(Exception, match="append-only"):  # however the driver words it
            async with world.app[ENGINE].begin() as conn:
                await conn.execute(text(statement))


async def test_a_terms_change_applies_from_the_next_call_on_every_replica(world_factory: Any) -> None:
    """Two replicas that poll the catalogue only every 3 s: a change of price
    made on one returns once the other has it, so the other's very next call
    is charged under the new version."""
    one = await world_factory(server__catalogue_refresh_seconds=3.0)
    two = await world_factory(server__catalogue_refresh_seconds=3.0)
    for world in (one, two):
        world.app[CLOCK].source = StoppedClock(IN_NOVEMBER)
    ds, _lic, _app, paid = await one.licensed(
        purpose="industrial",
        dataset_fields={"price": {"per_call_fen": "2.5", "per_record_fen": "0"}},
        licence_fields={"paid": {"credit_limit_fen": 10_000}},
    )
    await two.app[CATALOGUE].reload()
    status, body, _ = await two.call(f"/data/{ds['id']}/records", paid)
    assert status == 200, body
    assert two.app[CATALOGUE].current.datasets[ds["id"]].terms_version == 1

    changed = await patch(one, ds["id"], {"price": {"per_call_fen": "7", "per_record_fen": "0"}})
    assert changed["terms_version"] == 2
    # Not from a reload of its own: replica two heard of the change before the PATCH answered.
    assert two.app[CATALOGUE].current.datasets[ds["id"]].terms_version == 2
    status, body, _ = await two.call(f"/data/{ds['id']}/records", paid)
    assert status == 200, body
    rows = await records_of(one, 2)
    assert [(r["terms_version"], r["charge_e4"]) for r in rows] == [(1, 25_000), (2, 70_000)]


async def test_a_licensee_sees_the_catalogue_without_its_upstreams(world: World) -> None:
    """DESIGN §3: a licensee-scoped token reads datasets without
    ``upstream_url`` (the address it could call around the gateway) or other
    internal fields; an operator's token sees them."""
    ds = await world.dataset(timeout_seconds=5)
    lic_ee = await world.licensee()
    token = (
        await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="licensee", licensee_id=lic_ee["id"]))
    ).token
    own = {"Authorization": f"Bearer {token}"}
    status, one = await admin_get(world, f"/datasets/{ds['id']}", own)
    assert status == 200, one
    assert "upstream_url" not in one
    assert "timeout_seconds" not in one
    assert (one["id"], one["terms_version"]) == (ds["id"], 1)
    status, listed = await admin_get(world, "/datasets", own)
    assert status == 200, listed
    assert [d["id"] for d in listed] == [ds["id"]]
    assert "upstream_url" not in listed[0]
    status, full = await admin_get(world, f"/datasets/{ds['id']}")
    assert (full["upstream_url"], full["timeout_seconds"]) == (world.upstream.url, 5)


async def test_charges_are_repriced_by_position_or_as_a_whole_on_a_cluster(books: Books) -> None:  # noqa: F811
    """A tier of two calls at 4 fen, then 2.5 fen. Calls charged 2.5 then 4
    (positions swapped, as a Cluster may append them) are each wrong in
    ``seq`` order and right as a whole; a charge no position has is wrong
    either way; and so is a call naming terms its dataset never had."""
    registry = Registry(session_factory(books.engine))
    await registry.create_dataset(
        DatasetIn(
            id="ds-tiered",
            name="tiered",
            provider="prov",
            upstream_url="http://127.0.0.1:9/",
            classification=1,
            open_class="open",
            price=Price(per_call_fen="2.5", tiers=[Tier(up_to=2, per_call_fen="4")]),
            revenue_split=RevenueSplit(provider="0.5", operator="0.3", public_fund="0.2"),
        )
    )
    spec = ("lic-a", "ds-tiered", "industrial", "served")
    await books.calls(
        (*spec, 25_000, 0, MID_NOV),  # position 1, charged position 3's price
        (*spec, 40_000, 0, MID_NOV),
        (*spec, 40_000, 0, MID_NOV),  # position 3, charged position 1's
        (*spec, 26_000, 0, MID_NOV),  # no position costs 2.6 fen
        ("lic-a", "ds-tiered", "public-interest", "served", 0, 0, MID_NOV),
    )
    async with books.engine.connect() as conn:
        ids = [r.call_id for r in await conn.execute(select(CallRow.call_id).order_by(CallRow.seq))]

    async def mismatched(*, interleaved: bool) -> set[str | None]:
        found = _Differences(None)
        async with books.engine.connect() as conn:
            await _check_prices(conn, found, "2026-11", interleaved=interleaved)
        assert {d["cause"] for d in found.kept} <= {PRICE_MISMATCH}
        return {d["call_id"] for d in found.kept}

    assert await mismatched(interleaved=False) == {ids[0], ids[2], ids[3]}
    assert await mismatched(interleaved=True) == {ids[3]}
    # A record that names a version the dataset never had.
    books.terms_version = 9
    await books.calls((*spec, 25_000, 0, MID_NOV))
    async with books.engine.connect() as conn:
        last = await conn.scalar(select(CallRow.call_id).order_by(CallRow.seq.desc()).limit(1))
    assert await mismatched(interleaved=True) == {ids[3], last}
