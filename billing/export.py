"""A period's billing as files for finance: CSV, JSON and XLSX
(``pdg billing export``, ``GET /admin/v1/billing/{period}/export``).

What a period's export holds: the invoices of the period (once it is
closed), each line with its calls, records, exact charge, rounded amount and
revenue split, and the credit and debit notes *issued* in the period (a note
corrects an earlier period's invoice and is booked when it is issued), with
the names of the licensees and datasets they mention. A document that names
its buyer or its lines' datasets itself is shown with its own names; the
others with the catalogue's, as it holds them now.

* **JSON**: ``{"format": "pdg.billing-export.v1", "period", "closed",
  "invoices": [...], "notes": [...], "licensees", "datasets",
  "note_lines"}``: the invoices and notes exactly as the admin API gives
  them (each with its ``content_hash``); ``licensees`` maps each licensee id
  to the catalogue's ``name`` and ``credit_code``, ``datasets`` each dataset
  id (of the lines, and of the lines of the invoices the notes correct) to
  its ``name`` and ``provider`` (the provider department), ``null`` for an id
  the catalogue does not hold; ``note_lines`` maps the id of each note on one
  line to that line's ``invoice_id``, ``line_no``, ``dataset``, ``purpose``,
  ``kind`` and ``usage_period`` (the line is on an earlier period's invoice).
* **CSV**: one table, a row per document part, its ``document`` column
  saying which: ``invoice-line``, ``invoice`` (the invoice's totals: its
  ``amount_fen`` is the subtotal), ``credit-note`` or ``debit-note`` (a note
  on one line carries the line's ``dataset`` and ``purpose``). Amounts are
  integer fen; a credit note's amounts are negative, so summing a column over
  notes gives the net correction. The names come last (``licensee_name``,
  ``dataset_name``, ``dataset_provider``), so columns read by position keep
  their place. UTF-8, RFC 4180 quoting.
* **XLSX**: sheets ``Invoices``, ``Lines`` and ``Notes``, each name in the
  column beside its id. Every figure is a number cell: amounts in fen as
  integers, the exact charge (``charge_fen``) as the decimal itself shown
  with 4 places, the VAT rate and revenue shares as fractions shown as
  percentages. A spreadsheet holds a number as a binary double, so an exact
  charge reads back exactly while it has at most 15 significant digits (a
  line's charge under 10^11 fen); the CSV and JSON keep it as text, exact at
  any size.

Text a person typed (a note's reason, a licensee's or dataset's name) that
begins like a formula (``=``, ``+``, ``-``, ``@``) is written with a leading
apostrophe in CSV and as a plain string in XLSX, so a spreadsheet never runs
it. The helpers that render rows (:func:`csv_table`, :func:`add_sheet`) serve
:mod:`billing.reports` too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, cast

import orjson
from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.invoices import MIXED, list_invoices
from billing.models import BillingCloseRow, InvoiceRow
from billing.notes import CREDIT, list_notes
from core.errors import NotFoundError
from licensing.models import DatasetRow, LicenseeRow

if TYPE_CHECKING:
    from openpyxl import Workbook

_INVOICES = cast(Table, InvoiceRow.__table__)
_DATASETS = cast(Table, DatasetRow.__table__)
_LICENSEES = cast(Table, LicenseeRow.__table__)

FORMAT: Final = "pdg.billing-export.v1"
FORMATS: Final = ("csv", "json", "xlsx")
MEDIA_TYPES: Final = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}

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
_SPLIT_COLUMNS: Final = (
    "provider_fen",
    "operator_fen",
    "public_fund_fen",
    "provider_share",
    "operator_share",
    "public_fund_share",
)
#: The sheets' columns: each name beside its id.
INVOICE_COLUMNS: Final = (
    "id",
    "licensee_id",
    "licensee_name",
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
LINE_COLUMNS: Final = (
    "invoice_id",
    "licensee_id",
    "licensee_name",
    "period",
    "line_no",
    "dataset",
    "dataset_name",
    "dataset_provider",
    *_LINE_FIELDS[2:],
    *_SPLIT_COLUMNS,
)
NOTE_COLUMNS: Final = (
    "id",
    "kind",
    "invoice_id",
    "licensee_id",
    "licensee_name",
    "invoice_period",
    "period",
    "line_no",
    "dataset",
    "dataset_name",
    "purpose",
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
#: One table; the names last, so the columns before them keep their place.
CSV_COLUMNS: Final = (
    "document",
    "id",
    "invoice_id",
    "licensee_id",
    "period",
    *_LINE_FIELDS,
    *_SPLIT_COLUMNS,
    "vat_rate",
    "vat_fen",
    "total_fen",
    "reason",
    "content_hash",
    "licensee_name",
    "dataset_name",
    "dataset_provider",
)
#: Number formats of the XLSX cells that hold decimals (the rest are integers or text).
EXACT_FEN: Final = "0.0000"
FRACTION: Final = "0.00%"
NUMBER_FORMATS: Final = {
    "charge_fen": EXACT_FEN,
    "vat_rate": FRACTION,
    "provider_share": FRACTION,
    "operator_share": FRACTION,
    "public_fund_share": FRACTION,
}
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


async def period_books(engine: AsyncEngine, period: str, *, licensee_id: str | None = None) -> dict[str, Any]:
    """A period's invoices and the notes issued in it (one licensee's, if
    given), with the names they mention; NotFoundError when there are neither."""
    books, _noted = await books_and_noted(engine, period, licensee_id=licensee_id)
    return books


async def books_and_noted(
    engine: AsyncEngine, period: str, *, licensee_id: str | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """:func:`period_books`, and the invoices its notes correct, by id."""
    async with engine.connect() as conn:
        closed = await conn.scalar(select(BillingCloseRow.period).where(BillingCloseRow.period == period))
    invoices = await list_invoices(engine, period=period, licensee_id=licensee_id)
    notes = await list_notes(engine, period=period, licensee_id=licensee_id)
    if not invoices and not notes:
        why = "it is closed, with no billed calls" if closed is not None else "it is not closed"
        raise NotFoundError(f"no invoices or notes for {period}: {why}")
    noted = await invoices_by_id(engine, {note["invoice_id"] for note in notes})
    note_lines = {}
    for note in notes:
        if note["line_no"] is not None:
            line = next(ln for ln in noted[note["invoice_id"]]["lines"] if ln["line_no"] == note["line_no"])
            note_lines[note["id"]] = {
                "invoice_id": note["invoice_id"],
                "line_no": note["line_no"],
                **{name: line[name] for name in ("dataset", "purpose", "kind", "usage_period")},
            }
    licensees, datasets = await catalogue_names(
        engine,
        {inv["licensee_id"] for inv in invoices} | {note["licensee_id"] for note in notes},
        {ln["dataset"] for inv in (*invoices, *noted.values()) for ln in inv["lines"]},
    )
    books = {
        "format": FORMAT,
        "period": period,
        "closed": closed is not None,
        "invoices": invoices,
        "notes": notes,
        "licensees": licensees,
        "datasets": datasets,
        "note_lines": note_lines,
    }
    return books, noted


async def invoices_by_id(engine: AsyncEngine, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The invoices of ``ids`` (as the admin API gives them), by id."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(_INVOICES.c.id, _INVOICES.c.content, _INVOICES.c.content_hash).where(
                _INVOICES.c.id.in_(wanted)
            )
        )
        return {r.id: {**orjson.loads(r.content), "content_hash": r.content_hash} for r in rows}


async def catalogue_names(
    engine: AsyncEngine, licensee_ids: Iterable[str], dataset_ids: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The catalogue's names, as it holds them now: ``{licensee id: {name,
    credit_code}}`` and ``{dataset id: {name, provider}}``, sorted by id;
    ``None`` values for an id the catalogue does not hold."""
    licensees, datasets = sorted(set(licensee_ids)), sorted(set(dataset_ids))
    async with engine.connect() as conn:
        found_licensees = {
            r.id: {"name": r.name, "credit_code": r.credit_code}
            for r in await conn.execute(
                select(_LICENSEES.c.id, _LICENSEES.c.name, _LICENSEES.c.credit_code).where(
                    _LICENSEES.c.id.in_(licensees)
                )
            )
        }
        found_datasets = {
            r.id: {"name": r.name, "provider": r.provider}
            for r in await conn.execute(
                select(_DATASETS.c.id, _DATASETS.c.name, _DATASETS.c.provider).where(
                    _DATASETS.c.id.in_(datasets)
                )
            )
        }
    return (
        {i: found_licensees.get(i, {"name": None, "credit_code": None}) for i in licensees},
        {i: found_datasets.get(i, {"name": None, "provider": None}) for i in datasets},
    )


def _licensee_name(books: Mapping[str, Any], licensee_id: str, document: Mapping[str, Any]) -> str | None:
    """The name ``document`` (an invoice) gives its buyer, else the catalogue's."""
    named = (document.get("buyer") or {}).get("name")
    if named:
        return str(named)
    found = books.get("licensees", {}).get(licensee_id)
    return found["name"] if found else None


def _dataset(books: Mapping[str, Any], dataset_id: str | None) -> dict[str, Any]:
    found = books.get("datasets", {}).get(dataset_id) if dataset_id is not None else None
    return found or {"name": None, "provider": None}


def invoice_rows(books: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            **{name: inv.get(name) for name in INVOICE_COLUMNS},
            "licensee_name": _licensee_name(books, inv["licensee_id"], inv),
        }
        for inv in books["invoices"]
    ]


def _line_row(books: dict[str, Any], inv: dict[str, Any], line: dict[str, Any]) -> dict[str, Any]:
    shares = line["revenue_split"]
    dataset = _dataset(books, line["dataset"])
    return {
        "invoice_id": inv["id"],
        "licensee_id": inv["licensee_id"],
        "licensee_name": _licensee_name(books, inv["licensee_id"], inv),
        "period": inv["period"],
        **{name: line.get(name) for name in _LINE_FIELDS},
        "dataset_name": line.get("dataset_name") or dataset["name"],
        "dataset_provider": dataset["provider"],
        **line["split"],
        "provider_share": shares["provider"],
        "operator_share": shares["operator"],
        "public_fund_share": shares["public_fund"],
    }


def line_rows(books: dict[str, Any]) -> list[dict[str, Any]]:
    return [_line_row(books, inv, line) for inv in books["invoices"] for line in inv["lines"]]


def note_rows(books: dict[str, Any]) -> list[dict[str, Any]]:
    """Notes with signed amounts (a credit's are negative); a note on one
    line with that line's dataset and purpose."""
    rows = []
    for note in books["notes"]:
        sign = -1 if note["kind"] == CREDIT else 1
        row = {name: note.get(name) for name in NOTE_COLUMNS}
        for name in ("amount_fen", "vat_fen", "total_fen"):
            row[name] = sign * note[name]
        for name, value in note["split"].items():
            row[name] = sign * value
        line = books.get("note_lines", {}).get(note["id"])
        row["dataset"] = line["dataset"] if line else None
        row["purpose"] = line["purpose"] if line else None
        dataset = _dataset(books, row["dataset"])
        row["dataset_name"], row["dataset_provider"] = dataset["name"], dataset["provider"]
        row["licensee_name"] = _licensee_name(books, note["licensee_id"], note)
        rows.append(row)
    return rows


# -- rendering ------------------------------------------------------------------


def safe_text(value: Any) -> Any:
    """``value``, with a leading apostrophe if it is text that a spreadsheet
    would take for a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_table(
    columns: Sequence[str], rows: Iterable[Mapping[str, Any]], *, numeric: Iterable[str] = ()
) -> bytes:
    """``rows`` as CSV (UTF-8, CRLF, RFC 4180 quoting) under ``columns``;
    every text value but those of the ``numeric`` columns (decimals written
    as text) is made formula-safe."""
    keep = set(numeric)
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v if k in keep else safe_text(v) for k, v in row.items()})
    return out.getvalue().encode("utf-8")


def new_workbook() -> Workbook:
    """An empty workbook (its default sheet removed)."""
    from openpyxl import Workbook

    book = Workbook()
    first = book.active
    if first is not None:
        book.remove(first)
    return book


def workbook_bytes(book: Workbook) -> bytes:
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def add_sheet(
    book: Workbook,
    title: str,
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    *,
    number_formats: Mapping[str, str] = NUMBER_FORMATS,
) -> None:
    """A sheet of ``rows`` under a bold, frozen header. A column in
    ``number_formats`` holds decimals (given as text or Decimal) written as
    number cells holding the decimal, in that format; integers stay integers;
    other text stays text, even when it looks like a formula."""
    from openpyxl.styles import Font

    sheet = book.create_sheet(title)
    sheet.append(list(columns))
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = "A2"
    formats = [number_formats.get(name) for name in columns]
    for row in rows:
        sheet.append([_cell(row.get(name), fmt) for name, fmt in zip(columns, formats, strict=True)])
        for cell, fmt in zip(sheet[sheet.max_row], formats, strict=True):
            if isinstance(cell.value, str):
                cell.data_type = "s"  # text stays text, even if it looks like a formula
            elif fmt is not None and isinstance(cell.value, Decimal):
                cell.number_format = fmt
    for column, name in zip(sheet.columns, columns, strict=True):
        width = max([len(name), *(len(str(c.value if c.value is not None else "")) for c in column)])
        sheet.column_dimensions[column[0].column_letter].width = min(60, width + 2)


def _cell(value: Any, fmt: str | None) -> Any:
    if value is None:
        return ""
    if fmt is not None and isinstance(value, str) and value != MIXED:
        return Decimal(value)
    return value


def to_json(books: dict[str, Any]) -> bytes:
    return orjson.dumps(books, option=orjson.OPT_INDENT_2) + b"\n"


def to_csv(books: dict[str, Any]) -> bytes:
    rows: list[dict[str, Any]] = []
    for inv in books["invoices"]:
        for line in inv["lines"]:
            row = _line_row(books, inv, line)
            rows.append({"document": "invoice-line", "id": f"{inv['id']}#{line['line_no']}", **row})
        rows.append(
            {
                "document": "invoice",
                "id": inv["id"],
                "invoice_id": inv["id"],
                "licensee_id": inv["licensee_id"],
                "licensee_name": _licensee_name(books, inv["licensee_id"], inv),
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
        rows.append({**note, "document": f"{note['kind']}-note"})
    return csv_table(CSV_COLUMNS, rows, numeric=NUMBER_FORMATS)


def to_xlsx(books: dict[str, Any]) -> bytes:
    book = new_workbook()
    add_sheet(book, "Invoices", INVOICE_COLUMNS, invoice_rows(books))
    add_sheet(book, "Lines", LINE_COLUMNS, line_rows(books))
    add_sheet(book, "Notes", NOTE_COLUMNS, note_rows(books))
    return workbook_bytes(book)


def render(books: dict[str, Any], fmt: str) -> bytes:
    """``books`` in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return to_json(books)
    if fmt == "csv":
        return to_csv(books)
    if fmt == "xlsx":
        return to_xlsx(books)
    raise ValueError(f"an export is one of {', '.join(FORMATS)}, not {fmt!r}")
