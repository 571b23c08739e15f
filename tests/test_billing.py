"""Billing: the money rules, closing periods into invoices from a real call
record (written by the ledger store, so the chain is real), on SQLite and
PostgreSQL; the CLI and the admin API over the same close."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.invoices import close_period, get_invoice, list_invoices
from billing.models import InvoiceCallRow, InvoiceLineRow, InvoiceRow
from billing.register import Issuer, Signer
from core.errors import ConflictError
from core.money import fen_of_e4, parse_vat_rate, split, vat_of
from gateway.state import ADMIN_TOKENS, CLOCK
from ledger.models import CallRow
from ledger.store import LedgerStore
from licensing.keys import load_or_create_signing_key
from licensing.registry import Registry
from licensing.schemas import AdminTokenIn, DatasetIn, RevenueSplit
from metering.periods import parse_period, period_of, zone
from storage import migrate
from storage.db import create_engine, session_factory
from tests.conftest import Backend, World, credit_code, make_settings
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

GOLDEN = Path(__file__).parent / "golden" / "invoices-2026-11.json"
SHANGHAI = zone("Asia/Shanghai")
NOV = parse_period("2026-11", SHANGHAI)
DEC = parse_period("2026-12", SHANGHAI)
#: A fixed "now" after November ended in Shanghai (and after December, for its close).
AFTER_NOV = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
AFTER_DEC = datetime(2027, 1, 1, 2, 0, tzinfo=UTC)
JAN = parse_period("2027-01", SHANGHAI)
AFTER_JAN = datetime(2027, 2, 1, 2, 0, tzinfo=UTC)
VAT = Decimal("0.06")
#: The operating company the documents name.
SELLER = {
    "billing.seller.name": "城市公共数据运营有限公司",
    "billing.seller.credit_code": credit_code(7),
    "billing.seller.address": "数据大道 1 号",
    "billing.seller.bank": "城市银行数据支行",
    "billing.seller.account": "6222000011112222",
    "billing.tax_code": "3040203000000000000",
}


# -- money ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("e4", "fen"),
    [
        (0, 0),
        (4999, 0),
        (5000, 1),
        (5001, 1),
        (14999, 1),
        (15000, 2),
        (-5000, -1),
        (-4999, 0),
        (123_4567, 123),
    ],
)
def test_a_line_rounds_half_up_once(e4: int, fen: int) -> None:
    assert fen_of_e4(e4) == fen


def test_vat_rounds_half_up_and_rates_are_decimals() -> None:
    assert vat_of(1250, VAT) == 75
    assert vat_of(25, VAT) == 2  # 1.5 fen
    assert vat_of(24, VAT) == 1  # 1.44 fen
    assert parse_vat_rate("0.0600") == VAT
    for bad in ("0.06001", "1", "-0.01", "abc", "NaN"):
        with pytest.raises(ValueError, match="VAT rate"):
            parse_vat_rate(bad)
    with pytest.raises(TypeError):
        vat_of(100, 0.06)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fen_of_e4(1.5)  # type: ignore[arg-type]


@st.composite
def splits(draw: st.DrawFn) -> tuple[int, int, int]:
    a = draw(st.integers(0, 10_000))
    b = draw(st.integers(0, 10_000 - a))
    return a, b, 10_000 - a - b


@given(amount=st.integers(-(10**15), 10**15), basis=splits())
def test_splits_sum_exactly_and_stay_within_a_fen_of_the_share(
    amount: int, basis: tuple[int, int, int]
) -> None:
    parts = split(amount, basis)
    assert sum(parts) == amount
    assert all(type(p) is int for p in parts)
    for part, bp in zip(parts, basis, strict=True):
        exact = Decimal(amount) * bp / 10_000
        assert abs(Decimal(part) - exact) < 1


@given(
    charges=st.lists(st.integers(0, 10**9), max_size=50),
    rate=st.sampled_from(["0", "0.06", "0.13", "0.0001"]),
)
def test_line_sums_equal_totals_and_no_float_enters(charges: list[int], rate: str) -> None:
    amounts = [fen_of_e4(c) for c in charges]
    subtotal = sum(amounts)
    vat = vat_of(subtotal, parse_vat_rate(rate))
    assert all(type(a) is int for a in (*amounts, subtotal, vat))
    assert abs(Decimal(sum(charges)) / 10_000 - subtotal) <= Decimal(len(charges)) / 2
    assert abs(subtotal * Decimal(rate) - vat) <= Decimal("0.5")


def test_money_refuses_floats() -> None:
    with pytest.raises(TypeError):
        split(10.0, (5000, 5000, 0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="basis points"):
        split(10, (5000, 4000, 0))


# -- a call record to bill -----------------------------------------------------------


@dataclass
class Books:
    engine: AsyncEngine
    store: LedgerStore
    backend: Backend
    n: int = 0
    #: The terms version the records name.
    terms_version: int = 1
    #: Issues documents as the deployment would: its seller, its ledger key.
    issuer: Issuer | None = None

    @property
    def issues(self) -> Issuer:
        assert self.issuer is not None
        return self.issuer

    def config(self, tmp_path: Path) -> Path:
        """A ``pdg.toml`` for the CLI over this database."""
        path = tmp_path / "pdg.toml"
        path.write_text(
            f'data_dir = "{tmp_path / "data"}"\n[storage]\ndatabase_url = "{self.backend.database_url}"\n',
            encoding="utf-8",
        )
        return path

    async def calls(self, *specs: tuple[str, str, str, str, int, int, datetime]) -> None:
        """Append records: (licensee, dataset, purpose, outcome, charge_e4, records, time)."""
        records = []
        for licensee, dataset, purpose, outcome, charge, recs, at in specs:
            self.n += 1
            i = self.n
            served = outcome == "served"
            records.append(
                {
                    "call_id": f"00000000-0000-4000-8000-{i:012d}",
                    "request_id": f"req-{i}",
                    "time": at,
                    "started_at": at - timedelta(milliseconds=2),
                    "app_id": f"app-{licensee}",
                    "licensee_id": licensee,
                    "licence_id": f"licence-{licensee}",
                    "dataset_id": dataset,
                    "purpose": purpose,
                    "method": "GET",
                    "path": f"items/{i}",
                    "query_digest": None,
                    "status": 200 if served else 429,
                    "upstream_status": 200 if served else None,
                    "outcome": outcome,
                    "problem": None if served else "quota-exhausted",
                    "records": recs,
                    "bytes": 100,
                    "latency_us": 1000,
                    "pool": ("free" if purpose == "public-interest" else "credit") if served else None,
                    "period": period_of(at, SHANGHAI).name,
                    "charge_e4": charge,
                    "client_address": "203.0.113.9",
                    "token_id": f"tok-{i}",
                    "response_digest": "cd" * 32 if served else None,
                    "terms_version": self.terms_version,
                    "upstream_target": "default" if served else None,
                }
            )
        await self.store.append(records, f"{self.n}-0")


@pytest.fixture
async def books(backend: Backend, tmp_path: Path) -> AsyncIterator[Books]:
    settings = make_settings(tmp_path, backend, **SELLER)
    engine = create_engine(backend.database_url)
    try:
        await migrate.upgrade(engine)
        registry = Registry(session_factory(engine))
        for ds, provider, operator, fund in (
            ("ds-weather", "0.6", "0.3", "0.1"),
            ("ds-registry", "0.5", "0.25", "0.25"),
        ):
            await registry.create_dataset(
                DatasetIn(
                    id=ds,
                    name=ds,
                    provider="prov",
                    upstream_url="http://127.0.0.1:9/",
                    classification=1,
                    open_class="open",
                    revenue_split=RevenueSplit(provider=provider, operator=operator, public_fund=fund),
                )
            )
        key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
        yield Books(
            engine,
            LedgerStore(engine, key, checkpoint_records=1000, checkpoint_seconds=3600),
            backend,
            issuer=Issuer(settings, Signer(key.private_key, key.kid)),
        )
    finally:
        await engine.dispose()


#: The last instant of November in Shanghai, and the first of December.
NOV_END = datetime(2026, 11, 30, 15, 59, 59, 999999, tzinfo=UTC)
DEC_START = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
MID_NOV = datetime(2026, 11, 15, 4, 0, tzinfo=UTC)


async def november(books: Books) -> None:
    await books.calls(
        ("lic-a", "ds-weather", "industrial", "served", 12345, 10, MID_NOV),
        ("lic-a", "ds-weather", "industrial", "served", 12345, 0, MID_NOV),
        ("lic-a", "ds-weather", "industrial", "served", 12345, 5, NOV_END),  # the last instant still counts
        ("lic-a", "ds-weather", "public-interest", "served", 0, 3, MID_NOV),
        ("lic-a", "ds-weather", "public-interest", "served", 0, 4, MID_NOV),
        ("lic-a", "ds-weather", "industrial", "refused", 0, 0, MID_NOV),  # never billed
        ("lic-a", "ds-weather", "industrial", "upstream-failure", 0, 0, MID_NOV),
        *(("lic-b", "ds-registry", "industrial", "served", 25000, 1, MID_NOV) for _ in range(5)),
        ("lic-b", "ds-weather", "industrial", "served", 12345, 1, DEC_START),  # December's
        ("lic-b", "ds-weather", "industrial", "incomplete", 0, 0, MID_NOV),
    )


async def test_closing_november_gives_the_golden_invoices(books: Books) -> None:
    await november(books)
    closed = await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
    assert not closed.already_closed
    assert [inv["licensee_id"] for inv in closed.invoices] == ["lic-a", "lic-b"]
    a, b = closed.invoices
    # lic-a: 3 x 1.2345 fen = 3.7035 -> 4 fen (rounded once, not 1 + 1 + 1); 4 = 2.4/1.2/0.4 ->
    # 2 + 1 + 0 = 3, the fen left goes to the largest remainder (provider's .4 = fund's .4: provider).
    assert [
        (ln["purpose"], ln["calls"], ln["records"], ln["charge_fen"], ln["amount_fen"]) for ln in a["lines"]
    ] == [
        ("industrial", 3, 15, "3.7035", 4),
        ("public-interest", 2, 7, "0.0000", 0),
    ]
    assert a["lines"][0]["split"] == {"provider_fen": 3, "operator_fen": 1, "public_fund_fen": 0}
    assert (a["subtotal_fen"], a["vat_fen"], a["total_fen"]) == (4, 0, 4)
    # lic-b: 5 x 2.5 fen = 12.5 -> 13 (half up); 6.5/3.25/3.25 -> 7/3/3. December's call is not here.
    assert [(ln["calls"], ln["amount_fen"], ln["split"]) for ln in b["lines"]] == [
        (5, 13, {"provider_fen": 7, "operator_fen": 3, "public_fund_fen": 3})
    ]
    assert (b["subtotal_fen"], b["vat_fen"], b["total_fen"]) == (13, 1, 14)
    for inv in closed.invoices:
        assert sum(ln["amount_fen"] for ln in inv["lines"]) == inv["subtotal_fen"]
        for line in inv["lines"]:
            assert sum(line["split"].values()) == line["amount_fen"]
    if os.environ.get("PDG_TEST_UPDATE_GOLDEN") == "1":  # after a deliberate change of the invoice
        GOLDEN.write_text(json.dumps(closed.invoices, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert closed.invoices == expected, "the invoices differ from tests/golden/invoices-2026-11.json"
    # What is stored reads back the same, byte for byte hashed.
    assert await list_invoices(books.engine, period="2026-11") == expected
    assert await get_invoice(books.engine, "inv-2026-11-lic-b") == expected[1]


async def test_periods_close_once_in_order_and_only_when_ended(books: Books) -> None:
    await november(books)
    with pytest.raises(ConflictError, match="has not ended"):
        await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=NOV_END)
    with pytest.raises(ConflictError, match="close 2026-11 first"):
        await close_period(books.engine, DEC, vat_rate=VAT, issuer=books.issues, now=AFTER_DEC)
    first = await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
    again = await close_period(
        books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV + timedelta(days=3)
    )
    assert again.already_closed
    assert again.invoices == first.invoices
    with pytest.raises(ConflictError, match="close 2026-12 first"):
        await close_period(
            books.engine,
            parse_period("2027-01", SHANGHAI),
            vat_rate=VAT,
            issuer=books.issues,
            now=AFTER_DEC + timedelta(days=40),
        )


async def test_two_closes_at_once_make_one_invoice_per_licensee(books: Books) -> None:
    await november(books)
    results = await asyncio.gather(
        *(
            close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
            for _ in range(4)
        ),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert sorted(r.already_closed for r in results) == [False, True, True, True]  # type: ignore[union-attr]
    assert all(r.invoices == results[0].invoices for r in results)  # type: ignore[union-attr]
    async with books.engine.connect() as conn:
        per_licensee = (
            await conn.execute(
                select(InvoiceRow.licensee_id, func.count())
                .group_by(InvoiceRow.licensee_id)
                .order_by(InvoiceRow.licensee_id)
            )
        ).all()
    assert [tuple(r) for r in per_licensee] == [("lic-a", 1), ("lic-b", 1)]


async def test_a_late_record_lands_once_in_the_next_period(books: Books) -> None:
    await november(books)
    november_closed = await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
    # A November call that reached the ledger after November closed, and a December one.
    await books.calls(
        ("lic-a", "ds-weather", "industrial", "served", 30000, 2, MID_NOV),
        ("lic-a", "ds-registry", "industrial", "served", 20000, 1, DEC_START + timedelta(days=2)),
    )
    december = await close_period(books.engine, DEC, vat_rate=VAT, issuer=books.issues, now=AFTER_DEC)
    a = next(inv for inv in december.invoices if inv["licensee_id"] == "lic-a")
    assert [
        (ln["kind"], ln["usage_period"], ln["dataset"], ln["calls"], ln["amount_fen"]) for ln in a["lines"]
    ] == [
        ("usage", "2026-12", "ds-registry", 1, 2),
        ("late", "2026-11", "ds-weather", 1, 3),
    ]
    b = next(inv for inv in december.invoices if inv["licensee_id"] == "lic-b")
    assert [(ln["kind"], ln["usage_period"], ln["calls"]) for ln in b["lines"]] == [("usage", "2026-12", 1)]
    # November's invoices did not change; January bills neither record again.
    assert await list_invoices(books.engine, period="2026-11") == november_closed.invoices
    january = await close_period(
        books.engine,
        parse_period("2027-01", SHANGHAI),
        vat_rate=VAT,
        issuer=books.issues,
        now=AFTER_DEC + timedelta(days=40),
    )
    assert january.invoices == []
    billed = [ln for inv in (*november_closed.invoices, *december.invoices) for ln in inv["lines"]]
    served = 3 + 2 + 5 + 1 + 2  # every served call, each billed once
    assert sum(ln["calls"] for ln in billed) == served
    # The billing side's copy of the calls it billed: each served record once, by seq.
    async with books.engine.connect() as conn:
        copied = (await conn.execute(select(InvoiceCallRow).order_by(InvoiceCallRow.seq))).all()
        served_ids = (
            await conn.execute(
                select(CallRow.call_id).where(CallRow.outcome == "served").order_by(CallRow.seq)
            )
        ).scalars()
        assert [r.call_id for r in copied] == list(served_ids)
    assert Counter(r.invoice_id for r in copied) == {
        "inv-2026-11-lic-a": 5,
        "inv-2026-11-lic-b": 5,
        "inv-2026-12-lic-a": 2,  # December's own and November's late one
        "inv-2026-12-lic-b": 1,  # appended before November closed, December's
    }


async def test_closed_invoices_are_append_only(books: Books) -> None:
    await november(books)
    await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
    for statement in (
        "UPDATE invoice_lines SET amount_fen = 0",
        "DELETE FROM invoice_lines",
        "UPDATE invoices SET total_fen = 1",
        "DELETE FROM billing_closes",
        "DELETE FROM invoice_calls",
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with books.engine.begin() as conn:
                await conn.execute(text(statement))
    async with books.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(InvoiceLineRow)) == 3


# -- the CLI ---------------------------------------------------------------------------


async def test_pdg_billing_close_and_show(books: Books, tmp_path: Path, pdg: PdgRunner) -> None:  # noqa: F811
    await november(books)
    config = books.config(tmp_path)
    run = await pdg("billing", "close", "2026-11", "--config", str(config), "--json")
    assert run.code == 0, run
    closed = run.json()
    assert (closed["status"], closed["already_closed"]) == ("draft", False)
    assert [inv["total_fen"] for inv in closed["invoices"]] == [4, 14]
    assert {inv["status"] for inv in closed["invoices"]} == {"draft"}
    assert all(inv["number"] is None for inv in closed["invoices"])
    plain = await pdg("billing", "close", "2026-11", "--config", str(config))
    assert plain.code == 0, plain
    assert "period 2026-11 closed for review: 2 invoice(s), 0.18 CNY in all" in plain.out
    assert closed["drafts_hash"] in plain.out, "the same records, the same drafts"
    drafted = await pdg("billing", "show", "inv-2026-11-lic-b", "--config", str(config))
    assert "(draft " in drafted.out, drafted.out
    issued = await pdg(
        "billing",
        "issue",
        "2026-11",
        "--drafts-hash",
        closed["drafts_hash"],
        "--config",
        str(config),
        "--json",
    )
    assert issued.code == 0, issued
    assert [inv["number"] for inv in issued.json()["invoices"]] == [f"PDG-2026-00000{n}" for n in (1, 2)]
    again = await pdg("billing", "issue", "2026-11", "--config", str(config))
    assert "period 2026-11 was already issued: 2 invoice(s), 0.18 CNY in all" in again.out
    shown = await pdg("billing", "show", "inv-2026-11-lic-b", "--config", str(config))
    assert shown.code == 0, shown
    assert "no. PDG-2026-000002" in shown.out
    assert "ds-registry" in shown.out
    assert re.search(r"total +0\.14 CNY", shown.out), shown.out
    listed = await pdg("billing", "show", "2026-11", "--licensee", "lic-a", "--config", str(config), "--json")
    assert [inv["id"] for inv in listed.json()] == ["inv-2026-11-lic-a"]
    for args, mentions in (
        (("close", "2026-13"), "period"),
        (("close", "2099-01"), "has not ended"),
        (("close", "2026-10"), "2026-11 is closed, so 2026-10 can no longer be"),
        (("issue", "2026-12"), "has not ended"),
        (("show", "inv-nope"), "no invoice inv-nope"),
        (("show", "2026-10"), "no invoices or notes for 2026-10"),
    ):
        failed = await pdg("billing", *args, "--config", str(config))
        failed.one_line_error(mentions)


# -- the admin API, over calls made through the gateway ----------------------------------


async def november_calls(
    world_factory: Any, calls: int
) -> tuple[World, StoppedClock, dict[str, Any], dict[str, Any]]:
    """A gateway whose clock stands in November 2026 and ``calls`` industrial
    calls of one licence, served and in the ledger: ``(world, clock, dataset, licence)``."""
    world = await world_factory()
    clock = StoppedClock(datetime(2026, 11, 20, 4, 0, tzinfo=UTC))
    world.app[CLOCK].source = clock
    ds, lic, _app, tok = await world.licensed(purpose="industrial")
    for _ in range(calls):
        status, body, _ = await world.call(f"/data/{ds['id']}/records", tok)
        assert status == 200, body
    await records_of(world, calls)
    return world, clock, ds, lic


async def test_finance_closes_a_period_of_real_calls_through_the_admin_api(world_factory: Any) -> None:
    world, clock, ds, lic = await november_calls(world_factory, 3)
    tokens = world.app[ADMIN_TOKENS]
    finance = {"Authorization": f"Bearer {(await tokens.create(AdminTokenIn(role='finance'))).token}"}
    viewer = {"Authorization": f"Bearer {(await tokens.create(AdminTokenIn(role='viewer'))).token}"}
    other = await world.licensee()
    outsider = (await tokens.create(AdminTokenIn(role="licensee", licensee_id=other["id"]))).token
    own = (await tokens.create(AdminTokenIn(role="licensee", licensee_id=lic["licensee_id"]))).token

    async def post(path: str, headers: dict[str, str]) -> tuple[int, Any]:
        async with world.client.post(f"/admin/v1{path}", headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(path: str, token: str) -> tuple[int, Any]:
        async with world.client.get(f"/admin/v1{path}", headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json(content_type=None)

    status, body = await post("/billing/2026-11/close", finance)
    assert (status, body["code"]) == (409, "conflict"), body  # November has not ended yet
    clock.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    status, body = await post("/billing/2026-11/close", viewer)
    assert status == 403, body
    status, body = await post("/billing/2026-13/close", finance)
    assert (status, body["code"]) == (400, "bad-request"), body
    status, closed = await post("/billing/2026-11/close", finance)
    assert status == 201, closed
    (invoice,) = closed["invoices"]
    # 3 calls x 2.5 fen = 7.5 -> 8 fen; 0.5/0.3/0.2 of 8 = 4/2.4/1.6 -> 4/2/1, the fen left to
    # the largest remainder (the fund's .6): 4/2/2. VAT 6 % of 8 fen = 0.48 -> 0.
    (line,) = invoice["lines"]
    assert (line["dataset"], line["purpose"], line["calls"], line["amount_fen"]) == (
        ds["id"],
        "industrial",
        3,
        8,
    )
    assert line["split"] == {"provider_fen": 4, "operator_fen": 2, "public_fund_fen": 2}
    assert (invoice["subtotal_fen"], invoice["vat_fen"], invoice["total_fen"]) == (8, 0, 8)
    assert (closed["status"], invoice["status"], invoice["number"]) == ("draft", "draft", None)
    # The drafts are what a licensee sees too, until issued.
    assert await get("/invoices?period=2026-11", own) == (200, closed["invoices"])
    status, body = await post("/billing/2026-11/issue", viewer)
    assert status == 403, body
    status, issued = await post("/billing/2026-11/issue", finance)
    assert status == 201, issued
    (final,) = issued["invoices"]
    assert (issued["status"], final["status"], final["number"]) == ("issued", "issued", "PDG-2026-000001")
    assert final["lines"] == invoice["lines"]
    assert (final["subtotal_fen"], final["total_fen"], final["due_at"]) == (8, 0 + 8, "2026-12-31")
    invoice = final
    status, again = await post("/billing/2026-11/close", finance)
    assert (status, again["already_closed"], again["invoices"]) == (200, True, issued["invoices"])
    assert await get("/invoices?period=2026-11", own) == (200, issued["invoices"])
    assert await get(f"/invoices/{invoice['id']}", own) == (200, invoice)
    assert await get("/invoices", outsider) == (200, [])
    status, body = await get(f"/invoices/{invoice['id']}", outsider)
    assert (status, body["code"]) == (404, "not-found"), body
    status, body = await get("/invoices?period=11-2026", own)
    assert status == 400, body
