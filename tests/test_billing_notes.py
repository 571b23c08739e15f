"""Credit and debit notes on closed invoices, and the period exports (CSV,
JSON, XLSX), on SQLite and PostgreSQL: the limits hold even when notes are
issued at once, VAT and splits stay exact, the invoice's bytes never change;
the CLI and the admin API over the same service code."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from openpyxl import load_workbook
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billing.export import CSV_COLUMNS, period_books, render
from billing.invoices import close_period, get_invoice
from billing.notes import issue_note, list_notes
from core.errors import ConflictError, NotFoundError, ValidationFailedError
from core.money import vat_of
from gateway.state import ADMIN_TOKENS
from licensing.schemas import AdminTokenIn
from metering.periods import zone
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_billing import AFTER_NOV, GOLDEN, NOV, VAT, Books, books, november, november_calls  # noqa: F401

SHANGHAI = zone("Asia/Shanghai")
#: A fixed instant in December (Shanghai): notes on November's invoices are issued then.
IN_DEC = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
A, B = "inv-2026-11-lic-a", "inv-2026-11-lic-b"
PARTS = ("provider_fen", "operator_fen", "public_fund_fen")


async def closed_november(books: Books) -> None:  # noqa: F811
    await november(books)
    await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)


async def note(books: Books, invoice: str, kind: str, amount: Any, **kw: Any) -> dict[str, Any]:  # noqa: F811
    kw.setdefault("reason", "usage disputed")
    kw.setdefault("now", IN_DEC)
    return await issue_note(
        books.engine, invoice, kind=kind, amount_fen=amount, issued_by="test", issuer=books.issues, **kw
    )


async def test_notes_never_exceed_the_invoice(books: Books) -> None:  # noqa: F811
    await closed_november(books)
    # lic-b: one line of 13 fen (VAT 1 fen). Credits up to what was billed.
    first = await note(books, B, "credit", 5)
    assert (first["id"], first["period"], first["note_no"]) == ("cn-2026-11-lic-b-1", "2026-12", 1)
    # The VAT of a note is what the VAT on the running credited total grows by: 6 % of 5 = 0.3 -> 0.
    assert (first["vat_fen"], first["total_fen"]) == (0, 5)
    # 0.5/0.25/0.25 of 5 = 2.5/1.25/1.25 -> 2/1/1, the fen left to the largest remainder: 3/1/1.
    assert first["split"] == {"provider_fen": 3, "operator_fen": 1, "public_fund_fen": 1}
    with pytest.raises(ConflictError, match="at most 8 fen can be credited"):
        await note(books, B, "credit", 9)
    second = await note(books, B, "credit", 8)
    # 6 % of 13 = 0.78 -> 1: all credit notes' VAT together is the invoice's VAT, never more.
    assert second["vat_fen"] == 1
    assert first["vat_fen"] + second["vat_fen"] == vat_of(13, VAT)
    assert second["invoice_after"] == {"credited_fen": 13, "debited_fen": 0, "subtotal_fen": 0}
    with pytest.raises(ConflictError, match="at most 0 fen can be credited"):
        await note(books, B, "credit", 1)
    # Debits up to what was billed; each debit makes room for as much credit.
    debit = await note(books, B, "debit", 13, reason="usage under-billed")
    assert debit["id"] == "dn-2026-11-lic-b-3"
    with pytest.raises(ConflictError, match="at most 0 fen can be debited"):
        await note(books, B, "debit", 1)
    await note(books, B, "credit", 13)

    # lic-a: line 1 industrial 4 fen, line 2 free calls at 0 fen.
    with pytest.raises(ConflictError, match="exceeds line 2"):
        await note(books, A, "credit", 1, line_no=2)
    line_note = await note(books, A, "credit", 3, line_no=1)
    assert line_note["line_no"] == 1
    # The whole invoice has 1 fen left to credit; an invoice note splits as the invoice did (3/1/0).
    with pytest.raises(ConflictError, match="exceeds invoice"):
        await note(books, A, "credit", 2)
    whole = await note(books, A, "credit", 1)
    assert sum(whole["split"].values()) == 1

    # Bad input, each a clear refusal; nothing is written.
    for amount, field in ((0, "amount_fen"), (-1, "amount_fen"), (1.5, "amount_fen"), (True, "amount_fen")):
        with pytest.raises(ValidationFailedError, match=field):
            await note(books, B, "debit", amount)
    with pytest.raises(ValidationFailedError, match="reason"):
        await note(books, B, "debit", 1, reason="  ")
    with pytest.raises(ValidationFailedError, match="kind"):
        await note(books, B, "refund", 1)
    with pytest.raises(ValidationFailedError, match="has no line 9"):
        await note(books, A, "debit", 1, line_no=9)
    with pytest.raises(NotFoundError):
        await note(books, "inv-2026-11-nobody", "credit", 1)
    with pytest.raises(ConflictError, match="after 2026-11"):
        await note(books, B, "debit", 1, now=AFTER_NOV - timedelta(hours=12))  # still November in Shanghai

    listed = await list_notes(books.engine, invoice_id=B)
    assert [n["note_no"] for n in listed] == [1, 2, 3, 4]
    assert listed[0] == first
    # The invoices' bytes are as closed.
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert [await get_invoice(books.engine, A), await get_invoice(books.engine, B)] == golden
    with pytest.raises(DBAPIError, match="append-only"):
        async with books.engine.begin() as conn:
            await conn.execute(text("UPDATE billing_notes SET amount_fen = 1"))


async def test_notes_issued_at_once_still_never_exceed_the_invoice(books: Books) -> None:  # noqa: F811
    await closed_november(books)
    results = await asyncio.gather(*(note(books, B, "credit", 3) for _ in range(8)), return_exceptions=True)
    issued = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, ConflictError)]
    assert len(issued) + len(refused) == 8, results
    assert len(issued) == 4  # 4 x 3 = 12 of 13 fen
    notes = await list_notes(books.engine, invoice_id=B)
    assert [n["note_no"] for n in notes] == [1, 2, 3, 4]
    assert sum(n["amount_fen"] for n in notes) == 12
    assert notes[-1]["invoice_after"]["credited_fen"] == 12


async def test_exports_carry_lines_calls_splits_and_notes(books: Books, tmp_path: Path) -> None:  # noqa: F811
    await closed_november(books)
    await note(books, B, "credit", 5, reason='=HYPERLINK("http://127.0.0.1/")')
    await note(books, A, "debit", 2, line_no=1)
    november_books = await period_books(books.engine, "2026-11")
    assert november_books["closed"] is True
    assert november_books["notes"] == []  # notes are booked in the period they are issued in
    december_books = await period_books(books.engine, "2026-12")
    assert (december_books["closed"], december_books["invoices"]) == (False, [])
    # By invoice, then number.
    assert [n["id"] for n in december_books["notes"]] == ["dn-2026-11-lic-a-1", "cn-2026-11-lic-b-1"]

    # JSON: the admin API's objects.
    assert json.loads(render(november_books, "json")) == json.loads(json.dumps(november_books))

    # CSV: a row per line with its calls and split, a row per invoice; notes signed.
    rows = list(csv.DictReader(io.StringIO(render(november_books, "csv").decode())))
    assert list(rows[0]) == list(CSV_COLUMNS)
    lines = [r for r in rows if r["document"] == "invoice-line"]
    invoices = {r["id"]: r for r in rows if r["document"] == "invoice"}
    expected = [
        (
            inv["id"],
            ln["line_no"],
            ln["calls"],
            ln["records"],
            ln["amount_fen"],
            *(ln["split"][p] for p in PARTS),
        )
        for inv in november_books["invoices"]
        for ln in inv["lines"]
    ]
    assert [
        (
            r["invoice_id"],
            int(r["line_no"]),
            int(r["calls"]),
            int(r["records"]),
            int(r["amount_fen"]),
            int(r["provider_fen"]),
            int(r["operator_fen"]),
            int(r["public_fund_fen"]),
        )
        for r in lines
    ] == expected
    assert (invoices[B]["amount_fen"], invoices[B]["vat_fen"], invoices[B]["total_fen"]) == ("13", "1", "14")
    for inv_id, inv in invoices.items():
        assert sum(int(r["amount_fen"]) for r in lines if r["invoice_id"] == inv_id) == int(inv["amount_fen"])
    notes = list(csv.DictReader(io.StringIO(render(december_books, "csv").decode())))
    assert [(r["document"], r["amount_fen"], r["total_fen"]) for r in notes] == [
        ("debit-note", "2", "2"),
        ("credit-note", "-5", "-5"),
    ]
    assert notes[1]["reason"].startswith("'=")  # never a formula in a spreadsheet
    assert sum(int(notes[1][p]) for p in PARTS) == -5

    # XLSX: the same figures as numbers, in three sheets.
    path = tmp_path / "nov.xlsx"
    path.write_bytes(render(november_books, "xlsx"))
    book = load_workbook(path)
    assert book.sheetnames == ["Invoices", "Lines", "Notes"]
    sheet = book["Lines"]
    header = [c.value for c in sheet[1]]
    got = [dict(zip(header, (c.value for c in row), strict=True)) for row in sheet.iter_rows(min_row=2)]
    assert [(r["invoice_id"], r["calls"], r["amount_fen"], r["provider_fen"]) for r in got] == [
        (e[0], e[2], e[4], e[5]) for e in expected
    ]
    assert all(isinstance(r["calls"], int) for r in got)
    path.write_bytes(render(december_books, "xlsx"))
    note_sheet = load_workbook(path)["Notes"]
    header = [c.value for c in note_sheet[1]]
    credit = dict(zip(header, (c.value for c in note_sheet[3]), strict=True))
    assert credit["amount_fen"] == -5
    assert credit["reason"] == '=HYPERLINK("http://127.0.0.1/")'
    assert note_sheet.cell(3, header.index("reason") + 1).data_type == "s"


async def test_pdg_billing_adjust_and_export(books: Books, tmp_path: Path, pdg: PdgRunner) -> None:  # noqa: F811
    await closed_november(books)
    cfg = ("--config", str(books.config(tmp_path)))
    run = await pdg("billing", "adjust", B, "--credit", "5", "--reason", "call refunded", *cfg)
    assert run.code == 0, run
    assert "credit note PDG-CN-2026-000001 issued" in run.out
    assert "now stands at 0.08 CNY before VAT" in run.out
    shown = await pdg("billing", "show", B, *cfg)
    assert "cn-2026-11-lic-b-1" in shown.out
    assert "call refunded" in shown.out
    made = await pdg("billing", "adjust", A, "--debit", "1", "--line", "1", "--reason", "x", *cfg, "--json")
    assert made.json()["line_no"] == 1
    for fmt in ("csv", "json", "xlsx"):
        out = tmp_path / f"nov.{fmt}"
        run = await pdg("billing", "export", "2026-11", "-o", str(out), *cfg)
        assert run.code == 0, run
        assert f"wrote 2 invoice(s) (3 lines) and 0 note(s) of 2026-11 to {out} ({fmt}" in run.err
    assert json.loads((tmp_path / "nov.json").read_text())["invoices"][1]["id"] == B
    assert load_workbook(tmp_path / "nov.xlsx")["Invoices"]["A3"].value == B
    stdout = await pdg("billing", "export", "2026-11", "--licensee", "lic-b", *cfg)
    assert [r["id"] for r in csv.DictReader(io.StringIO(stdout.out)) if r["document"] == "invoice"] == [B]
    for args, mentions in (
        (("adjust", B, "--credit", "100", "--reason", "r"), "at most 8 fen can be credited"),
        (("adjust", B, "--credit", "0", "--reason", "r"), "amount_fen"),
        (("adjust", "inv-nope", "--debit", "1", "--reason", "r"), "no invoice inv-nope"),
        (("export", "2026-11", "--format", "xlsx"), "needs --output"),
        (("export", "2026-11", "-o", str(tmp_path / "nov.txt")), "csv, json or xlsx"),
        (("export", "2026-10"), "no invoices or notes for 2026-10"),
        (("export", "2026-11", "-o", str(tmp_path / "missing" / "x.csv")), "cannot write"),
    ):
        failed = await pdg("billing", *args, *cfg)
        failed.one_line_error(mentions)


async def test_finance_issues_notes_and_exports_through_the_admin_api(world_factory: Any) -> None:
    world, clock, _ds, lic = await november_calls(world_factory, 4)
    clock.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    tokens = world.app[ADMIN_TOKENS]

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    finance = bearer((await tokens.create(AdminTokenIn(role="finance"))).token)
    viewer = bearer((await tokens.create(AdminTokenIn(role="viewer"))).token)
    own = bearer((await tokens.create(AdminTokenIn(role="licensee", licensee_id=lic["licensee_id"]))).token)
    other = await world.licensee()
    outsider = bearer((await tokens.create(AdminTokenIn(role="licensee", licensee_id=other["id"]))).token)
    async with world.client.post("/admin/v1/billing/2026-11/close?issue=true", headers=finance) as resp:
        (invoice,) = (await resp.json())["invoices"]
    assert invoice["subtotal_fen"] == 10  # 4 x 2.5 fen
    notes = f"/admin/v1/invoices/{invoice['id']}/notes"

    async def post(payload: Any, headers: dict[str, str]) -> tuple[int, Any]:
        async with world.client.post(notes, json=payload, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    status, made = await post({"kind": "credit", "amount_fen": 4, "reason": "outage on 11-20"}, finance)
    assert status == 201, made
    assert (made["period"], made["invoice_after"]["subtotal_fen"]) == ("2026-12", 6)
    for payload, code in (
        ({"kind": "credit", "amount_fen": 7, "reason": "r"}, 409),
        ({"kind": "credit", "amount_fen": "4", "reason": "r"}, 400),
        ({"kind": "credit", "amount_fen": 1.0, "reason": "r"}, 400),
        ({"kind": "credit", "amount_fen": 1}, 400),
        ({"kind": "credit", "amount_fen": 1, "reason": "r", "extra": 1}, 400),
        ({"kind": "credit", "amount_fen": 1, "reason": "r", "line_no": 2}, 400),
    ):
        status, body = await post(payload, finance)
        assert status == code, (payload, body)
        assert body["type"].endswith(("conflict", "bad-request")), body
    status, body = await post({"kind": "credit", "amount_fen": 1, "reason": "r"}, viewer)
    assert status == 403, body
    async with world.client.get(notes, headers=own) as resp:
        assert resp.status == 200
        assert [n["id"] for n in await resp.json()] == [made["id"]]
    async with world.client.get(notes, headers=outsider) as resp:
        assert resp.status == 404

    async with world.client.get("/admin/v1/billing/2026-11/export?format=csv", headers=own) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/csv")
        assert 'filename="pdg-billing-2026-11.csv"' in resp.headers["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [(r["document"], r["calls"], r["amount_fen"]) for r in rows] == [
        ("invoice-line", "4", "10"),
        ("invoice", "4", "10"),
    ]
    async with world.client.get("/admin/v1/billing/2026-12/export?format=xlsx", headers=finance) as resp:
        assert resp.status == 200
        sheet = load_workbook(io.BytesIO(await resp.read()))["Notes"]
        assert sheet["A2"].value == made["id"]
    async with world.client.get("/admin/v1/billing/2026-11/export", headers=outsider) as resp:
        assert resp.status == 404
    async with world.client.get("/admin/v1/billing/2026-11/export?format=pdf", headers=finance) as resp:
        assert resp.status == 400
