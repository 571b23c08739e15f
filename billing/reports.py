"""Finance's reports of a period, from its books (:mod:`billing.export`): a
summary across licensees and the payouts per provider department.

Both take what the period's books hold: the invoices *of* the period and the
credit and debit notes *issued in* it (a note corrects an earlier period's
invoice and is booked when it is issued). A credit note counts negative, a
debit note positive. Money is integer fen throughout; no figure is rounded
here, every total is a sum of the documents' own integers.

**Summary** (:func:`period_summary`, ``pdg.billing-summary.v1``): a row per
licensee with an invoice of the period or a note issued in it, by licensee
id: its name and credit code (as its documents name the buyer; for documents
that name none, as the catalogue holds them now), its invoice id(s), calls,
subtotal, VAT and total; the notes issued in the period on its invoices
(their ids, and their amount, VAT and total, signed); the net subtotal, VAT
and total (the invoice's plus the notes'); and the net revenue split
(provider, operator, public fund: the invoice lines' splits plus the notes'
splits, signed), which sums to the net subtotal -- less what top-ups billed
(prepaid calls bought: their invoices are in the subtotal, unsplit) plus what
the prepaid calls used were bought at (their ``prepaid`` lines are at 0 and
split: ``billing.prepaid``). ``calls`` are the calls served, not those
bought. Then a ``total`` of every figure.

**Payouts** (:func:`period_payouts`, ``pdg.billing-payouts.v1``): per
provider department (the one each invoice line named when it was issued;
for lines issued before lines named it, the dataset's ``provider`` in the
catalogue now; a dataset the catalogue does not hold comes last, under
``null``), per dataset
(its id, and its name in the catalogue now): the calls and records of the
period's invoice lines, the amount billed and its three parts as the lines
split them; the notes' amount and parts attributed to the dataset (signed);
and the net amount and parts (the lines' plus the notes'). Then a total per
provider and a grand ``total``. The net parts are what each party is owed
for the period. Prepaid calls are paid out as they are used, at what they
were bought at (their ``prepaid`` lines: billed 0, split); a top-up's
invoice, and any note on it, is not split and not in the payouts.

How a note is attributed to datasets (:func:`note_by_dataset`):

* a note on one line: its whole split goes to that line's dataset;
* a note on the whole invoice: each part of its split (provider, operator,
  public fund) is shared among the invoice's datasets in proportion to that
  same part of their lines on the invoice (the provider part by the lines'
  ``provider_fen``, and so on), by largest remainder (:func:`core.money.allocate`:
  whole fen first, the fen left one each to the largest remainders, ties to
  the dataset whose id sorts first). A part's attributions therefore sum
  exactly to the note's part, and a dataset gets back a share of a part only
  if its lines earned that part. The note's amount attributed to a dataset
  is the sum of its three parts.

So, to the fen: the payouts' grand total of each part is the sum of that part
over the period's invoice lines plus over its notes (signed), and it equals
the summary's total of the same part.

Each report is a JSON-ready dict, rendered by :func:`render` as JSON, CSV (a
row per licensee / dataset, then the totals, a ``row`` column saying which)
or XLSX (one sheet, the same rows, amounts as integer cells), with the
export's helpers and its formula safety for names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.export import add_sheet, books_and_noted, csv_table, new_workbook, workbook_bytes
from billing.invoices import TOP_UP
from billing.notes import CREDIT
from core.money import allocate

SUMMARY_FORMAT: Final = "pdg.billing-summary.v1"
PAYOUTS_FORMAT: Final = "pdg.billing-payouts.v1"
FORMATS: Final = ("csv", "json", "xlsx")
#: The three parts of a revenue split, as a line's and a note's ``split`` name them.
PARTS: Final = ("provider_fen", "operator_fen", "public_fund_fen")

_SUMMARY_FIGURES: Final = (
    "calls",
    "subtotal_fen",
    "vat_fen",
    "total_fen",
    "notes_amount_fen",
    "notes_vat_fen",
    "notes_total_fen",
    "net_subtotal_fen",
    "net_vat_fen",
    "net_total_fen",
    *PARTS,
)
SUMMARY_COLUMNS: Final = (
    "row",
    "licensee_id",
    "licensee_name",
    "credit_code",
    "invoice_ids",
    "note_ids",
    *_SUMMARY_FIGURES,
)
_PAYOUT_FIGURES: Final = (
    "calls",
    "records",
    "billed_fen",
    *PARTS,
    "notes_fen",
    "notes_provider_fen",
    "notes_operator_fen",
    "notes_public_fund_fen",
    "net_fen",
    "net_provider_fen",
    "net_operator_fen",
    "net_public_fund_fen",
)
PAYOUT_COLUMNS: Final = ("row", "provider", "dataset_id", "dataset_name", *_PAYOUT_FIGURES)


def _sign(note: dict[str, Any]) -> int:
    return -1 if note["kind"] == CREDIT else 1


def _sum(rows: Iterable[dict[str, Any]], figures: Iterable[str]) -> dict[str, int]:
    listed = list(rows)
    return {name: sum(int(row[name]) for row in listed) for name in figures}


# -- summary across licensees ------------------------------------------------------


async def period_summary(engine: AsyncEngine, period: str) -> dict[str, Any]:
    """The period's summary across licensees (see the module docstring);
    NotFoundError when it has neither invoices nor notes."""
    books, _noted = await books_and_noted(engine, period)
    return summary_of(books)


def summary_of(books: dict[str, Any]) -> dict[str, Any]:
    """The summary of ``books`` (:func:`billing.export.period_books`); pure."""
    invoices: dict[str, list[dict[str, Any]]] = defaultdict(list)
    notes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for inv in books["invoices"]:
        invoices[inv["licensee_id"]].append(inv)
    for note in books["notes"]:
        notes[note["licensee_id"]].append(note)
    names = books.get("licensees", {})
    rows = []
    for licensee in sorted(invoices.keys() | notes.keys()):
        own, corrections = invoices[licensee], notes[licensee]
        # As its documents name the buyer, else as the catalogue names it now.
        buyer = next(
            (doc["buyer"] for doc in (*own, *corrections) if (doc.get("buyer") or {}).get("name")), None
        )
        known = buyer or names.get(licensee) or {}
        row: dict[str, Any] = {
            "licensee_id": licensee,
            "licensee_name": known.get("name"),
            "credit_code": known.get("credit_code"),
            "invoice_ids": [inv["id"] for inv in own],
            "note_ids": [note["id"] for note in corrections],
            "calls": sum(inv["calls"] for inv in own if inv.get("kind") != TOP_UP),
            "subtotal_fen": sum(inv["subtotal_fen"] for inv in own),
            "vat_fen": sum(inv["vat_fen"] for inv in own),
            "total_fen": sum(inv["total_fen"] for inv in own),
            "notes_amount_fen": sum(_sign(n) * n["amount_fen"] for n in corrections),
            "notes_vat_fen": sum(_sign(n) * n["vat_fen"] for n in corrections),
            "notes_total_fen": sum(_sign(n) * n["total_fen"] for n in corrections),
        }
        row["net_subtotal_fen"] = row["subtotal_fen"] + row["notes_amount_fen"]
        row["net_vat_fen"] = row["vat_fen"] + row["notes_vat_fen"]
        row["net_total_fen"] = row["total_fen"] + row["notes_total_fen"]
        for part in PARTS:
            row[part] = sum(ln["split"][part] for inv in own for ln in inv["lines"]) + sum(
                _sign(n) * n["split"][part] for n in corrections
            )
        rows.append(row)
    return {
        "format": SUMMARY_FORMAT,
        "period": books["period"],
        "closed": books["closed"],
        "licensees": rows,
        "total": {
            "licensees": len(rows),
            "invoices": len(books["invoices"]),
            "notes": len(books["notes"]),
            **_sum(rows, _SUMMARY_FIGURES),
        },
    }


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary as table rows: a row per licensee (ids joined by spaces), then the total."""
    rows = [
        {
            **row,
            "row": "licensee",
            "invoice_ids": " ".join(row["invoice_ids"]),
            "note_ids": " ".join(row["note_ids"]),
        }
        for row in report["licensees"]
    ]
    rows.append({name: report["total"][name] for name in _SUMMARY_FIGURES} | {"row": "total"})
    return rows


# -- payouts per provider department ------------------------------------------------


async def period_payouts(engine: AsyncEngine, period: str) -> dict[str, Any]:
    """The period's payouts per provider department and dataset (see the
    module docstring); NotFoundError when it has neither invoices nor notes."""
    books, noted = await books_and_noted(engine, period)
    return payouts_of(books, noted)


def note_by_dataset(note: dict[str, Any], invoice: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``note``'s amount and split attributed to the datasets of ``invoice``
    (the invoice it corrects), signed (a credit's negative): ``{dataset:
    {"amount_fen", "provider_fen", "operator_fen", "public_fund_fen"}}``. The
    rule is the module docstring's; each part's attributions sum exactly to
    the note's part."""
    sign = _sign(note)
    if note["line_no"] is not None:
        line = next(ln for ln in invoice["lines"] if ln["line_no"] == note["line_no"])
        parts = {part: sign * note["split"][part] for part in PARTS}
        return {line["dataset"]: {"amount_fen": sum(parts.values()), **parts}}
    datasets = sorted({ln["dataset"] for ln in invoice["lines"]})
    found = {dataset: dict.fromkeys(("amount_fen", *PARTS), 0) for dataset in datasets}
    for part in PARTS:
        amount = note["split"][part]
        if amount == 0:
            continue
        weights = [sum(ln["split"][part] for ln in invoice["lines"] if ln["dataset"] == d) for d in datasets]
        if not any(weights):
            # Cannot happen for a note issued by billing.notes (a part the
            # invoice's lines never earned gets none of a note); kept total
            # all the same, by the lines' amounts.
            weights = [
                sum(ln["amount_fen"] for ln in invoice["lines"] if ln["dataset"] == d) for d in datasets
            ]
        if not any(weights):
            weights = [1] * len(datasets)
        for dataset, share in zip(datasets, allocate(amount, weights), strict=True):
            found[dataset][part] += sign * share
    for parts in found.values():
        parts["amount_fen"] = sum(parts[part] for part in PARTS)
    return found


def payouts_of(books: dict[str, Any], noted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The payouts of ``books``, given the invoices its notes correct
    (``noted``, by id: :func:`billing.export.books_and_noted`); pure."""
    catalogue = books.get("datasets", {})

    def provider_of(dataset: str, lines: Iterable[dict[str, Any]]) -> str | None:
        """The provider an invoice line named at issue, else the catalogue's now."""
        named = next(
            (ln.get("provider") for ln in lines if ln["dataset"] == dataset and ln.get("provider")), None
        )
        return named or (catalogue.get(dataset) or {}).get("provider")

    by_key: dict[tuple[str | None, str], dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(_PAYOUT_FIGURES, 0)
    )
    for inv in books["invoices"]:
        if inv.get("kind") == TOP_UP:
            continue  # split as its calls are used: the prepaid lines
        for line in inv["lines"]:
            row = by_key[provider_of(line["dataset"], (line,)), line["dataset"]]
            row["calls"] += line["calls"]
            row["records"] += line["records"]
            row["billed_fen"] += line["amount_fen"]
            for part in PARTS:
                row[part] += line["split"][part]
    for note in books["notes"]:
        invoice = noted[note["invoice_id"]]
        if invoice.get("kind") == TOP_UP:
            continue  # not split, as the top-up was not
        for dataset, parts in note_by_dataset(note, invoice).items():
            row = by_key[provider_of(dataset, invoice["lines"]), dataset]
            row["notes_fen"] += parts["amount_fen"]
            for part in PARTS:
                row[f"notes_{part}"] += parts[part]
    providers: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for (provider, dataset), figures in sorted(
        by_key.items(), key=lambda item: (item[0][1], item[0][0] or "")
    ):
        figures["net_fen"] = figures["billed_fen"] + figures["notes_fen"]
        for part in PARTS:
            figures[f"net_{part}"] = figures[part] + figures[f"notes_{part}"]
        known = catalogue.get(dataset) or {}
        providers[provider].append({"dataset_id": dataset, "dataset_name": known.get("name"), **figures})
    listed: list[dict[str, Any]] = [
        {"provider": provider, "datasets": rows, "total": _sum(rows, _PAYOUT_FIGURES)}
        for provider, rows in sorted(providers.items(), key=lambda item: (item[0] is None, item[0] or ""))
    ]
    return {
        "format": PAYOUTS_FORMAT,
        "period": books["period"],
        "closed": books["closed"],
        "providers": listed,
        "total": _sum((p["total"] for p in listed), _PAYOUT_FIGURES),
    }


def payout_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The payouts as table rows: each provider's datasets then its total, then the grand total."""
    rows: list[dict[str, Any]] = []
    for provider in report["providers"]:
        rows += [{"row": "dataset", "provider": provider["provider"], **row} for row in provider["datasets"]]
        rows.append({"row": "provider-total", "provider": provider["provider"], **provider["total"]})
    rows.append({"row": "total", **report["total"]})
    return rows


# -- rendering ----------------------------------------------------------------------


def render(report: dict[str, Any], fmt: str) -> bytes:
    """A summary or payout report in ``fmt`` (one of :data:`FORMATS`)."""
    columns: tuple[str, ...]
    if report["format"] == SUMMARY_FORMAT:
        title, columns, rows = "Summary", SUMMARY_COLUMNS, summary_rows(report)
    elif report["format"] == PAYOUTS_FORMAT:
        title, columns, rows = "Payouts", PAYOUT_COLUMNS, payout_rows(report)
    else:
        raise ValueError(f"not a billing report: {report.get('format')!r}")
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    if fmt == "csv":
        return csv_table(columns, rows)
    if fmt == "xlsx":
        book = new_workbook()
        add_sheet(book, title, columns, rows)
        return workbook_bytes(book)
    raise ValueError(f"a report is one of {', '.join(FORMATS)}, not {fmt!r}")
