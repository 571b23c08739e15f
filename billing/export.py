"""A period's billing as files for finance: CSV, JSON and XLSX
(``pdg billing export``, ``GET /admin/v1/billing/{period}/export``).

What a period's export holds: the invoices of the period (once it is
closed), each line with its calls, records, exact charge, rounded amount and
revenue split, and the credit and debit notes *issued* in the period (a note
corrects an earlier period's invoice and is booked when it is issued).

* **JSON**: ``{"format": "pdg.billing-export.v1", "period", "closed",
  "invoices": [...], "notes": [...]}``, the objects exactly as the admin API
  gives them (each with its ``content_hash``).
* **CSV**: one table, a row per document part, its ``document`` column
  saying which: ``invoice-line``, ``invoice`` (the invoice's totals: its
  ``amount_fen`` is the subtotal), ``credit-note`` or ``debit-note``. Amounts
  are integer fen; a credit note's amounts are negative, so summing a column
  over notes gives the net correction. UTF-8, RFC 4180 quoting.
* **XLSX**: sheets ``Invoices``, ``Lines`` and ``Notes`` with the same
  columns, amounts as numbers.

Text a person typed (a note's reason) that begins like a formula (``=``,
``+``, ``-``, ``@``) is written with a leading apostrophe in CSV and as a
plain string in XLSX, so a spreadsheet never runs it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any, Final

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.invoices import list_invoices
from billing.models import BillingCloseRow
from billing.notes import CREDIT, list_notes
from core.errors import NotFoundError

FORMAT: Final = "pdg.billing-export.v1"
FORMATS: Final = ("csv", "json", "xlsx")
MEDIA_TYPES: Final = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}

INVOICE_COLUMNS: Final = (
    "id",
    "licensee_id",
    "period",
    "status",
    "closed_at",
    "calls",
    "subtotal_fen",
    "vat_rate",
    "vat_fen",
    "total_fen",
    "content_hash",
)
#: A line's own fields, as the invoice holds them.
_LINE_FIELDS: Final = (
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
)
LINE_COLUMNS: Final = (
    "invoice_id",
    "licensee_id",
    "period",
    *_LINE_FIELDS,
    "provider_fen",
    "operator_fen",
    "public_fund_fen",
    "provider_share",
    "operator_share",
    "public_fund_share",
)
NOTE_COLUMNS: Final = (
    "id",
    "kind",
    "invoice_id",
    "licensee_id",
    "invoice_period",
    "period",
    "line_no",
    "amount_fen",
    "vat_rate",
    "vat_fen",
    "total_fen",
    "provider_fen",
    "operator_fen",
    "public_fund_fen",
    "reason",
    "issued_by",
    "issued_at",
    "content_hash",
)
CSV_COLUMNS: Final = (
    "document",
    "id",
    *LINE_COLUMNS,
    "vat_rate",
    "vat_fen",
    "total_fen",
    "reason",
    "content_hash",
)
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


async def period_books(engine: AsyncEngine, period: str, *, licensee_id: str | None = None) -> dict[str, Any]:
    """A period's invoices and the notes issued in it (one licensee's, if
    given); NotFoundError when there are neither."""
    async with engine.connect() as conn:
        closed = await conn.scalar(select(BillingCloseRow.period).where(BillingCloseRow.period == period))
    invoices = await list_invoices(engine, period=period, licensee_id=licensee_id)
    notes = await list_notes(engine, period=period, licensee_id=licensee_id)
    if not invoices and not notes:
        why = "it is closed, with no billed calls" if closed is not None else "it is not closed"
        raise NotFoundError(f"no invoices or notes for {period}: {why}")
    return {
        "format": FORMAT,
        "period": period,
        "closed": closed is not None,
        "invoices": invoices,
        "notes": notes,
    }


def invoice_rows(books: dict[str, Any]) -> list[dict[str, Any]]:
    return [{name: inv[name] for name in INVOICE_COLUMNS} for inv in books["invoices"]]


def _line_row(inv: dict[str, Any], line: dict[str, Any]) -> dict[str, Any]:
    shares = line["revenue_split"]
    return {
        "invoice_id": inv["id"],
        "licensee_id": inv["licensee_id"],
        "period": inv["period"],
        **{name: line.get(name) for name in _LINE_FIELDS},
        **line["split"],
        "provider_share": shares["provider"],
        "operator_share": shares["operator"],
        "public_fund_share": shares["public_fund"],
    }


def line_rows(books: dict[str, Any]) -> list[dict[str, Any]]:
    return [_line_row(inv, line) for inv in books["invoices"] for line in inv["lines"]]


def note_rows(books: dict[str, Any]) -> list[dict[str, Any]]:
    """Notes with signed amounts: a credit's are negative."""
    rows = []
    for note in books["notes"]:
        sign = -1 if note["kind"] == CREDIT else 1
        row = {name: note.get(name) for name in NOTE_COLUMNS}
        for name in ("amount_fen", "vat_fen", "total_fen"):
            row[name] = sign * note[name]
        for name, value in note["split"].items():
            row[name] = sign * value
        rows.append(row)
    return rows


def _safe_text(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_json(books: dict[str, Any]) -> bytes:
    return orjson.dumps(books, option=orjson.OPT_INDENT_2) + b"\n"


def to_csv(books: dict[str, Any]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for inv in books["invoices"]:
        for line in inv["lines"]:
            row = _line_row(inv, line)
            writer.writerow({"document": "invoice-line", "id": f"{inv['id']}#{line['line_no']}", **row})
        writer.writerow(
            {
                "document": "invoice",
                "id": inv["id"],
                "invoice_id": inv["id"],
                "licensee_id": inv["licensee_id"],
                "period": inv["period"],
                "calls": inv["calls"],
                "amount_fen": inv["subtotal_fen"],
                "provider_fen": sum(ln["split"]["provider_fen"] for ln in inv["lines"]),
                "operator_fen": sum(ln["split"]["operator_fen"] for ln in inv["lines"]),
                "public_fund_fen": sum(ln["split"]["public_fund_fen"] for ln in inv["lines"]),
                "vat_rate": inv["vat_rate"],
                "vat_fen": inv["vat_fen"],
                "total_fen": inv["total_fen"],
                "content_hash": inv["content_hash"],
            }
        )
    for note in note_rows(books):
        writer.writerow(
            {
                **note,
                "document": f"{note['kind']}-note",
                "kind": note["kind"],
                "reason": _safe_text(note["reason"]),
            }
        )
    return out.getvalue().encode("utf-8")


def to_xlsx(books: dict[str, Any]) -> bytes:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    book = Workbook()
    first = book.active
    if first is not None:
        book.remove(first)
    for title, columns, rows in (
        ("Invoices", INVOICE_COLUMNS, invoice_rows(books)),
        ("Lines", LINE_COLUMNS, line_rows(books)),
        ("Notes", NOTE_COLUMNS, note_rows(books)),
    ):
        sheet = book.create_sheet(title)
        sheet.append(list(columns))
        for cell in sheet[1]:
            cell.font = Font(bold=True)
        sheet.freeze_panes = "A2"
        for row in rows:
            sheet.append(list(_cells(row[name] for name in columns)))
            for cell in sheet[sheet.max_row]:
                if isinstance(cell.value, str):
                    cell.data_type = "s"  # text stays text, even if it looks like a formula
        for column, name in zip(sheet.columns, columns, strict=True):
            width = max([len(name), *(len(str(c.value or "")) for c in column)])
            sheet.column_dimensions[column[0].column_letter].width = min(60, width + 2)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def _cells(values: Iterable[Any]) -> Iterable[Any]:
    return ("" if v is None else v for v in values)


def render(books: dict[str, Any], fmt: str) -> bytes:
    """``books`` in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return to_json(books)
    if fmt == "csv":
        return to_csv(books)
    if fmt == "xlsx":
        return to_xlsx(books)
    raise ValueError(f"an export is one of {', '.join(FORMATS)}, not {fmt!r}")
