"""Finance closes the books: a month of real calls through the gateway,
closed for review as drafts, a late record changing the drafts, issued with
the reviewed hash, numbered gap-free, naming the buyer and the seller, signed
into the billing register; notes in their own series; a late record after
issue billed as the next period's late line; a PDF whose text holds the
number, the names and the total; and an issued invoice rewritten
consistently — content, hash and rows together — found by ``pdg audit
verify`` and by reconciliation."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader
from sqlalchemy import text

from gateway.state import ADMIN_TOKENS, CLOCK, ENGINE
from licensing.schemas import AdminTokenIn
from tests.conftest import World, credit_code
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

IN_NOV = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
AFTER_NOV = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
IN_DEC = datetime(2026, 12, 10, 4, 0, tzinfo=UTC)
AFTER_DEC = datetime(2027, 1, 2, 9, 0, tzinfo=UTC)
SELLER = {
    "name": "城市公共数据运营有限公司",
    "credit_code": credit_code(7),
    "address": "数据大道 1 号",
    "bank": "城市银行数据支行",
    "account": "6222000011112222",
}
TAX_CODE = "3040201990000000000"


@dataclass
class Books:
    world: World
    clock: StoppedClock
    finance: dict[str, str]
    dataset: dict[str, Any]
    licensee: dict[str, Any]
    token: str
    config: Path
    calls: int = 0

    async def call(self, at: datetime) -> None:
        """One served industrial call, made at ``at`` and in the ledger."""
        self.clock.now = at
        status, body, _ = await self.world.call(f"/data/{self.dataset['id']}/records?n=2", self.token)
        assert status == 200, body
        self.calls += 1
        await records_of(self.world, self.calls)

    async def post(self, path: str, payload: Any = None, at: datetime = AFTER_NOV) -> tuple[int, Any]:
        self.clock.now = at
        async with self.world.client.post(f"/admin/v1{path}", json=payload, headers=self.finance) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.world.client.get(f"/admin/v1{path}", headers=self.finance) as resp:
            return resp.status, await resp.json(content_type=None)

    async def sql(self, *statements: str, **params: Any) -> None:
        async with self.world.app[ENGINE].begin() as conn:
            for statement in statements:
                await conn.execute(text(statement), params)

    async def drop_guards(self, *tables: str) -> None:
        """What an attacker with schema rights does first."""
        if self.world.backend.database_url.startswith("postgresql"):
            await self.sql(*(f"DROP TRIGGER {t}_append_only ON {t}" for t in tables))
        else:
            await self.sql(*(f"DROP TRIGGER {t}_no_{a}" for t in tables for a in ("update", "delete")))


@pytest.fixture
async def books(world_factory: Any, tmp_path: Path) -> Books:
    world = await world_factory(
        **{f"billing__seller__{name}": value for name, value in SELLER.items()},
        billing__tax_code="3040203000000000000",
        billing__payment_terms_days=15,
    )
    clock = StoppedClock(IN_NOV)
    world.app[CLOCK].source = clock
    dataset = await world.dataset(name="企业登记信息", price={"per_call_fen": "2.5", "per_record_fen": "0"})
    async with world.client.patch(
        f"/admin/v1/datasets/{dataset['id']}", json={"tax_code": TAX_CODE}, headers=world.admin
    ) as resp:
        assert resp.status == 200, await resp.text()
    licensee = await world.licensee(
        name="星河数据科技有限公司", address="科技路 9 号", bank="星河银行", account="955880001234"
    )
    await world.licence(licensee["id"], [dataset["id"]], paid={"credit_limit_fen": 100_000})
    app = await world.app_client(licensee["id"])
    token = await world.token(app, f"purpose:industrial dataset:{dataset['id']}")
    finance = (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    config = tmp_path / "pdg.toml"
    seller = "".join(f'{name} = "{value}"\n' for name, value in SELLER.items())
    config.write_text(
        f'data_dir = "{world.settings.data_dir}"\n[storage]\n'
        f'database_url = "{world.backend.database_url}"\nredis_url = "{world.backend.redis_url}"\n'
        f"[billing.seller]\n{seller}",
        encoding="utf-8",
    )
    books = Books(world, clock, {"Authorization": f"Bearer {finance}"}, dataset, licensee, token, config)
    for _ in range(3):
        await books.call(IN_NOV)
    return books


async def test_drafts_then_issued_numbered_signed_invoices_naming_both_parties(
    books: Books,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    status, closed = await books.post("/billing/2026-11/close")
    assert status == 201, closed
    (draft,) = closed["invoices"]
    assert (closed["status"], draft["status"], draft["number"], draft["due_at"]) == (
        "draft",
        "draft",
        None,
        None,
    )
    assert (draft["calls"], draft["subtotal_fen"]) == (3, 8)  # 3 x 2.5 fen = 7.5 -> 8
    # The buyer as the licensee is registered, the seller as configured.
    assert draft["buyer"] == {
        key: books.licensee[key] for key in ("name", "credit_code", "address", "bank", "account")
    }
    assert draft["seller"] == SELLER
    assert draft["currency"] == "CNY"
    (line,) = draft["lines"]
    assert (line["dataset_name"], line["tax_code"], line["vat_rate"]) == ("企业登记信息", TAX_CODE, "0.06")
    # Issuing is refused without a close, and a draft takes no note.
    status, body = await books.post("/billing/2026-12/issue", at=AFTER_DEC)
    assert (status, body["code"]) == (409, "conflict"), body
    status, body = await books.post(
        f"/invoices/{draft['id']}/notes", {"kind": "credit", "amount_fen": 1, "reason": "x"}
    )
    assert status == 404, body

    # A November record that lands before the issue is in the drafts.
    await books.call(IN_NOV)
    status, listed = await books.get("/invoices?period=2026-11")
    assert status == 200, listed
    assert [(inv["status"], inv["calls"], inv["subtotal_fen"]) for inv in listed] == [("draft", 4, 10)]
    status, body = await books.post("/billing/2026-11/issue", {"drafts_hash": closed["drafts_hash"]})
    assert (status, body["code"]) == (409, "conflict"), body
    assert "changed since they were reviewed" in body["detail"]
    status, again = await books.post("/billing/2026-11/close")
    assert status == 201, again
    assert again["drafts_hash"] != closed["drafts_hash"]
    status, issued = await books.post("/billing/2026-11/issue", {"drafts_hash": again["drafts_hash"]})
    assert status == 201, issued
    (invoice,) = issued["invoices"]
    assert (invoice["status"], invoice["number"], invoice["calls"], invoice["total_fen"]) == (
        "issued",
        "PDG-2026-000001",
        4,
        11,  # 10 fen + 6 % VAT (0.6 -> 1)
    )
    assert invoice["due_at"] == (date(2026, 12, 1) + timedelta(days=15)).isoformat()
    assert (invoice["buyer"], invoice["seller"]) == (draft["buyer"], SELLER)
    assert (
        invoice["content_hash"]
        == hashlib.sha256(
            json.dumps(
                {k: v for k, v in invoice.items() if k != "content_hash"},
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
        ).hexdigest()
    )

    # After the issue a November record is December's late line, on the
    # next number in the series.
    await books.call(IN_NOV)
    await books.call(IN_DEC)
    status, december = await books.post("/billing/2026-12/close?issue=true", at=AFTER_DEC)
    assert status == 201, december
    (next_invoice,) = december["invoices"]
    assert next_invoice["number"] == "PDG-2027-000001", "numbers run per year of issue"
    assert [(ln["kind"], ln["usage_period"], ln["calls"]) for ln in next_invoice["lines"]] == [
        ("usage", "2026-12", 1),
        ("late", "2026-11", 1),
    ]
    # Notes in their own series, naming the invoice's number and the parties.
    status, credit = await books.post(
        f"/invoices/{invoice['id']}/notes",
        {"kind": "credit", "amount_fen": 3, "reason": "退回重复调用"},
        at=IN_DEC,
    )
    assert status == 201, credit
    status, debit = await books.post(
        f"/invoices/{invoice['id']}/notes",
        {"kind": "debit", "amount_fen": 2, "reason": "补记", "line_no": 1},
        at=IN_DEC,
    )
    assert status == 201, debit
    assert (credit["number"], debit["number"]) == ("PDG-CN-2026-000001", "PDG-DN-2026-000001")
    assert credit["invoice_number"] == "PDG-2026-000001"
    assert (credit["buyer"], credit["seller"], credit["currency"]) == (invoice["buyer"], SELLER, "CNY")
    assert (debit["dataset"], debit["purpose"], debit["dataset_name"]) == (
        books.dataset["id"],
        "industrial",
        "企业登记信息",
    )

    # The period summary and the payouts, net of the notes issued in December.
    status, summary = await books.get("/billing/2026-12/summary")
    assert status == 200, summary
    status, payouts = await books.get("/billing/2026-12/payouts")
    assert status == 200, payouts
    assert json.dumps(summary, ensure_ascii=False).count(books.licensee["name"]) >= 1
    async with books.world.client.get(
        "/admin/v1/billing/2026-12/payouts?format=xlsx", headers=books.finance
    ) as resp:
        assert resp.status == 200
        assert resp.content_type.endswith("spreadsheetml.sheet")
    run = await pdg("billing", "summary", "2026-12", "--config", str(books.config))
    assert run.code == 0, run
    assert books.licensee["id"] in run.out

    verified = await pdg("audit", "verify", "--config", str(books.config), "--json")
    assert verified.code == 0, verified
    register = verified.json()["billing_register"]
    assert (register["ok"], register["entries"]) == (True, 4)

    # The PDF, read back as text.
    async with books.world.client.get(
        f"/admin/v1/invoices/{invoice['id']}/pdf", headers=books.finance
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/pdf"
        pdf = await resp.read()
    words = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    for expected in (
        "PDG-2026-000001",
        SELLER["name"],
        "星河数据科技有限公司",
        books.licensee["credit_code"],
        "0.11",
    ):
        assert expected in words, expected
    status, body = await books.get(f"/invoices/{invoice['id']}/pdf?lang=fr")
    assert status == 400, body


async def test_a_consistent_rewrite_of_an_issued_invoice_or_note_is_caught(
    books: Books,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    status, issued = await books.post("/billing/2026-11/close?issue=true")
    assert status == 201, issued
    (invoice,) = issued["invoices"]
    status, note = await books.post(
        f"/invoices/{invoice['id']}/notes",
        {"kind": "credit", "amount_fen": 3, "reason": "disputed"},
        at=IN_DEC,
    )
    assert status == 201, note
    clean = await pdg("audit", "verify", "--config", str(books.config))
    assert clean.code == 0, clean

    # Halve the invoice: its content, its hash and its rows, all together,
    # so that each agrees with the others.
    await books.drop_guards("invoices", "invoice_lines", "billing_notes")
    forged = json.loads(json.dumps(invoice))
    forged.pop("content_hash")
    forged["lines"][0]["amount_fen"] = 4
    forged["subtotal_fen"], forged["vat_fen"], forged["total_fen"] = 4, 0, 4
    content = json.dumps(forged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    await books.sql(
        "UPDATE invoices SET content = :content, content_hash = :hash, subtotal_fen = 4, vat_fen = 0, "
        "total_fen = 4 WHERE id = :id",
        content=content,
        hash=hashlib.sha256(content.encode()).hexdigest(),
        id=invoice["id"],
    )
    await books.sql("UPDATE invoice_lines SET amount_fen = 4 WHERE invoice_id = :id", id=invoice["id"])
    status, shown = await books.get(f"/invoices/{invoice['id']}")
    assert shown["total_fen"] == 4, "the forgery is self-consistent"

    failed = await pdg("audit", "verify", "--config", str(books.config), "--json")
    assert failed.code == 1, failed
    problems = failed.json()["billing_register"]["problems"]
    assert [(p["cause"], p["number"]) for p in problems] == [("invoice-altered", "PDG-2026-000001")]
    status, report = await books.get("/reconciliation/2026-11")
    assert status == 200, report
    altered = {d["call_id"] for d in report["differences"] if d["cause"] == "invoice-altered"}
    assert len(altered) == 3, report["differences"]  # every call the invoice billed
    assert report["clean"] is False

    # A note rewritten the same way.
    forged_note = json.loads(json.dumps(note))
    forged_note.pop("content_hash")
    forged_note["amount_fen"] = forged_note["total_fen"] = 1
    content = json.dumps(forged_note, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    await books.sql(
        "UPDATE billing_notes SET content = :content, content_hash = :hash, amount_fen = 1, total_fen = 1 "
        "WHERE id = :id",
        content=content,
        hash=hashlib.sha256(content.encode()).hexdigest(),
        id=note["id"],
    )
    failed = await pdg("audit", "verify", "--config", str(books.config), "--json")
    causes = [(p["cause"], p["number"]) for p in failed.json()["billing_register"]["problems"]]
    assert ("note-altered", "PDG-CN-2026-000001") in causes, causes
    status, report = await books.get("/reconciliation/2026-11")
    assert "note-altered" in report["by_cause"], report["by_cause"]


async def test_payments_statement_and_ageing_through_the_admin_api_and_the_cli(
    books: Books,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    status, issued = await books.post("/billing/2026-11/close?issue=true")
    assert status == 201, issued
    (invoice,) = issued["invoices"]
    assert invoice["total_fen"] == 8  # 3 x 2.5 = 7.5 -> 8 fen, VAT 0.48 -> 0
    status, paid = await books.post(
        f"/invoices/{invoice['id']}/payments",
        {"amount_fen": 5, "paid_on": "2026-12-03", "reference": "银行回单 0001"},
        at=datetime(2026, 12, 4, 2, 0, tzinfo=UTC),
    )
    assert status == 201, paid
    assert (paid["invoice_after"]["balance_fen"], paid["invoice_after"]["status"]) == (3, "partially-paid")
    status, body = await books.post(
        f"/invoices/{invoice['id']}/payments", {"amount_fen": 4, "paid_on": "2026-12-03"}, at=IN_DEC
    )
    assert (status, body["code"]) == (409, "conflict"), body  # more than the 3 fen left
    run = await pdg(
        "billing",
        "pay",
        invoice["id"],
        "--amount-fen",
        "3",
        "--date",
        "2026-12-05",
        "--config",
        str(books.config),
    )
    assert run.code == 0, run
    assert "3 fen" not in run.err
    status, account = await books.get(f"/invoices/{invoice['id']}/payments")
    assert status == 200, account
    assert (account["status"], account["balance_fen"], len(account["payments"])) == ("paid", 0, 2)
    status, found = await books.get(f"/licensees/{books.licensee['id']}/statement")
    assert status == 200, found
    assert [(e["kind"], e["amount_fen"], e["balance_fen"]) for e in found["entries"]] == [
        ("invoice", 8, 8),
        ("payment", -5, 3),
        ("payment", -3, 0),
    ]
    assert found["balance_fen"] == 0
    async with books.world.client.get(
        f"/admin/v1/licensees/{books.licensee['id']}/statement?format=pdf", headers=books.finance
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/pdf"
    status, aged = await books.get("/billing/ageing?as_of=2026-12-02")
    assert status == 200, aged
    assert aged["totals"]["current_fen"] == 8, aged["totals"]
    # A licensee's own token sees its own statement, and no one else's.
    other = await books.world.licensee()
    own = await books.world.app[ADMIN_TOKENS].create(AdminTokenIn(role="licensee", licensee_id=other["id"]))
    async with books.world.client.get(
        f"/admin/v1/licensees/{books.licensee['id']}/statement",
        headers={"Authorization": f"Bearer {own.token}"},
    ) as resp:
        assert resp.status == 404
    run = await pdg("billing", "statement", books.licensee["id"], "--config", str(books.config))
    assert run.code == 0, run
    assert "closing balance" in run.out
