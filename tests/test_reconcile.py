"""Reconciliation over calls made through a real gateway (real upstream, the
quota counters in real Redis / embedded Valkey, the ledger on SQLite and
PostgreSQL): a clean period says so; a record deleted from the ledger, a
counter changed in Redis, an invoice line or invoice edited in the database
and a billed call dropped are each found by call id, and undoing each makes
the period clean again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from gateway.state import ADMIN_TOKENS, CLOCK, ENGINE, REDIS
from ledger.models import CallRow
from licensing.schemas import AdminTokenIn
from metering.periods import Period, parse_period, zone
from metering.quota import LicenceKeys
from tests.conftest import World
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

IN_NOVEMBER = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
AFTER_NOVEMBER = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@dataclass
class Month:
    world: World
    finance: dict[str, str]
    licence_a: str
    licence_b: str
    dataset: str
    #: The records of the month, in seq order.
    records: list[dict[str, Any]]
    config: Path

    @property
    def november(self) -> Period:
        return parse_period("2026-11", zone(self.world.settings.billing.time_zone))

    def calls(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.records if all(r[k] == v for k, v in match.items())]

    async def sql(self, *statements: str) -> None:
        async with self.world.app[ENGINE].begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))

    async def reconciliation(self, headers: dict[str, str] | None = None, query: str = "") -> tuple[int, Any]:
        async with self.world.client.get(
            f"/admin/v1/reconciliation/2026-11{query}", headers=headers or self.finance
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def differences(self) -> set[tuple[str | None, str]]:
        status, body = await self.reconciliation()
        assert status == 200, body
        assert body["difference_count"] == len(body["differences"])
        assert body["clean"] is (not body["differences"])
        return {(d["call_id"], d["cause"]) for d in body["differences"]}

    async def drop_guards(self, *tables: str) -> None:
        if self.world.backend.database_url.startswith("postgresql"):
            await self.sql(*(f"DROP TRIGGER {t}_append_only ON {t}" for t in tables))
        else:
            await self.sql(*(f"DROP TRIGGER {t}_no_{a}" for t in tables for a in ("update", "delete")))


@pytest.fixture
async def month(world_factory: Any, tmp_path: Path) -> Month:
    world = await world_factory()
    clock = StoppedClock(IN_NOVEMBER)
    world.app[CLOCK].source = clock
    ds = await world.dataset(price={"per_call_fen": "2.5", "per_record_fen": "0.1"}, max_records_per_call=100)
    a = await world.licensee()
    licence_a = await world.licence(a["id"], [ds["id"]], paid={"credit_limit_fen": 100_000})
    app_a = await world.app_client(a["id"])
    free = await world.token(app_a, f"purpose:public-interest dataset:{ds['id']}")
    paid = await world.token(app_a, f"purpose:industrial dataset:{ds['id']}")
    b = await world.licensee()
    licence_b = await world.licence(b["id"], [ds["id"]], paid={"prepaid_calls": 50})
    prepaid = await world.token(await world.app_client(b["id"]), f"purpose:industrial dataset:{ds['id']}")
    records = f"/data/{ds['id']}/records"
    for token, n in ((free, 3), (free, 1), (paid, 2), (paid, 5), (paid, 0), (prepaid, 4), (prepaid, 1)):
        status, body, _ = await world.call(f"{records}?n={n}", token)
        assert status == 200, body
    # A retry with the same Idempotency-Key: served again, charged once.
    for _ in range(2):
        status, body, _ = await world.call(f"{records}?n=2", free, headers={"Idempotency-Key": "k-1"})
        assert status == 200, body
    # An upstream failure: released, never charged.
    status, body, _ = await world.call(f"/data/{ds['id']}/status/503", paid)
    assert status == 502, body
    rows = await records_of(world, 10)
    assert len(rows) == 10
    assert [r["pool"] for r in rows if r["call_id"]].count("replay") == 1
    clock.now = AFTER_NOVEMBER
    tokens = world.app[ADMIN_TOKENS]
    finance = {"Authorization": f"Bearer {(await tokens.create(AdminTokenIn(role='finance'))).token}"}
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{world.settings.data_dir}"\n[storage]\n'
        f'database_url = "{world.backend.database_url}"\nredis_url = "{world.backend.redis_url}"\n',
        encoding="utf-8",
    )
    return Month(world, finance, licence_a["id"], licence_b["id"], ds["id"], rows, config)


async def close(month: Month) -> dict[str, Any]:
    async with month.world.client.post(
        "/admin/v1/billing/2026-11/close?issue=true", headers=month.finance
    ) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 201, body
        return dict(body)


async def test_a_clean_period_reconciles_and_says_so(month: Month, pdg: PdgRunner) -> None:  # noqa: F811
    status, body = await month.reconciliation()
    assert (status, body["code"]) == (409, "conflict"), body  # not closed yet
    assert "is not closed" in body["detail"]
    run = await pdg("billing", "reconcile", "2026-11", "--config", str(month.config))
    run.one_line_error("period 2026-11 is not closed: close it first")
    run = await pdg("billing", "reconcile", "2026-11", "--limit", "0", "--config", str(month.config))
    run.one_line_error("--limit must be at least 1")
    closed = await close(month)
    by_licensee = {inv["licensee_id"]: inv for inv in closed["invoices"]}
    a = next(inv for inv in closed["invoices"] if len(inv["lines"]) == 2)
    # The replay is served but not billed: 3 free calls on the line, not 4.
    assert [(ln["purpose"], ln["calls"]) for ln in a["lines"]] == [("industrial", 3), ("public-interest", 3)]
    # 3 paid calls at 2.5 fen + 7 records at 0.1 fen = 8.2 fen -> 8 fen.
    assert a["lines"][0]["amount_fen"] == 8
    assert len(by_licensee) == 2

    status, body = await month.reconciliation()
    assert status == 200, body
    assert body["clean"] is True
    assert body["difference_count"] == 0
    assert body["differences"] == []
    assert body["ledger"]["ok"] is True
    # Billed: 3 free + 3 credit (A) + 2 prepaid (B); counters: A free, A paid calls, A credit, B paid calls.
    assert body["checked"] == {"billed_calls": 8, "invoices": 2, "lines": 3, "counters": 4}
    assert body["summary"].startswith("period 2026-11 reconciles: zero differences.")

    run = await pdg("billing", "reconcile", "2026-11", "--config", str(month.config))
    assert run.code == 0, run
    assert "period 2026-11 reconciles: zero differences." in run.out
    assert "verification OK" in run.out

    # Who may: finance and auditors; not a viewer, nor a licensee.
    tokens = month.world.app[ADMIN_TOKENS]
    for role, expected in (("auditor", 200), ("viewer", 403), ("licence-admin", 403)):
        token = (await tokens.create(AdminTokenIn(role=role))).token
        status, body = await month.reconciliation({"Authorization": f"Bearer {token}"})
        assert status == expected, (role, body)
    status, body = await month.reconciliation(query="?limit=0")
    assert (status, body["code"]) == (400, "bad-request"), body


async def test_a_record_deleted_from_the_ledger_is_found_by_call_id(
    month: Month,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    await close(month)
    free = month.calls(licence_id=month.licence_a, pool="free", outcome="served")
    gone = free[1]
    await month.drop_guards("calls")
    await month.sql(f"DELETE FROM calls WHERE seq = {gone['seq']}")
    found = await month.differences()
    # The billed call is missing, the chain breaks there, and the free counter
    # now reads one more than the calls the ledger holds (named by its last call).
    assert found == {
        (gone["call_id"], "record-missing"),
        (gone["call_id"], "ledger-chain"),
        (free[-1]["call_id"], "counter-mismatch"),
    }
    _status, body = await month.reconciliation()
    counter = next(d for d in body["differences"] if d["cause"] == "counter-mismatch")
    assert counter["counter"] == LicenceKeys(month.licence_a).free(month.dataset, month.november)
    assert (counter["counter_value"], counter["recorded"]) == (3, 2)
    assert body["summary"].startswith("period 2026-11 does NOT reconcile: 3 difference(s)")

    run = await pdg("billing", "reconcile", "2026-11", "--config", str(month.config))
    assert run.code == 1, run
    assert f"record-missing        {gone['call_id']}" in run.out

    # Put the record back as it was: clean again.
    async with month.world.app[ENGINE].begin() as conn:
        await conn.execute(insert(CallRow).values(**gone))
    assert await month.differences() == set()


async def test_a_counter_changed_in_redis_is_found_by_call_id(month: Month) -> None:
    await close(month)
    redis = month.world.app[REDIS]
    keys_a, keys_b = LicenceKeys(month.licence_a), LicenceKeys(month.licence_b)
    credit = keys_a.credit(month.november)
    paid_b = keys_b.paid_calls(month.dataset, month.november)
    before = int(await redis.get(credit))
    await redis.decrby(credit, 1)
    await redis.incrby(paid_b, 5)
    found = await month.differences()
    last_credit = month.calls(licence_id=month.licence_a, pool="credit", outcome="served")[-1]
    last_prepaid = month.calls(licence_id=month.licence_b, pool="prepaid", outcome="served")[-1]
    assert found == {
        (last_credit["call_id"], "counter-mismatch"),
        (last_prepaid["call_id"], "counter-mismatch"),
    }
    _status, body = await month.reconciliation()
    by_counter = {d["counter"]: (d["counter_value"], d["recorded"]) for d in body["differences"]}
    assert by_counter == {credit: (before - 1, before), paid_b: (7, 2)}
    # A counter the ledger has no call for is a difference too, with no call to name.
    stray = keys_b.free(month.dataset, month.november)
    await redis.set(stray, 1)
    assert (None, "counter-mismatch") in await month.differences()
    await redis.delete(stray)
    await redis.incrby(credit, 1)
    await redis.decrby(paid_b, 5)
    assert await month.differences() == set()


async def test_an_invoice_line_edited_in_the_database_is_found_by_call_id(month: Month) -> None:
    closed = await close(month)
    a = next(inv for inv in closed["invoices"] if len(inv["lines"]) == 2)
    industrial = a["lines"][0]
    await month.drop_guards("invoice_lines", "invoices", "invoice_calls")
    await month.sql(
        f"UPDATE invoice_lines SET amount_fen = amount_fen + 100 "
        f"WHERE invoice_id = '{a['id']}' AND line_no = {industrial['line_no']}"
    )
    credit_calls = {
        r["call_id"] for r in month.calls(licence_id=month.licence_a, pool="credit", outcome="served")
    }
    assert await month.differences() == {(c, "invoice-line-altered") for c in credit_calls}
    _status, body = await month.reconciliation()
    assert {(d["invoice_id"], d["line_no"]) for d in body["differences"]} == {
        (a["id"], industrial["line_no"])
    }
    assert "amount_fen" in body["differences"][0]["detail"]
    await month.sql(
        f"UPDATE invoice_lines SET amount_fen = amount_fen - 100 "
        f"WHERE invoice_id = '{a['id']}' AND line_no = {industrial['line_no']}"
    )
    assert await month.differences() == set()

    # The invoice's own row: every call it billed is named.
    await month.sql(f"UPDATE invoices SET total_fen = total_fen + 1 WHERE id = '{a['id']}'")
    billed_a = {
        r["call_id"]
        for r in month.calls(licence_id=month.licence_a, outcome="served")
        if r["pool"] in ("free", "credit")
    }
    assert await month.differences() == {(c, "invoice-altered") for c in billed_a}
    await month.sql(f"UPDATE invoices SET total_fen = total_fen - 1 WHERE id = '{a['id']}'")

    # A billed call dropped from the invoice's copy: its record is now unbilled.
    dropped = month.calls(licence_id=month.licence_b, pool="prepaid", outcome="served")[0]
    await month.sql(f"DELETE FROM invoice_calls WHERE seq = {dropped['seq']}")
    assert await month.differences() == {(dropped["call_id"], "unbilled")}
