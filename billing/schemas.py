"""The billing resources as the admin API shows them (DESIGN §3): pydantic
models for its OpenAPI document; the JSON itself is what
:mod:`billing.invoices` stored and hashed."""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt


class LineSplit(BaseModel):
    provider_fen: int
    operator_fen: int
    public_fund_fen: int


class RevenueShares(BaseModel):
    """The revenue split of the line's terms version, applied to the line (fractions as decimal strings)."""

    provider: str
    operator: str
    public_fund: str


class InvoiceLine(BaseModel):
    line_no: int
    dataset: str
    purpose: str
    #: ``usage``: calls of the invoice's period; ``late``: calls of ``usage_period``
    #: that reached the ledger after that period closed; ``prepaid``: calls
    #: drawn from prepaid calls bought (at 0: paid when bought); ``top-up``:
    #: prepaid calls bought (a top-up's invoice).
    kind: Literal["usage", "late", "prepaid", "top-up"]
    usage_period: str
    #: The version of the dataset's terms the line's calls were charged
    #: under; its revenue split is the one applied (absent on invoices
    #: closed before terms had versions).
    terms_version: int | None = None
    calls: int
    records: int
    #: The calls' charges summed, exactly (fen, 4 decimal places).
    charge_fen: str
    #: ``charge_fen`` rounded half up to the fen.
    amount_fen: int
    split: LineSplit
    revenue_split: RevenueShares
    #: The dataset's name, its tax classification code and the line's VAT
    #: rate, as they were when the invoice was made (absent before v2).
    dataset_name: str | None = None
    tax_code: str | None = None
    vat_rate: str | None = None
    #: The dataset's provider department when the invoice was made (its payouts' recipient).
    provider: str | None = None
    #: ``prepaid`` lines: what their calls were bought at, exactly (fen, 4
    #: decimal places); ``split`` shares it, rounded half up to the fen.
    prepaid_value_fen: str | None = None
    #: ``top-up`` lines: the licence, and the price of each call bought.
    licence_id: str | None = None
    unit_price_fen: str | None = None


class VatGroup(BaseModel):
    """The billed lines of one VAT rate, and their VAT."""

    vat_rate: str
    amount_fen: int
    vat_fen: int


class TopUpOf(BaseModel):
    """The purchase a top-up's invoice bills."""

    id: str
    licence_id: str
    calls: int
    first_position: int
    unit_price_fen: str


class Party(BaseModel):
    """The seller (the operating company) or the buyer (a licensee), copied
    into the document when it was made."""

    name: str
    #: Unified social credit code (empty when none is configured).
    credit_code: str
    address: str = ""
    bank: str = ""
    account: str = ""


class Covers(BaseModel):
    """The ledger records the invoice's period close billed: ``after_seq < seq <= through_seq``
    for late usage, ``seq <= through_seq`` for the period's own."""

    after_seq: int
    through_seq: int


class Invoice(BaseModel):
    format: str
    id: str
    #: Absent on a period's invoice; ``top-up`` on a purchase of prepaid calls.
    kind: Literal["top-up"] | None = None
    licensee_id: str
    #: A period's invoice: the period it bills; a top-up's: its month of purchase.
    period: str
    #: ``draft``: the period is closed for review, and the invoice is
    #: computed from the call record when read; ``issued``: final, numbered
    #: and registered; ``closed``: issued before drafts and numbers.
    status: Literal["draft", "issued", "closed"]
    #: When the period was closed (a draft) or the invoice issued.
    closed_at: AwareDatetime
    #: Given at issue, gap-free in its series (null on a draft).
    number: str | None = None
    issued_at: AwareDatetime | None = None
    #: ``YYYY-MM-DD``, the billing time zone's date payment is due.
    due_at: str | None = None
    currency: Literal["CNY"] | None = None
    seller: Party | None = None
    buyer: Party | None = None
    #: Null on a top-up's invoice (it bills no call record).
    covers: Covers | None
    top_up: TopUpOf | None = None
    calls: int
    lines: list[InvoiceLine]
    subtotal_fen: int
    #: The VAT rate of its billed lines, or ``mixed`` when they carry several.
    vat_rate: str
    #: VAT per rate, rounded once per rate (absent before v2).
    vat_groups: list[VatGroup] | None = None
    vat_fen: int
    total_fen: int
    #: SHA-256 (hex) of the invoice's canonical JSON (sorted keys, compact, without this field).
    content_hash: str


class PendingCall(BaseModel):
    """A call of the period that had not reached the ledger when it closed."""

    call_id: str
    #: ``log``: its record waits in the call-record log; ``in-flight``: it had not finished.
    where: Literal["log", "in-flight"]
    licensee_id: str
    licence_id: str
    dataset_id: str
    purpose: str
    period: str
    started_at: AwareDatetime
    #: The record's outcome (``log`` only).
    outcome: str | None = None


class LeftForNextClose(BaseModel):
    """What a close with ``allow_pending=true`` left for the next close (which
    bills it as late usage); counts are null when the log could not be read."""

    reason: str
    log_records: int | None
    in_flight: int | None
    calls: list[PendingCall]
    #: More calls were left than are listed (the counts are whole).
    truncated: bool


class ClosedPeriod(BaseModel):
    period: str
    #: ``draft``: closed for review (issue it to make the invoices final); ``issued``.
    status: Literal["draft", "issued"]
    #: True when the period had been issued before: these are its invoices, unchanged.
    already_closed: bool
    after_seq: int
    through_seq: int
    closed_at: AwareDatetime
    invoices: list[Invoice]
    #: Of the drafts (null once issued): give it to the issue to insist
    #: that what was reviewed is what is issued.
    drafts_hash: str | None = None
    #: Null when the close billed every call its period served.
    pending: LeftForNextClose | None = None


class BillingSummary(BaseModel):
    """``GET /admin/v1/billing/{period}/summary`` (``billing.reports``): a row
    per licensee with its invoices, the notes issued in the period, totals and
    the net revenue split, and the grand total (integer fen)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["pdg.billing-summary.v1"]
    period: str
    closed: bool
    licensees: list[dict[str, Any]]
    total: dict[str, Any]


class BillingPayouts(BaseModel):
    """``GET /admin/v1/billing/{period}/payouts`` (``billing.reports``): per
    provider department and dataset, the amount billed and its three shares,
    net of the notes issued in the period (integer fen)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["pdg.billing-payouts.v1"]
    period: str
    closed: bool
    providers: list[dict[str, Any]]
    total: dict[str, Any]


class IssueIn(BaseModel):
    """``POST /admin/v1/billing/{period}/issue``: optional."""

    model_config = ConfigDict(extra="forbid")

    #: The ``drafts_hash`` reviewed: the issue is refused (409) if the drafts changed since.
    drafts_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class Difference(BaseModel):
    """One difference a reconciliation found (:mod:`billing.reconcile` lists the causes)."""

    #: The call it concerns; null for a counter no recorded call belongs to.
    call_id: str | None
    cause: Literal[
        "ledger-chain",
        "record-missing",
        "record-altered",
        "unbilled",
        "invoice-altered",
        "invoice-line-altered",
        "note-altered",
        "register-altered",
        "price-mismatch",
        "counter-mismatch",
    ]
    detail: str
    seq: int | None = None
    invoice_id: str | None = None
    line_no: int | None = None
    #: For ``counter-mismatch``: the Redis key, what it reads, what the call record holds.
    counter: str | None = None
    counter_value: int | None = None
    recorded: int | None = None


class Pending(BaseModel):
    #: Records in the call-record log, not yet in the ledger.
    log_records: int
    #: Calls reserved and not yet finished.
    in_flight: int


class Checked(BaseModel):
    billed_calls: int
    invoices: int
    lines: int
    counters: int


class LedgerVerification(BaseModel):
    ok: bool
    records: int
    checkpoints: int
    first_seq: int
    last_seq: int
    problem: dict[str, int | str] | None


class ReconciliationReport(BaseModel):
    period: str
    #: True when there are zero differences.
    clean: bool
    #: The verdict in one sentence.
    summary: str
    after_seq: int
    through_seq: int
    #: The call record's verification (as ``pdg audit verify``).
    ledger: LedgerVerification
    checked: Checked
    pending: Pending
    #: Served calls of the period that reached the ledger after its close: the
    #: next close bills them as late usage.
    late_after_close: int
    difference_count: int
    by_cause: dict[str, int]
    #: True when ``differences`` lists fewer than ``difference_count`` (raise ``limit``).
    truncated: bool
    differences: list[Difference]


class NoteIn(BaseModel):
    """A credit or debit note to issue on an invoice (:mod:`billing.notes`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["credit", "debit"]
    #: Fen before VAT, above 0; never more than the invoice (or line) allows.
    amount_fen: StrictInt = Field(gt=0)
    reason: str = Field(min_length=1, max_length=500)
    #: The line it corrects; omit for the invoice as a whole.
    line_no: StrictInt | None = Field(default=None, ge=1)


class NoteAfter(BaseModel):
    credited_fen: int
    debited_fen: int
    #: The invoice's subtotal corrected by every note up to this one.
    subtotal_fen: int


class Note(BaseModel):
    format: str
    id: str
    kind: Literal["credit", "debit"]
    note_no: int
    invoice_id: str
    licensee_id: str
    invoice_period: str
    #: The period it was issued in, after the invoice's.
    period: str
    line_no: int | None
    amount_fen: int
    vat_rate: str
    vat_fen: int
    total_fen: int
    split: LineSplit
    reason: str
    issued_by: str
    issued_at: AwareDatetime
    invoice_after: NoteAfter
    #: SHA-256 (hex) of the note's canonical JSON (sorted keys, compact, without this field).
    content_hash: str
    #: Given at issue in the note kind's series (absent before v2), and the
    #: number of the invoice it corrects.
    number: str | None = None
    invoice_number: str | None = None
    currency: Literal["CNY"] | None = None
    seller: Party | None = None
    buyer: Party | None = None
    #: The corrected line's dataset and purpose (a note on one line).
    dataset: str | None = None
    dataset_name: str | None = None
    purpose: str | None = None


class BillingExport(BaseModel):
    """``GET /admin/v1/billing/{period}/export?format=json``: a period's books."""

    format: Literal["pdg.billing-export.v1"]
    period: str
    #: Whether the period is closed (notes issued in an open period export too).
    closed: bool
    invoices: list[Invoice]
    #: The notes issued in the period (on invoices of earlier periods).
    notes: list[Note]
    #: Names beside ids: each licensee's and each dataset's, as the
    #: documents give them (else as the catalogue has them now).
    licensees: dict[str, dict[str, Any]] = Field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: By note id: the dataset and purpose of the line a note corrects.
    note_lines: dict[str, dict[str, Any]] = Field(default_factory=dict)


# -- receivables (billing.payments) ------------------------------------------------------


class PaymentIn(BaseModel):
    """``POST /admin/v1/invoices/{id}/payments``: a payment received."""

    model_config = ConfigDict(extra="forbid")

    #: Fen, above 0; never more than the invoice's balance (409).
    amount_fen: StrictInt = Field(gt=0)
    #: The day it was paid (``YYYY-MM-DD``): from the invoice's issue day up to today.
    paid_on: date
    #: The bank's or the payer's reference.
    reference: str = Field(default="", max_length=200)


class InvoiceAfter(BaseModel):
    """The invoice once the payment is counted."""

    owed_fen: int
    paid_fen: int
    #: Below 0 when a credit note came after the money (owed back).
    balance_fen: int
    status: Literal["issued", "partially-paid", "paid", "overdue"]


class Payment(BaseModel):
    id: str
    #: 1, 2, ... per invoice.
    payment_no: int
    invoice_id: str
    #: Null for an invoice issued before numbers.
    invoice_number: str | None
    licensee_id: str
    amount_fen: int
    #: ``YYYY-MM-DD``: the day it was paid.
    paid_on: str
    #: When it was recorded.
    received_at: AwareDatetime
    reference: str
    #: The admin token that recorded it (``cli`` from the command line).
    recorded_by: str
    #: Only in the answer to recording it.
    invoice_after: InvoiceAfter | None = None


class InvoiceAccount(BaseModel):
    """``GET /admin/v1/invoices/{id}/payments``: an invoice's account today."""

    invoice_id: str
    number: str | None
    licensee_id: str
    period: str
    #: ``YYYY-MM-DD`` in the billing time zone.
    issued_on: str
    due_at: str
    as_of: str
    #: The invoice's total, VAT included.
    total_fen: int
    debited_fen: int
    credited_fen: int
    #: ``total_fen + debited_fen - credited_fen``.
    owed_fen: int
    paid_fen: int
    balance_fen: int
    status: Literal["issued", "partially-paid", "paid", "overdue"]
    payments: list[Payment]


class StatementLicensee(BaseModel):
    id: str
    name: str
    credit_code: str


class StatementEntry(BaseModel):
    #: ``YYYY-MM-DD`` in the billing time zone.
    date: str
    kind: Literal["invoice", "debit-note", "credit-note", "payment"]
    document_id: str
    #: The document's number (its id when it has none; a payment's id).
    number: str
    invoice_id: str
    invoice_number: str | None
    #: Signed: an invoice or debit note adds, a credit note or payment subtracts.
    amount_fen: int
    #: The running balance after this entry.
    balance_fen: int
    #: A payment's reference (null for documents).
    reference: str | None


class StatementInvoice(BaseModel):
    id: str
    number: str | None
    period: str
    issued_on: str
    due_at: str
    total_fen: int
    debited_fen: int
    credited_fen: int
    owed_fen: int
    paid_fen: int
    balance_fen: int
    status: Literal["issued", "partially-paid", "paid", "overdue"]


class StatementTotals(BaseModel):
    """The entries' amounts by kind (unsigned)."""

    invoiced_fen: int
    debited_fen: int
    credited_fen: int
    paid_fen: int


class Statement(BaseModel):
    """``GET /admin/v1/licensees/{id}/statement?from=YYYY-MM&to=YYYY-MM``."""

    model_config = ConfigDict(populate_by_name=True)

    format: Literal["pdg.statement.v1"]
    licensee: StatementLicensee
    #: As the licensee's newest numbered invoice names it.
    seller: Party | None
    from_: str = Field(alias="from")
    to: str
    #: The day statuses are as of: the last day covered, or today if earlier.
    as_of: str
    currency: str
    opening_balance_fen: int
    entries: list[StatementEntry]
    totals: StatementTotals
    #: The closing balance.
    balance_fen: int
    #: Invoices with an entry in the months covered or a balance at ``as_of``.
    invoices: list[StatementInvoice]
    generated_at: AwareDatetime


class AgeingInvoice(BaseModel):
    id: str
    number: str | None
    period: str
    issued_on: str
    due_at: str
    days_past_due: int
    balance_fen: int
    bucket: Literal["current", "1-30", "31-60", "61-90", "over-90", "credit"]
    status: Literal["issued", "partially-paid", "paid", "overdue"]


class AgeingSums(BaseModel):
    current_fen: int
    days_1_30_fen: int
    days_31_60_fen: int
    days_61_90_fen: int
    over_90_fen: int
    #: The five buckets summed: what is owed.
    total_fen: int
    #: Balances below 0 (owed back), summed.
    credit_fen: int


class AgeingLicensee(AgeingSums):
    licensee: StatementLicensee
    invoices: list[AgeingInvoice]


class Ageing(BaseModel):
    """``GET /admin/v1/billing/ageing?as_of=YYYY-MM-DD``."""

    format: Literal["pdg.ageing.v1"]
    as_of: str
    currency: str
    licensees: list[AgeingLicensee]
    totals: AgeingSums


class PrepaidLot(BaseModel):
    """A top-up in a prepaid balance: its calls used and left, and what is left in money."""

    id: str
    invoice_id: str
    bought_at: AwareDatetime
    calls: int
    first_position: int
    unit_price_fen: str
    used_calls: int
    remaining_calls: int
    #: ``remaining_calls`` x ``unit_price_fen``, exactly (fen, 4 decimal places).
    remaining_value_fen: str


class PrepaidBalance(BaseModel):
    """A prepaid licence's balance as the call record holds it (up to ``as_of_seq``)."""

    licence_id: str
    licensee_id: str
    as_of_seq: int
    limit_calls: int
    used_calls: int
    remaining_calls: int
    #: Calls of the limit no top-up bought (billed at list price when used).
    granted_calls: int
    bought_calls: int
    bought_remaining_calls: int
    #: What the calls bought and not yet used were bought at, rounded half up to the fen.
    bought_remaining_value_fen: int
    top_ups: list[PrepaidLot]
