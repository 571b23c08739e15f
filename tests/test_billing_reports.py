"""Finance's reports (billing.reports) and the typed XLSX export, on SQLite
and PostgreSQL: a month of two licensees' calls on three datasets of two
provider departments, priced per call and per record, closed; a credit note
on one line and a debit and a credit note on whole invoices issued in the
next month, which is closed too. The summary and the payouts add up to the
fen against sums made here from the invoices and notes themselves; the files
read back with numbers as numbers and names beside ids."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openpyxl import load_workbook

from billing.export import CSV_COLUMNS, INVOICE_COLUMNS, LINE_COLUMNS, NOTE_COLUMNS, period_books
from billing.export import render as render_books
from billing.invoices import close_period, get_invoice
from billing.notes import issue_note
from billing.register import Issuer
from billing.reports import (
    PAYOUT_COLUMNS,
    SUMMARY_COLUMNS,
    note_by_dataset,
    period_payouts,
    period_summary,
    render,
)
from core.money import allocate, e4_text, fen_to_e4
from ledger.store import LedgerStore
from licensing.keys import load_or_create_signing_key
from licensing.registry import Registry
from licensing.schemas import DatasetIn, LicenseeIn, Price, RevenueSplit
from storage import migrate
from storage.db import create_engine, session_factory
from tests.conftest import Backend, credit_code, make_settings
from tests.test_billing import AFTER_DEC, AFTER_NOV, DEC, MID_NOV, NOV, VAT, Books

#: Notes on November's invoices are issued on 3 December (Shanghai); December's calls come later.
IN_DEC = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
MID_DEC = datetime(2026, 12, 15, 4, 0, tzinfo=UTC)
PARTS = ("provider_fen", "operator_fen", "public_fund_fen")

#: id, name, provider department, per-call fen, per-record fen, split. A name
#: a person typed may look like a formula: it must stay text in every file.
DATASETS = (
    ("ds-roads", "道路施工 Road works", "dept-transport", "1.2345", "0", ("0.6", "0.3", "0.1")),
    ("ds-buses", "=Bus timetable", "dept-transport", "0", "0.3333", ("0.5", "0.25", "0.25")),
    ("ds-parcels", "Land parcels", "dept-land", "2.5", "0.0007", ("0.7", "0.2", "0.1")),
)
PRICES = {ds: (fen_to_e4(call), fen_to_e4(record)) for ds, _n, _p, call, record, _s in DATASETS}
LICENSEES = (("lic-a", "Alpha Data Ltd", 11), ("lic-b", "Beta Analytics Co", 12))
#: The columns of the export's CSV before the names were added: they keep their place.
CSV_COLUMNS_BEFORE_NAMES = (
    "document",
    "id",
    "invoice_id",
    "licensee_id",
    "period",
    "line_no",
    "dataset",
    "purpose",
    "kind",
    "usage_period",
    "terms_version",
    "calls",
    "records",
    "charge_fen",
    "amount_fen",
    "provider_fen",
    "operator_fen",
    "public_fund_fen",
    "provider_share",
    "operator_share",
    "public_fund_share",
    "vat_rate",
    "vat_fen",
    "total_fen",
    "reason",
    "content_hash",
)


@dataclass
class Month:
    books: Books
    #: The credit note on lic-a's ds-buses industrial line, the debit note on
    #: the whole of lic-b's invoice, the credit note on the whole of lic-a's.
    line_credit: dict[str, Any]
    invoice_debit: dict[str, Any]
    invoice_credit: dict[str, Any]


def call(licensee: str, dataset: str, purpose: str, records: int, at: datetime) -> tuple[Any, ...]:
    """A served call priced by its dataset (public-interest calls are free)."""
    per_call, per_record = PRICES[dataset]
    charge = 0 if purpose == "public-interest" else per_call + per_record * records
    return (licensee, dataset, purpose, "served", charge, records, at)


@pytest.fixture
async def month(backend: Backend, tmp_path: Path) -> AsyncIterator[Month]:
    settings = make_settings(tmp_path, backend)
    engine = create_engine(backend.database_url)
    try:
        await migrate.upgrade(engine)
        registry = Registry(session_factory(engine))
        for ds, name, provider, per_call, per_record, (p, o, f) in DATASETS:
            await registry.create_dataset(
                DatasetIn(
                    id=ds,
                    name=name,
                    provider=provider,
                    upstream_url="http://127.0.0.1:9/",
                    classification=1,
                    open_class="open",
                    price=Price(per_call_fen=per_call, per_record_fen=per_record),
                    max_records_per_call=100,
                    revenue_split=RevenueSplit(provider=p, operator=o, public_fund=f),
                )
            )
        for licensee, name, seed in LICENSEES:
            await registry.create_licensee(LicenseeIn(id=licensee, name=name, credit_code=credit_code(seed)))
        key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
        issuer = Issuer.from_settings(settings)
        books = Books(
            engine, LedgerStore(engine, key, checkpoint_records=1000, checkpoint_seconds=3600), backend
        )
        await books.calls(
            *(call("lic-a", "ds-roads", "industrial", 1, MID_NOV) for _ in range(37)),
            *(call("lic-a", "ds-buses", "industrial", i % 13, MID_NOV) for i in range(23)),
            *(call("lic-a", "ds-parcels", "industrial", i * 3 % 17, MID_NOV) for i in range(11)),
            *(call("lic-a", "ds-buses", "public-interest", 4, MID_NOV) for _ in range(3)),
            *(call("lic-b", "ds-parcels", "industrial", 10, MID_NOV) for _ in range(19)),
            *(call("lic-b", "ds-roads", "industrial", 0, MID_NOV) for _ in range(13)),
            *(call("lic-b", "ds-buses", "public-interest", 2, MID_NOV) for _ in range(2)),
        )
        await close_period(engine, NOV, vat_rate=VAT, now=AFTER_NOV, issuer=issuer)
        inv_a = await get_invoice(engine, "inv-2026-11-lic-a")
        assert inv_a is not None
        buses = next(
            ln["line_no"]
            for ln in inv_a["lines"]
            if (ln["dataset"], ln["purpose"]) == ("ds-buses", "industrial")
        )

        async def note(invoice: str, kind: str, amount: int, line_no: int | None = None) -> dict[str, Any]:
            return await issue_note(
                engine,
                invoice,
                kind=kind,
                amount_fen=amount,
                reason="usage disputed",
                issued_by="test",
                now=IN_DEC,
                issuer=issuer,
                line_no=line_no,
            )

        made = Month(
            books,
            line_credit=await note("inv-2026-11-lic-a", "credit", 7, buses),
            invoice_debit=await note("inv-2026-11-lic-b", "debit", 9),
            invoice_credit=await note("inv-2026-11-lic-a", "credit", 13),
        )
        await books.calls(
            *(call("lic-a", "ds-parcels", "industrial", 2, MID_DEC) for _ in range(5)),
            *(call("lic-b", "ds-roads", "industrial", 0, MID_DEC) for _ in range(6)),
            *(call("lic-b", "ds-buses", "industrial", 5, MID_DEC) for _ in range(4)),
        )
        await close_period(engine, DEC, vat_rate=VAT, now=AFTER_DEC, issuer=issuer)
        yield made
    finally:
        await engine.dispose()


def signed(note: dict[str, Any]) -> int:
    return -1 if note["kind"] == "credit" else 1


def largest_remainder(amount: int, weights: list[int]) -> list[int]:
    """The rule as the reports document it, written out with fractions:
    whole fen of each exact share, the rest one each to the largest
    remainders, ties to the earlier."""
    exact = [Fraction(amount * w, sum(weights)) for w in weights]
    parts = [floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: amount - sum(parts)]:
        parts[i] += 1
    return parts


async def test_the_month_is_priced_per_call_and_per_record(month: Month) -> None:
    nov = await period_books(month.books.engine, "2026-11")
    lines = {
        (inv["licensee_id"], ln["dataset"], ln["purpose"]): ln
        for inv in nov["invoices"]
        for ln in inv["lines"]
    }
    # ds-buses: 0.3333 fen a record; ds-roads: 1.2345 a call; ds-parcels: 2.5 a call + 0.0007 a record.
    records = sum(i % 13 for i in range(23))
    assert lines["lic-a", "ds-buses", "industrial"]["charge_fen"] == e4_text(3333 * records)
    assert lines["lic-a", "ds-roads", "industrial"]["charge_fen"] == "45.6765"  # 37 x 1.2345
    parcels = sum(25000 + 7 * (i * 3 % 17) for i in range(11))
    assert lines["lic-a", "ds-parcels", "industrial"]["charge_fen"] == e4_text(parcels)
    assert lines["lic-b", "ds-buses", "public-interest"]["amount_fen"] == 0
    assert month.line_credit["line_no"] == lines["lic-a", "ds-buses", "industrial"]["line_no"]


async def test_the_summary_adds_up_to_the_fen(month: Month) -> None:
    engine = month.books.engine
    for period, notes_expected in (("2026-11", 0), ("2026-12", 3)):
        books = await period_books(engine, period)
        report = await period_summary(engine, period)
        assert (report["format"], report["period"], report["closed"]) == (
            "pdg.billing-summary.v1",
            period,
            True,
        )
        assert len(books["notes"]) == notes_expected
        expected = []
        for licensee, name, seed in LICENSEES:
            invoices = [inv for inv in books["invoices"] if inv["licensee_id"] == licensee]
            notes = [n for n in books["notes"] if n["licensee_id"] == licensee]
            row = {
                "licensee_id": licensee,
                "licensee_name": name,
                "credit_code": credit_code(seed),
                "invoice_ids": [f"inv-{period}-{licensee}"],
                "note_ids": [n["id"] for n in notes],
                "calls": sum(inv["calls"] for inv in invoices),
                "subtotal_fen": sum(inv["subtotal_fen"] for inv in invoices),
                "vat_fen": sum(inv["vat_fen"] for inv in invoices),
                "total_fen": sum(inv["total_fen"] for inv in invoices),
                "notes_amount_fen": sum(signed(n) * n["amount_fen"] for n in notes),
                "notes_vat_fen": sum(signed(n) * n["vat_fen"] for n in notes),
                "notes_total_fen": sum(signed(n) * n["total_fen"] for n in notes),
            }
            row["net_subtotal_fen"] = row["subtotal_fen"] + row["notes_amount_fen"]
            row["net_vat_fen"] = row["vat_fen"] + row["notes_vat_fen"]
            row["net_total_fen"] = row["total_fen"] + row["notes_total_fen"]
            for part in PARTS:
                row[part] = sum(ln["split"][part] for inv in invoices for ln in inv["lines"]) + sum(
                    signed(n) * n["split"][part] for n in notes
                )
            # The net split is the net subtotal, parted.
            assert sum(row[part] for part in PARTS) == row["net_subtotal_fen"]
            expected.append(row)
        assert report["licensees"] == expected
        total = report["total"]
        assert (total["licensees"], total["invoices"], total["notes"]) == (2, 2, notes_expected)
        for figure, value in total.items():
            if figure not in ("licensees", "invoices", "notes"):
                assert value == sum(row[figure] for row in expected), figure
        assert total["net_total_fen"] == sum(inv["total_fen"] for inv in books["invoices"]) + sum(
            signed(n) * n["total_fen"] for n in books["notes"]
        )
    dec = await period_summary(engine, "2026-12")
    # lic-a: two credits (7 + 13 fen) on November's invoice; lic-b: a debit of 9.
    assert [r["notes_amount_fen"] for r in dec["licensees"]] == [-20, 9]
    assert dec["licensees"][0]["note_ids"] == ["cn-2026-11-lic-a-1", "cn-2026-11-lic-a-2"]


async def test_the_payouts_add_up_to_the_fen(month: Month) -> None:
    engine = month.books.engine
    books = await period_books(engine, "2026-12")
    report = await period_payouts(engine, "2026-12")
    assert report["format"] == "pdg.billing-payouts.v1"
    lines = [ln for inv in books["invoices"] for ln in inv["lines"]]
    notes = books["notes"]
    assert len(notes) == 3

    # The invariant: each part's grand total is the lines' splits plus the notes' (signed), to the fen.
    total = report["total"]
    for part in PARTS:
        from_lines = sum(ln["split"][part] for ln in lines)
        from_notes = sum(signed(n) * n["split"][part] for n in notes)
        assert total[part] == from_lines
        assert total[f"notes_{part}"] == from_notes
        assert total[f"net_{part}"] == from_lines + from_notes
    assert total["billed_fen"] == sum(ln["amount_fen"] for ln in lines)
    assert total["notes_fen"] == sum(signed(n) * n["amount_fen"] for n in notes)
    assert total["net_fen"] == total["billed_fen"] + total["notes_fen"]
    assert (total["calls"], total["records"]) == (
        sum(ln["calls"] for ln in lines),
        sum(ln["records"] for ln in lines),
    )
    # The same money as the summary's.
    summary = await period_summary(engine, "2026-12")
    assert [total[f"net_{part}"] for part in PARTS] == [summary["total"][part] for part in PARTS]
    assert total["net_fen"] == summary["total"]["net_subtotal_fen"]

    # Per dataset, made here: a line note to its line's dataset; an invoice note's
    # parts by the same part of the invoice's lines per dataset, largest remainder.
    expected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for ln in lines:
        row = expected[ln["dataset"]]
        row["calls"] += ln["calls"]
        row["records"] += ln["records"]
        row["billed_fen"] += ln["amount_fen"]
        for part in PARTS:
            row[part] += ln["split"][part]
    for note in notes:
        invoice = await get_invoice(engine, note["invoice_id"])
        assert invoice is not None
        if note["line_no"] is not None:
            (line,) = (ln for ln in invoice["lines"] if ln["line_no"] == note["line_no"])
            for part in PARTS:
                expected[line["dataset"]][f"notes_{part}"] += signed(note) * note["split"][part]
            continue
        datasets = sorted({ln["dataset"] for ln in invoice["lines"]})
        for part in PARTS:
            weights = [
                sum(ln["split"][part] for ln in invoice["lines"] if ln["dataset"] == d) for d in datasets
            ]
            shares = largest_remainder(note["split"][part], weights)
            assert sum(shares) == note["split"][part]
            for dataset, share in zip(datasets, shares, strict=True):
                expected[dataset][f"notes_{part}"] += signed(note) * share
    for row in expected.values():
        row["notes_fen"] = sum(row[f"notes_{part}"] for part in PARTS)
        row["net_fen"] = row["billed_fen"] + row["notes_fen"]
        for part in PARTS:
            row[f"net_{part}"] = row[part] + row[f"notes_{part}"]
    got = {row["dataset_id"]: row for provider in report["providers"] for row in provider["datasets"]}
    assert got.keys() == expected.keys() == {"ds-roads", "ds-buses", "ds-parcels"}
    for dataset, want in expected.items():
        for figure, value in want.items():
            assert got[dataset][figure] == value, (dataset, figure)
    # lic-b's November ds-buses line was free (public-interest): it earned no part, so the
    # debit on lic-b's whole invoice gives ds-buses nothing; lic-a's line credit went to ds-buses alone.
    debit = note_by_dataset(month.invoice_debit, await _invoice(engine, "inv-2026-11-lic-b"))
    assert debit["ds-buses"] == dict.fromkeys(("amount_fen", *PARTS), 0)
    assert sum(parts["amount_fen"] for parts in debit.values()) == 9
    line = note_by_dataset(month.line_credit, await _invoice(engine, "inv-2026-11-lic-a"))
    assert line == {"ds-buses": {"amount_fen": -7, **{p: -month.line_credit["split"][p] for p in PARTS}}}

    # Grouped by provider department, each with its total.
    assert [(p["provider"], [d["dataset_id"] for d in p["datasets"]]) for p in report["providers"]] == [
        ("dept-land", ["ds-parcels"]),
        ("dept-transport", ["ds-buses", "ds-roads"]),
    ]
    assert [d["dataset_name"] for p in report["providers"] for d in p["datasets"]] == [
        "Land parcels",
        "=Bus timetable",
        "道路施工 Road works",
    ]
    for provider in report["providers"]:
        for figure, value in provider["total"].items():
            assert value == sum(d[figure] for d in provider["datasets"]), (provider["provider"], figure)
    for figure, value in total.items():
        assert value == sum(p["total"][figure] for p in report["providers"]), figure


async def _invoice(engine: Any, invoice_id: str) -> dict[str, Any]:
    found = await get_invoice(engine, invoice_id)
    assert found is not None
    return found


async def test_reports_render_as_csv_json_and_xlsx(month: Month, tmp_path: Path) -> None:
    engine = month.books.engine
    summary = await period_summary(engine, "2026-12")
    payouts = await period_payouts(engine, "2026-12")
    for report, columns, per_row in (
        (summary, SUMMARY_COLUMNS, "licensee"),
        (payouts, PAYOUT_COLUMNS, "dataset"),
    ):
        assert json.loads(render(report, "json")) == report
        rows = list(csv.DictReader(io.StringIO(render(report, "csv").decode("utf-8"))))
        assert tuple(rows[0]) == columns
        assert rows[-1]["row"] == "total"
        for figure in columns[columns.index("calls") :]:
            assert int(rows[-1][figure]) == report["total"][figure], figure
            assert sum(int(r[figure]) for r in rows if r["row"] == per_row) == report["total"][figure]
        path = tmp_path / f"{report['format']}.xlsx"
        path.write_bytes(render(report, "xlsx"))
        (sheet,) = load_workbook(path).worksheets
        header = [str(c.value) for c in sheet[1]]
        assert tuple(header) == columns
        got = [dict(zip(header, (c.value for c in row), strict=True)) for row in sheet.iter_rows(min_row=2)]
        assert [r["row"] for r in got] == [r["row"] for r in rows]
        for row in got:
            for figure in columns[columns.index("calls") :]:
                assert type(row[figure]) is int, (figure, row[figure])
        assert (
            got[-1]["net_fen" if report is payouts else "net_total_fen"]
            == report["total"]["net_fen" if report is payouts else "net_total_fen"]
        )
        with pytest.raises(ValueError, match="csv, json, xlsx"):
            render(report, "pdf")
    sheet = load_workbook(tmp_path / "pdg.billing-summary.v1.xlsx")["Summary"]
    names = [c.value for c in sheet["C"]][1:3]
    assert names == ["Alpha Data Ltd", "Beta Analytics Co"]
    assert sheet["D2"].value == credit_code(11)
    # A name that looks like a formula is text in XLSX and quoted in CSV.
    sheet = load_workbook(tmp_path / "pdg.billing-payouts.v1.xlsx")["Payouts"]
    (cell,) = (c for c in sheet["D"] if c.value == "=Bus timetable")
    assert cell.data_type == "s"
    assert "'=Bus timetable" in render(payouts, "csv").decode("utf-8")
    assert ",=Bus" not in render(payouts, "csv").decode("utf-8")


async def test_the_xlsx_export_holds_numbers_and_names(month: Month, tmp_path: Path) -> None:
    engine = month.books.engine
    nov = await period_books(engine, "2026-11")
    path = tmp_path / "nov.xlsx"
    path.write_bytes(render_books(nov, "xlsx"))
    book = load_workbook(path)

    def rows(sheet: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
        header = [str(c.value) for c in book[sheet][1]]
        assert tuple(header) == columns
        return [dict(zip(header, row, strict=True)) for row in book[sheet].iter_rows(min_row=2)]

    invoices = rows("Invoices", INVOICE_COLUMNS)
    for cells, inv in zip(invoices, nov["invoices"], strict=True):
        assert cells["licensee_name"].value == {i: n for i, n, _ in LICENSEES}[inv["licensee_id"]]
        for figure in ("calls", "subtotal_fen", "vat_fen", "total_fen"):
            assert type(cells[figure].value) is int
            assert cells[figure].value == inv[figure]
        assert cells["vat_rate"].data_type == "n"
        assert Decimal(repr(cells["vat_rate"].value)) == Decimal(inv["vat_rate"]) == VAT
    lines = rows("Lines", LINE_COLUMNS)
    expected = [(inv, ln) for inv in nov["invoices"] for ln in inv["lines"]]
    assert len(lines) == len(expected) == 7
    catalogue = {ds: (name, provider) for ds, name, provider, *_ in DATASETS}
    for cells, (inv, ln) in zip(lines, expected, strict=True):
        for figure in ("calls", "records", "amount_fen", *PARTS):
            assert type(cells[figure].value) is int, figure
            assert cells[figure].value == (ln["split"][figure] if figure in PARTS else ln[figure])
        charge = cells["charge_fen"]
        # A number cell holding the exact charge, shown with its 4 places.
        assert charge.data_type == "n"
        assert type(charge.value) in (int, float)  # 0.0000 reads back as 0
        assert Decimal(repr(charge.value)) == Decimal(ln["charge_fen"])
        assert charge.number_format == "0.0000"
        for share in ("provider", "operator", "public_fund"):
            cell = cells[f"{share}_share"]
            assert cell.data_type == "n"
            assert Decimal(repr(cell.value)) == Decimal(ln["revenue_split"][share])
        assert cells["licensee_id"].value == inv["licensee_id"]
        assert (cells["dataset_name"].value, cells["dataset_provider"].value) == catalogue[ln["dataset"]]
        if ln["dataset"] == "ds-buses":
            assert cells["dataset_name"].data_type == "s"  # "=Bus timetable" is never a formula
    assert LINE_COLUMNS[LINE_COLUMNS.index("licensee_id") + 1] == "licensee_name"
    assert LINE_COLUMNS[LINE_COLUMNS.index("dataset") + 1] == "dataset_name"

    # The notes issued in December: the line note keeps its line's dataset and purpose.
    dec = await period_books(engine, "2026-12")
    assert dec["note_lines"] == {
        month.line_credit["id"]: {
            "invoice_id": "inv-2026-11-lic-a",
            "line_no": month.line_credit["line_no"],
            "dataset": "ds-buses",
            "purpose": "industrial",
            "kind": "usage",
            "usage_period": "2026-11",
        }
    }
    path.write_bytes(render_books(dec, "xlsx"))
    book = load_workbook(path)
    notes = {cells["id"].value: cells for cells in rows("Notes", NOTE_COLUMNS)}
    line_note = notes[month.line_credit["id"]]
    assert (line_note["dataset"].value, line_note["purpose"].value, line_note["dataset_name"].value) == (
        "ds-buses",
        "industrial",
        "=Bus timetable",
    )
    assert line_note["licensee_name"].value == "Alpha Data Ltd"
    assert (line_note["amount_fen"].value, line_note["line_no"].value) == (-7, month.line_credit["line_no"])
    whole = notes[month.invoice_debit["id"]]
    assert (whole["dataset"].value, whole["purpose"].value, whole["amount_fen"].value) == (None, None, 9)
    assert type(whole["total_fen"].value) is int

    # CSV: the columns of before keep their place, the names come after; note rows carry the line.
    assert CSV_COLUMNS[: len(CSV_COLUMNS_BEFORE_NAMES)] == CSV_COLUMNS_BEFORE_NAMES
    assert CSV_COLUMNS[len(CSV_COLUMNS_BEFORE_NAMES) :] == (
        "licensee_name",
        "dataset_name",
        "dataset_provider",
    )
    table = list(csv.DictReader(io.StringIO(render_books(dec, "csv").decode("utf-8"))))
    by_id = {r["id"]: r for r in table}
    line_row = by_id[month.line_credit["id"]]
    assert (line_row["document"], line_row["dataset"], line_row["purpose"]) == (
        "credit-note",
        "ds-buses",
        "industrial",
    )
    assert (line_row["dataset_name"], line_row["dataset_provider"]) == ("'=Bus timetable", "dept-transport")
    lines_csv = [r for r in table if r["document"] == "invoice-line"]
    assert {r["licensee_name"] for r in lines_csv} == {"Alpha Data Ltd", "Beta Analytics Co"}
    # JSON: the documents as the admin API gives them, the names beside.
    data = json.loads(render_books(dec, "json"))
    assert data["licensees"]["lic-a"] == {"name": "Alpha Data Ltd", "credit_code": credit_code(11)}
    assert data["datasets"]["ds-parcels"] == {"name": "Land parcels", "provider": "dept-land"}
    assert data["invoices"] == dec["invoices"]


def test_an_exact_charge_reads_back_from_a_spreadsheet(tmp_path: Path) -> None:
    """Any charge of up to 15 significant digits (a line under 10^11 fen) is
    the same number after a spreadsheet's double."""
    charges = ["0.0000", "0.0001", "3.7035", "9999999999.9999", "12345678901.2345", "99999999999.9999"]
    line = {
        "dataset": "ds-x",
        "purpose": "industrial",
        "kind": "usage",
        "usage_period": "2026-11",
        "terms_version": 1,
        "calls": 1,
        "records": 0,
        "amount_fen": 0,
        "split": dict.fromkeys(PARTS, 0),
        "revenue_split": {"provider": "0.3333", "operator": "0.6667", "public_fund": "0"},
    }
    books = {
        "period": "2026-11",
        "invoices": [
            {
                "id": "inv-x",
                "licensee_id": "lic-x",
                "period": "2026-11",
                "lines": [{**line, "line_no": i, "charge_fen": c} for i, c in enumerate(charges, 1)],
            }
        ],
        "notes": [],
    }
    path = tmp_path / "x.xlsx"
    path.write_bytes(render_books(books, "xlsx"))
    sheet = load_workbook(path)["Lines"]
    column = LINE_COLUMNS.index("charge_fen") + 1
    got = [sheet.cell(row, column).value for row in range(2, 2 + len(charges))]
    assert all(type(v) in (int, float) for v in got), got
    assert [Decimal(repr(v)) for v in got] == [Decimal(c) for c in charges]
    share = sheet.cell(2, LINE_COLUMNS.index("provider_share") + 1)
    assert (Decimal(repr(share.value)), share.number_format) == (Decimal("0.3333"), "0.00%")


@st.composite
def invoice_and_note(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    datasets = draw(st.lists(st.sampled_from(["d1", "d2", "d3", "d4"]), min_size=1, max_size=6))
    lines = []
    for number, dataset in enumerate(datasets, 1):
        parts = draw(st.tuples(*(st.integers(0, 10**6) for _ in PARTS)))
        lines.append(
            {
                "line_no": number,
                "dataset": dataset,
                "amount_fen": sum(parts),
                "split": dict(zip(PARTS, parts, strict=True)),
            }
        )
    totals = [sum(ln["split"][part] for ln in lines) for part in PARTS]
    if not any(totals):
        lines[0]["split"]["provider_fen"] = lines[0]["amount_fen"] = 1
        totals = [1, 0, 0]
    amount = draw(st.integers(1, 10**6))
    kind = draw(st.sampled_from(["credit", "debit"]))
    # As billing.notes splits an invoice note: by the invoice's split totals.
    split = dict(zip(PARTS, allocate(amount, totals), strict=True))
    return {"lines": lines}, {"kind": kind, "line_no": None, "amount_fen": amount, "split": split}


@given(invoice_and_note())
def test_an_invoice_note_is_attributed_exactly(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    invoice, note = case
    found = note_by_dataset(note, invoice)
    sign = signed(note)
    assert set(found) == {ln["dataset"] for ln in invoice["lines"]}
    for part in PARTS:
        assert sum(parts[part] for parts in found.values()) == sign * note["split"][part]
        weight = sum(ln["split"][part] for ln in invoice["lines"])
        for dataset, parts in found.items():
            mine = sum(ln["split"][part] for ln in invoice["lines"] if ln["dataset"] == dataset)
            if weight:
                exact = Fraction(note["split"][part] * mine, weight)
                assert abs(sign * parts[part] - exact) < 1
            if not mine:
                assert parts[part] == 0
    assert sum(parts["amount_fen"] for parts in found.values()) == sign * note["amount_fen"]
