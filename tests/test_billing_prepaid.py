"""Prepaid calls as money, over a month of real calls through the gateway.

A licensee holds a prepaid licence (2 calls granted, an agreed unit price) on
one dataset and a credit licence on another. It runs out of prepaid calls
(402), buys two top-ups (invoiced at once, numbered and signed before the
month's invoice), and calls on. The month closes into drafts, then issued:
the granted calls at list price, the bought ones at 0 with what they were
bought at split, the credit calls priced. In December a credit note refunds
unused prepaid calls and another corrects a credit line (at that line's VAT
rate: the two datasets are taxed at 6% and 13%, VAT summed per rate, and an
invoice of several rates is corrected line by line); payments clear
every invoice and the statement's balance is zero; the payouts equal the
lines' and notes' splits to the fen; reconciliation and ``pdg audit verify``
are clean. Every figure is worked out here by hand from the prices."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.state import ADMIN_TOKENS, CLOCK
from licensing.schemas import AdminTokenIn
from tests.conftest import World
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_billing_issue import AFTER_NOV, IN_DEC, IN_NOV, SELLER, TAX_CODE
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

PARTIES = ("name", "credit_code", "address", "bank", "account")


class Month:
    def __init__(self, world: World, clock: StoppedClock, finance: dict[str, str]) -> None:
        self.world, self.clock, self.finance = world, clock, finance
        self.recorded = 0

    async def call(self, dataset: str, token: str, expect: int = 200) -> Any:
        """A data call, once its record (served or refused) is in the ledger."""
        status, body, _ = await self.world.call(f"/data/{dataset}/records?n=1", token)
        assert status == expect, body
        self.recorded += 1
        assert len(await records_of(self.world, self.recorded)) == self.recorded
        return body

    async def send(
        self, method: str, path: str, payload: Any = None, at: datetime | None = None, headers: Any = None
    ) -> tuple[int, Any]:
        if at is not None:
            self.clock.now = at
        async with self.world.client.request(
            method, f"/admin/v1{path}", json=payload, headers=headers or self.finance
        ) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def month(world_factory: Any) -> Month:
    world = await world_factory(
        **{f"billing__seller__{name}": value for name, value in SELLER.items()},
        billing__tax_code="3040203000000000000",
    )
    clock = StoppedClock(IN_NOV)
    world.app[CLOCK].source = clock
    finance = (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    return Month(world, clock, {"Authorization": f"Bearer {finance}"})


async def test_a_month_with_prepaid_top_ups_credit_calls_and_notes(
    month: Month,
    pdg: PdgRunner,  # noqa: F811
    tmp_path: Path,
) -> None:
    world = month.world
    weather = await world.dataset(name="气象观测", price={"per_call_fen": "2.5", "per_record_fen": "0"})
    firms = await world.dataset(name="企业登记信息", price={"per_call_fen": "4", "per_record_fen": "0"})
    status, body = await month.send(
        "PATCH", f"/datasets/{firms['id']}", {"tax_code": TAX_CODE, "vat_rate": "0.130"}, headers=world.admin
    )
    assert (status, body["vat_rate"]) == (200, "0.13"), body
    status, body = await month.send(
        "PATCH", f"/datasets/{firms['id']}", {"vat_rate": "1.5"}, headers=world.admin
    )
    assert status == 400, body
    buyer = await world.licensee(
        name="星河数据科技有限公司", address="科技路 9 号", bank="星河银行", account="9558801"
    )
    prepaid = await world.licence(
        buyer["id"], [weather["id"]], paid={"prepaid_calls": 2, "prepaid_unit_price_fen": "12.3456"}
    )
    assert prepaid["paid"] == {
        "credit_limit_fen": None,
        "prepaid_calls": 2,
        "prepaid_unit_price_fen": "12.3456",
    }
    credit = await world.licence(buyer["id"], [firms["id"]], paid={"credit_limit_fen": 100_000})
    app = await world.app_client(buyer["id"])
    on_weather = await world.token(app, f"purpose:industrial dataset:{weather['id']}")
    on_firms = await world.token(app, f"purpose:industrial dataset:{firms['id']}")

    # The 2 granted calls, then nothing left: 402.
    for _ in range(2):
        await month.call(weather["id"], on_weather)
    refused = await month.call(weather["id"], on_weather, expect=402)
    assert refused["code"] == "payment-required"

    # What a top-up refuses: no prepaid terms, no calls, a role that does not sell.
    top_ups = f"/licences/{prepaid['id']}/top-ups"
    status, body = await month.send("POST", f"/licences/{credit['id']}/top-ups", {"calls": 5})
    assert (status, body["code"]) == (409, "conflict"), body
    for bad in ({"calls": 0}, {"calls": "5"}, {"calls": 5, "unit_price_fen": "1.23456"}, {}):
        status, body = await month.send("POST", top_ups, bad)
        assert (status, body["code"]) in ((400, "bad-request"), (422, "validation-failed")), (bad, body)
    status, body = await month.send("POST", top_ups, {"calls": 5}, headers=world.admin)
    assert status == 403, body

    # Two purchases: at the agreed price, then at a price of their own.
    status, first = await month.send("POST", top_ups, {"calls": 5})
    assert status == 201, first
    assert (first["calls"], first["first_position"], first["unit_price_fen"]) == (5, 2, "12.3456")
    await month.call(weather["id"], on_weather)  # at once: the limit rose on the gateway
    status, second = await month.send("POST", top_ups, {"calls": 3, "unit_price_fen": "10"})
    assert status == 201, second
    assert (second["first_position"], second["unit_price_fen"]) == (7, "10")
    for _ in range(5):  # 8 in all: 2 granted, 5 of the first top-up, 1 of the second
        await month.call(weather["id"], on_weather)
    for _ in range(3):
        await month.call(firms["id"], on_firms)

    # Each top-up was invoiced when bought: issued, numbered, signed, parties and tax fields.
    status, bought = await month.send("GET", f"/invoices/{first['invoice_id']}")
    assert status == 200, bought
    assert (bought["kind"], bought["status"], bought["number"], bought["period"]) == (
        "top-up",
        "issued",
        "PDG-2026-000001",
        "2026-11",
    )
    # 5 x 12.3456 = 61.728 -> 62 fen; VAT 6% = 3.72 -> 4.
    assert (bought["subtotal_fen"], bought["vat_fen"], bought["total_fen"]) == (62, 4, 66)
    assert bought["buyer"] == {key: buyer[key] for key in PARTIES}
    assert (bought["seller"], bought["currency"]) == (SELLER, "CNY")
    (line,) = bought["lines"]
    assert (line["kind"], line["calls"], line["unit_price_fen"], line["charge_fen"], line["amount_fen"]) == (
        "top-up",
        5,
        "12.3456",
        "61.7280",
        62,
    )
    assert (line["tax_code"], line["vat_rate"], line["split"]) == (
        "3040203000000000000",
        "0.06",
        {"provider_fen": 0, "operator_fen": 0, "public_fund_fen": 0},
    )
    status, later = await month.send("GET", f"/invoices/{second['invoice_id']}")
    assert (later["number"], later["total_fen"]) == ("PDG-2026-000002", 32)  # 30 fen + 1.8 -> 2

    # The balance, in calls and money, from the call record.
    status, balance = await month.send("GET", f"/licences/{prepaid['id']}/prepaid")
    assert status == 200, balance
    assert {k: balance[k] for k in ("limit_calls", "used_calls", "remaining_calls", "granted_calls")} == {
        "limit_calls": 10,
        "used_calls": 8,
        "remaining_calls": 2,
        "granted_calls": 2,
    }
    assert (
        balance["bought_calls"],
        balance["bought_remaining_calls"],
        balance["bought_remaining_value_fen"],
    ) == (
        8,
        2,
        20,
    )
    assert [
        (t["used_calls"], t["remaining_calls"], t["remaining_value_fen"]) for t in balance["top_ups"]
    ] == [
        (5, 0, "0.0000"),
        (1, 2, "20.0000"),
    ]
    # Calls bought are never taken back; granting more keeps the agreed price.
    for paid in ({"prepaid_calls": 9}, {"credit_limit_fen": 5}):
        status, body = await month.send(
            "PATCH", f"/licences/{prepaid['id']}", {"paid": paid}, headers=world.admin
        )
        assert (status, body["code"]) == (409, "conflict"), body
    status, body = await month.send(
        "PATCH", f"/licences/{prepaid['id']}", {"paid": {"prepaid_calls": 12}}, headers=world.admin
    )
    assert status == 200, body
    assert body["paid"]["prepaid_unit_price_fen"] == "12.3456"

    # The month: drafts, then issued.
    status, closed = await month.send("POST", "/billing/2026-11/close", at=AFTER_NOV)
    assert status == 201, closed
    (draft,) = closed["invoices"]
    # The credit calls at list price (3 x 4 fen), the granted calls too (2 x 2.5), the bought ones at 0.
    assert sorted(
        (ln["dataset"], ln["kind"], ln["calls"], ln["amount_fen"]) for ln in draft["lines"]
    ) == sorted(
        [(firms["id"], "usage", 3, 12), (weather["id"], "usage", 2, 5), (weather["id"], "prepaid", 6, 0)]
    )
    lines = {(ln["dataset"], ln["kind"]): ln for ln in draft["lines"]}
    used = lines[weather["id"], "prepaid"]
    assert (used["calls"], used["amount_fen"], used["charge_fen"], used["prepaid_value_fen"]) == (
        6,
        0,
        "0",
        "71.7280",
    )
    # 5 x 12.3456 + 1 x 10 = 71.728 -> 72 fen, split 0.5 / 0.3 / 0.2:
    # 36, 21.6, 14.4 -> 36, 22 (largest remainder), 14.
    assert used["split"] == {"provider_fen": 36, "operator_fen": 22, "public_fund_fen": 14}
    assert lines[weather["id"], "usage"]["amount_fen"] == 5
    assert (lines[firms["id"], "usage"]["tax_code"], lines[firms["id"], "usage"]["vat_rate"]) == (
        TAX_CODE,
        "0.13",
    )
    assert lines[weather["id"], "usage"]["vat_rate"] == "0.06"
    # VAT per rate, rounded once each: 5 fen at 6% = 0.3 -> 0; 12 fen at 13% = 1.56 -> 2.
    assert draft["vat_rate"] == "mixed"
    assert draft["vat_groups"] == [
        {"vat_rate": "0.06", "amount_fen": 5, "vat_fen": 0},
        {"vat_rate": "0.13", "amount_fen": 12, "vat_fen": 2},
    ]
    assert (draft["calls"], draft["subtotal_fen"], draft["vat_fen"], draft["total_fen"]) == (11, 17, 2, 19)
    status, issued = await month.send(
        "POST", "/billing/2026-11/issue", {"drafts_hash": closed["drafts_hash"]}, at=AFTER_NOV
    )
    assert status == 201, issued
    (invoice,) = issued["invoices"]
    assert (invoice["number"], invoice["status"]) == ("PDG-2026-000003", "issued")
    assert [(ln["kind"], ln["amount_fen"]) for ln in invoice["lines"]] == [
        (ln["kind"], ln["amount_fen"]) for ln in draft["lines"]
    ]
    assert (invoice["buyer"], invoice["seller"]) == (bought["buyer"], SELLER)
    status, listed = await month.send("GET", "/invoices?period=2026-11")
    assert sorted(inv["number"] for inv in listed) == [
        "PDG-2026-000001",
        "PDG-2026-000002",
        "PDG-2026-000003",
    ]

    # December: a refund of the 2 unused prepaid calls (20 fen, unsplit), a credit on the credit line.
    status, refund = await month.send(
        "POST",
        f"/invoices/{second['invoice_id']}/notes",
        {"kind": "credit", "amount_fen": 20, "reason": "未用退款"},
        at=IN_DEC,
    )
    assert status == 201, refund
    assert (refund["vat_fen"], refund["total_fen"]) == (1, 21)  # 1.2 -> 1
    assert refund["split"] == {"provider_fen": 0, "operator_fen": 0, "public_fund_fen": 0}
    firms_line = next(ln["line_no"] for ln in invoice["lines"] if ln["dataset"] == firms["id"])
    status, fix = await month.send(
        "POST",
        f"/invoices/{invoice['id']}/notes",
        {"kind": "credit", "amount_fen": 2, "reason": "服务中断", "line_no": firms_line},
        at=IN_DEC,
    )
    assert status == 201, fix
    assert fix["split"] == {"provider_fen": 1, "operator_fen": 1, "public_fund_fen": 0}  # 2 x 0.5/0.3/0.2
    assert (fix["vat_rate"], fix["vat_fen"]) == ("0.13", 0)  # the line's rate: 0.26 -> 0
    # Lines at several rates are corrected line by line.
    status, body = await month.send(
        "POST",
        f"/invoices/{invoice['id']}/notes",
        {"kind": "credit", "amount_fen": 1, "reason": "x"},
        at=IN_DEC,
    )
    assert (status, body["code"]) == (409, "conflict"), body
    # A prepaid line billed nothing: nothing to credit on it.
    used_line = next(ln["line_no"] for ln in invoice["lines"] if ln["kind"] == "prepaid")
    status, body = await month.send(
        "POST",
        f"/invoices/{invoice['id']}/notes",
        {"kind": "credit", "amount_fen": 1, "reason": "x", "line_no": used_line},
        at=IN_DEC,
    )
    assert (status, body["code"]) == (409, "conflict"), body

    # Payments clear everything: 66, 32 - 21, 19 - 2.
    for invoice_id, amount in ((first["invoice_id"], 66), (second["invoice_id"], 11), (invoice["id"], 17)):
        status, paid_now = await month.send(
            "POST",
            f"/invoices/{invoice_id}/payments",
            {"amount_fen": amount, "paid_on": "2026-12-10"},
            at=IN_DEC,
        )
        assert status == 201, paid_now
        assert paid_now["invoice_after"]["status"] == "paid", paid_now
    status, statement = await month.send("GET", f"/licensees/{buyer['id']}/statement")
    assert status == 200, statement
    assert statement["balance_fen"] == 0
    assert sorted(e["amount_fen"] for e in statement["entries"] if e["kind"] == "invoice") == [19, 32, 66]

    # Payouts: the period's lines' splits (the prepaid line's included, the top-ups' none) and its notes'.
    for period in ("2026-11", "2026-12"):
        status, payouts = await month.send("GET", f"/billing/{period}/payouts")
        assert status == 200, payouts
        status, summary = await month.send("GET", f"/billing/{period}/summary")
        assert status == 200, summary
        status, books = await month.send("GET", f"/billing/{period}/export?format=json")
        assert status == 200, books
        invoices, notes = books["invoices"], books["notes"]
        for part in ("provider_fen", "operator_fen", "public_fund_fen"):
            lines_part = sum(ln["split"][part] for inv in invoices for ln in inv["lines"])
            notes_part = sum((-1 if n["kind"] == "credit" else 1) * n["split"][part] for n in notes)
            assert payouts["total"][f"net_{part}"] == lines_part + notes_part, (period, part)
            assert summary["total"][part] == lines_part + notes_part, (period, part)
        assert None not in [p["provider"] for p in payouts["providers"]], payouts
    status, november = await month.send("GET", "/billing/2026-11/payouts")
    # Billed: 12 + 5 (the prepaid line at 0); earned: those and the 72 fen of prepaid calls used.
    assert november["total"]["billed_fen"] == 17
    parts = ("net_provider_fen", "net_operator_fen", "net_public_fund_fen")
    assert [november["total"][part] for part in parts] == [6 + 3 + 36, 4 + 1 + 22, 2 + 1 + 14]
    assert november["total"]["calls"] == 11  # served, not bought

    # A provider department renamed after issue moves no payout: lines name it as issued.
    status, body = await month.send(
        "PATCH", f"/datasets/{weather['id']}", {"provider": "renamed-bureau"}, headers=world.admin
    )
    assert status == 200, body
    status, again = await month.send("GET", "/billing/2026-11/payouts")
    assert again == november
    assert {line["provider"] for line in invoice["lines"]} == {weather["provider"], firms["provider"]}

    # Reconciliation and the audit: clean.
    status, report = await month.send("GET", "/reconciliation/2026-11")
    assert status == 200, report
    assert report["differences"] == [], report["differences"]
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{world.settings.data_dir}"\n[storage]\n'
        f'database_url = "{world.backend.database_url}"\nredis_url = "{world.backend.redis_url}"\n',
        encoding="utf-8",
    )
    run = await pdg("audit", "verify", "--config", str(config))
    assert run.code == 0, run
    run = await pdg("licence", "prepaid", prepaid["id"], "--config", str(config))
    assert run.code == 0, run
    assert "4 of 12 prepaid calls left (8 used" in run.out, run.out


async def test_two_top_ups_at_once_take_turns_and_the_cli_buys_one(
    month: Month,
    pdg: PdgRunner,  # noqa: F811
    tmp_path: Path,
) -> None:
    world = month.world
    dataset = await world.dataset()
    licensee = await world.licensee()
    licence = await world.licence(licensee["id"], [dataset["id"]], paid={"prepaid_calls": 0})
    path = f"/licences/{licence['id']}/top-ups"
    status, body = await month.send("POST", path, {"calls": 3})  # no agreed price, none given
    assert (status, body["code"]) == (400, "bad-request"), body
    answers = await asyncio.gather(
        *(month.send("POST", path, {"calls": 4, "unit_price_fen": "3"}) for _ in range(2))
    )
    assert [status for status, _ in answers] == [201, 201], answers
    assert sorted(body["first_position"] for _, body in answers) == [0, 4]
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{world.settings.data_dir}"\n[storage]\n'
        f'database_url = "{world.backend.database_url}"\nredis_url = "{world.backend.redis_url}"\n',
        encoding="utf-8",
    )
    run = await pdg(
        "licence",
        "top-up",
        licence["id"],
        "--calls",
        "2",
        "--unit-price-fen",
        "1.5",
        "--json",
        "--config",
        str(config),
    )
    assert run.code == 0, run
    status, found = await month.send("GET", path)
    assert [(t["first_position"], t["calls"]) for t in found] == [(0, 4), (4, 4), (8, 2)]
    status, shown = await month.send("GET", f"/licences/{licence['id']}")
    assert shown["paid"]["prepaid_calls"] == 10
    numbers = []
    for top_up in found:
        status, inv = await month.send("GET", f"/invoices/{top_up['invoice_id']}")
        numbers.append(inv["number"])
    assert sorted(numbers) == ["PDG-2026-000001", "PDG-2026-000002", "PDG-2026-000003"]
    run = await pdg("licence", "top-up", licence["id"], "--calls", "0", "--config", str(config))
    assert run.code != 0, run
    assert "Traceback" not in run.err, run
    assert run.err.strip().count("\n") == 0, run
