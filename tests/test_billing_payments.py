"""Receivables over a month billed through the gateway and issued, with a
credit note, on SQLite and on PostgreSQL: payments take an invoice from
issued to partially paid, overdue and paid; every refusal writes nothing;
payments recorded at once never pay more than is owed together; the
statement's running balance and the ageing buckets at several days agree
with balances worked out here from the documents; the statement renders as
a PDF holding its closing balance."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from pypdf import PdfReader
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billing.invoices import get_invoice
from billing.payments import (
    ageing,
    bucket_of,
    due_day,
    invoice_account,
    invoice_balance,
    invoice_status,
    list_payments,
    record_payment,
    statement,
)
from billing.pdf import cny, statement_pdf
from billing.schemas import Ageing, InvoiceAccount, Payment, Statement
from core.errors import ConflictError, NotFoundError, ValidationFailedError
from gateway.state import ENGINE
from ledger import admin_log
from metering.periods import zone
from tests.test_billing_issue import AFTER_DEC, AFTER_NOV, IN_DEC, IN_NOV, Books, books  # noqa: F401
from tests.test_ledger import records_of

SHANGHAI = zone("Asia/Shanghai")
TERMS = 15  # the books fixture's billing.payment_terms_days


def noon(day: str) -> datetime:
    """Noon in Shanghai on ``day``."""
    return datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC) + timedelta(hours=4)


async def second_licensee_call(books: Books) -> str:  # noqa: F811
    """Another licensee with one served November call; its id."""
    world = books.world
    other = await world.licensee(name="远山信息技术有限公司")
    await world.licence(other["id"], [books.dataset["id"]], paid={"credit_limit_fen": 100_000})
    app = await world.app_client(other["id"])
    token = await world.token(app, f"purpose:industrial dataset:{books.dataset['id']}")
    books.clock.now = IN_NOV
    status, body, _ = await world.call(f"/data/{books.dataset['id']}/records?n=2", token)
    assert status == 200, body
    books.calls += 1
    await records_of(world, books.calls)
    return str(other["id"])


async def counts(books: Books) -> tuple[int, int]:  # noqa: F811
    """Payments stored, and the admin log's last entry."""
    async with books.world.app[ENGINE].connect() as conn:
        payments = int(await conn.scalar(text("SELECT count(*) FROM payments")) or 0)
        logged = int(await conn.scalar(text("SELECT coalesce(max(seq), 0) FROM admin_log")) or 0)
    return payments, logged


def closing_of(pdf: bytes) -> str:
    """The PDF's text from its closing-balance label on, whitespace removed."""
    words = re.sub(r"\s+", "", "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages))
    assert "期末余额" in words, words
    return words[words.rindex("期末余额") :]


async def test_payments_statuses_statement_and_ageing(books: Books) -> None:  # noqa: F811
    engine = books.world.app[ENGINE]
    other = await second_licensee_call(books)
    status, issued = await books.post("/billing/2026-11/close?issue=true", at=AFTER_NOV)
    assert status == 201, issued
    invoices = {inv["licensee_id"]: inv for inv in issued["invoices"]}
    mine, theirs = invoices[books.licensee["id"]], invoices[other]
    assert (mine["issued_at"][:10], mine["due_at"], theirs["due_at"]) == (
        "2026-12-01",
        "2026-12-16",
        "2026-12-16",
    )
    status, credit = await books.post(
        f"/invoices/{mine['id']}/notes", {"kind": "credit", "amount_fen": 3, "reason": "重复调用"}, at=IN_DEC
    )
    assert status == 201, credit
    owed = mine["total_fen"] - credit["total_fen"]
    assert owed == 5, (mine["total_fen"], credit["total_fen"])  # 8 fen billed, 3 fen credited

    # December closed for review: its invoice is a draft.
    await books.call(IN_DEC)
    status, december = await books.post("/billing/2026-12/close", at=AFTER_DEC)
    assert (status, december["status"]) == (201, "draft"), december
    (draft,) = december["invoices"]
    shown = await get_invoice(engine, draft["id"], books.world.settings)
    assert shown is not None
    assert shown["status"] == "draft"

    def pay(invoice: str, amount: Any, paid_on: Any, now: datetime, reference: Any = "") -> Any:
        return record_payment(
            engine,
            invoice,
            amount_fen=amount,
            paid_on=paid_on,
            reference=reference,
            recorded_by="test",
            now=now,
            tz=SHANGHAI,
            payment_terms_days=TERMS,
        )

    async def account(day: str) -> dict[str, Any]:
        return await invoice_account(
            engine, mine["id"], today=date.fromisoformat(day), tz=SHANGHAI, payment_terms_days=TERMS
        )

    # Every refusal, and nothing written by any of them.
    before = await counts(books)
    with pytest.raises(ConflictError, match="draft"):
        await pay(draft["id"], 1, "2027-01-02", AFTER_DEC)
    with pytest.raises(NotFoundError):
        await pay("inv-2026-11-nobody", 1, "2026-12-05", IN_DEC)
    for amount in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValidationFailedError, match="amount_fen"):
            await pay(mine["id"], amount, "2026-12-05", IN_DEC)
    with pytest.raises(ConflictError, match=r"before inv-2026-11-\S+ was issued"):
        await pay(mine["id"], 1, "2026-11-30", IN_DEC)
    for day in ("2026-12-11", "2026-13-01", "05/12/2026"):  # after today, no such day, not YYYY-MM-DD
        with pytest.raises(ValidationFailedError, match="paid_on"):
            await pay(mine["id"], 1, day, IN_DEC)
    for reference in ("x" * 201, "line\nbreak", None):
        with pytest.raises(ValidationFailedError, match="reference"):
            await pay(mine["id"], 1, "2026-12-05", IN_DEC, reference)
    with pytest.raises(ConflictError, match="at most 5 fen can be paid"):
        await pay(mine["id"], owed + 1, "2026-12-05", IN_DEC)
    assert await counts(books) == before
    assert (await account("2026-12-10"))["status"] == "issued"

    # A partial payment.
    first = await pay(mine["id"], 2, "2026-12-05", IN_DEC, "  招商银行 流水 0001 ")
    assert (first["id"], first["payment_no"], first["reference"]) == (
        mine["id"].replace("inv-", "pay-") + "-1",
        1,
        "招商银行 流水 0001",
    )
    assert first["invoice_after"] == {
        "owed_fen": 5,
        "paid_fen": 2,
        "balance_fen": 3,
        "status": "partially-paid",
    }
    (logged,) = [e for e in await admin_log.read(engine, after=before[1]) if e["action"] == "payment.record"]
    assert (logged["target"], logged["after"]["amount_fen"]) == (first["id"], 2)
    with pytest.raises(ConflictError, match="at most 3 fen can be paid"):
        await pay(mine["id"], 4, "2026-12-10", IN_DEC)
    assert (await account("2026-12-16"))["status"] == "partially-paid"
    overdue = await account("2026-12-17")
    assert (overdue["status"], overdue["balance_fen"], overdue["owed_fen"]) == ("overdue", 3, 5)
    # The admin API's models take what the functions answer.
    InvoiceAccount.model_validate(overdue)
    Payment.model_validate(first)

    # Two payments at once that together would pay more than is left: one is recorded.
    results = await asyncio.gather(
        pay(mine["id"], 2, "2026-12-20", noon("2026-12-20")),
        pay(mine["id"], 2, "2026-12-20", noon("2026-12-20")),
        return_exceptions=True,
    )
    recorded = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, ConflictError)]
    assert (len(recorded), len(refused)) == (1, 1), results
    assert "at most 1 fen can be paid" in str(refused[0])
    payments = await list_payments(engine, mine["id"])
    assert [(p["payment_no"], p["amount_fen"]) for p in payments] == [(1, 2), (2, 2)]

    # The rest, in March.
    last = await pay(mine["id"], 1, "2027-03-20", noon("2027-03-20"), "final")
    assert last["invoice_after"] == {"owed_fen": 5, "paid_fen": 5, "balance_fen": 0, "status": "paid"}
    assert await counts(books) == (3, before[1] + 3)
    with pytest.raises(ConflictError, match="at most 0 fen can be paid"):
        await pay(mine["id"], 1, "2027-03-20", noon("2027-03-20"))
    with pytest.raises(DBAPIError, match="append-only"):
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE payments SET amount_fen = 100"))

    # The statement: the running balance as worked out from the documents.
    expected = [
        ("2026-12-01", "invoice", mine["number"], mine["total_fen"]),
        ("2026-12-05", "payment", first["id"], -2),
        ("2026-12-10", "credit-note", credit["number"], -credit["total_fen"]),
        ("2026-12-20", "payment", recorded[0]["id"], -2),
        ("2027-03-20", "payment", last["id"], -1),
    ]
    running = list(itertools.accumulate(amount for *_, amount in expected))
    whole = await statement(
        engine, books.licensee["id"], now=noon("2027-03-25"), tz=SHANGHAI, payment_terms_days=TERMS
    )
    assert [(e["date"], e["kind"], e["number"], e["amount_fen"]) for e in whole["entries"]] == expected
    assert [e["balance_fen"] for e in whole["entries"]] == running
    assert (whole["from"], whole["to"], whole["opening_balance_fen"], whole["balance_fen"]) == (
        "2026-12",
        "2027-03",
        0,
        0,
    )
    assert whole["licensee"] == {key: books.licensee[key] for key in ("id", "name", "credit_code")}
    assert [(inv["id"], inv["status"], inv["balance_fen"]) for inv in whole["invoices"]] == [
        (mine["id"], "paid", 0)
    ]
    Statement.model_validate(whole)
    assert whole["totals"] == {"invoiced_fen": 8, "debited_fen": 0, "credited_fen": 3, "paid_fen": 5}

    december_only = await statement(
        engine,
        books.licensee["id"],
        from_period="2026-12",
        to_period="2026-12",
        now=noon("2027-03-25"),
        tz=SHANGHAI,
        payment_terms_days=TERMS,
    )
    assert [e["balance_fen"] for e in december_only["entries"]] == running[:4]
    assert (december_only["as_of"], december_only["balance_fen"]) == ("2026-12-31", running[3])
    assert [(inv["status"], inv["balance_fen"]) for inv in december_only["invoices"]] == [("overdue", 1)]
    later = await statement(
        engine,
        books.licensee["id"],
        from_period="2027-01",
        to_period="2027-03",
        now=noon("2027-03-25"),
        tz=SHANGHAI,
        payment_terms_days=TERMS,
    )
    assert (later["opening_balance_fen"], [e["number"] for e in later["entries"]], later["balance_fen"]) == (
        running[3],
        [last["id"]],
        0,
    )
    with pytest.raises(ValidationFailedError, match="from"):
        await statement(
            engine,
            books.licensee["id"],
            from_period="2027-01",
            to_period="2026-12",
            now=noon("2027-03-25"),
            tz=SHANGHAI,
            payment_terms_days=TERMS,
        )

    # Rendered: the PDF's closing balance is the statement's.
    for document, closing in ((december_only, "¥0.01"), (whole, "¥0.00")):
        pdf = await asyncio.to_thread(statement_pdf, document)
        assert cny(document["balance_fen"]) == closing
        assert closing_of(pdf).startswith("期末余额" + closing), closing_of(pdf)

    # Ageing: (as of, {licensee: (bucket, balance)}), worked out from the
    # documents: both due 2026-12-16; the other licensee never pays its 3 fen.
    unpaid = theirs["total_fen"]
    cases = [
        ("2026-11-30", {}),
        ("2026-12-09", {"me": ("current", 8 - 2), "them": ("current", unpaid)}),  # before the credit note
        ("2026-12-10", {"me": ("current", 3), "them": ("current", unpaid)}),
        ("2026-12-16", {"me": ("current", 3), "them": ("current", unpaid)}),
        ("2026-12-17", {"me": ("1-30", 3), "them": ("1-30", unpaid)}),
        ("2026-12-20", {"me": ("1-30", 1), "them": ("1-30", unpaid)}),
        ("2027-01-15", {"me": ("1-30", 1), "them": ("1-30", unpaid)}),
        ("2027-01-16", {"me": ("31-60", 1), "them": ("31-60", unpaid)}),
        ("2027-02-14", {"me": ("31-60", 1), "them": ("31-60", unpaid)}),
        ("2027-02-15", {"me": ("61-90", 1), "them": ("61-90", unpaid)}),
        ("2027-03-16", {"me": ("61-90", 1), "them": ("61-90", unpaid)}),
        ("2027-03-17", {"me": ("over-90", 1), "them": ("over-90", unpaid)}),
        ("2027-03-20", {"them": ("over-90", unpaid)}),
    ]
    fields = {"current": "current_fen", "1-30": "days_1_30_fen", "31-60": "days_31_60_fen"}
    fields |= {"61-90": "days_61_90_fen", "over-90": "over_90_fen"}
    ids = {"me": books.licensee["id"], "them": other}
    for day, open_items in cases:
        report = await ageing(engine, as_of=date.fromisoformat(day), tz=SHANGHAI, payment_terms_days=TERMS)
        Ageing.model_validate(report)
        found = {
            row["licensee"]["id"]: [(inv["bucket"], inv["balance_fen"]) for inv in row["invoices"]]
            for row in report["licensees"]
        }
        assert found == {ids[who]: [item] for who, item in open_items.items()}, day
        totals = dict.fromkeys(fields.values(), 0)
        for bucket, balance in open_items.values():
            totals[fields[bucket]] += balance
        assert report["totals"] == {**totals, "total_fen": sum(totals.values()), "credit_fen": 0}, day
        for row in report["licensees"]:
            (bucket, balance) = open_items["me" if row["licensee"]["id"] == ids["me"] else "them"]
            assert (row[fields[bucket]], row["total_fen"]) == (balance, balance), day


def test_status_rules_and_old_invoices() -> None:
    """The rules on their own: an invoice from before due dates falls due
    ``payment_terms_days`` after the day its period closed (in the billing
    time zone); a credit after the money leaves a balance below 0, paid."""
    old = {"id": "inv-2026-09-x", "status": "closed", "closed_at": "2026-09-30T17:00:00Z", "total_fen": 100}
    assert due_day(old, SHANGHAI, 30) == date(2026, 10, 31)  # 1 October in Shanghai, + 30 days
    dated = {**old, "due_at": due_day(old, SHANGHAI, 30).isoformat()}
    with pytest.raises(ValueError, match="due_at"):
        invoice_status(old, [], [], date(2026, 10, 1))
    credit = [{"kind": "credit", "total_fen": 30}]
    debit = [{"kind": "debit", "total_fen": 10}]
    assert invoice_balance(dated, [*credit, *debit], [{"amount_fen": 50}]) == {
        "total_fen": 100,
        "debited_fen": 10,
        "credited_fen": 30,
        "owed_fen": 80,
        "paid_fen": 50,
        "balance_fen": 30,
    }
    assert invoice_status(dated, [], [], date(2026, 10, 31)) == "issued"
    assert invoice_status(dated, [], [], date(2026, 11, 1)) == "overdue"
    assert invoice_status(dated, [], [{"amount_fen": 1}], date(2026, 10, 31)) == "partially-paid"
    assert invoice_status(dated, [], [{"amount_fen": 1}], date(2026, 11, 1)) == "overdue"
    assert invoice_status(dated, credit, [{"amount_fen": 100}], date(2027, 1, 1)) == "paid"
    assert invoice_balance(dated, credit, [{"amount_fen": 100}])["balance_fen"] == -30
    assert invoice_status({**dated, "total_fen": 0}, [], [], date(2027, 1, 1)) == "paid"
    assert invoice_status({"status": "draft"}, [], [], date(2027, 1, 1)) == "draft"
    assert [bucket_of(d) for d in (-5, 0, 1, 30, 31, 60, 61, 90, 91, 400)] == [
        "current",
        "current",
        "1-30",
        "1-30",
        "31-60",
        "31-60",
        "61-90",
        "61-90",
        "over-90",
        "over-90",
    ]
