"""The billing tables: one row per closed period, its invoices, their lines,
and the calls each invoice billed.

All four are append-only (triggers refuse UPDATE and DELETE): a closed
period, an invoice and its lines never change. Each invoice also keeps the
exact bytes its ``content_hash`` was made from, so an edit made behind the
triggers' back shows up in reconciliation.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, UTCDateTime


class BillingCloseRow(Base):
    """A closed period: which records its invoices cover.

    Close ``P`` bills the served calls of period ``P`` with ``seq <= through_seq``
    and, as labelled late lines, those of earlier periods with
    ``after_seq < seq <= through_seq`` (``after_seq`` is the previous close's
    ``through_seq``). Periods close in order, so every record is billed once."""

    __tablename__ = "billing_closes"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    after_seq: Mapped[int] = mapped_column(BigInteger)
    through_seq: Mapped[int] = mapped_column(BigInteger)
    #: The smallest ``seq`` it billed (0: unknown, from the start): its billed
    #: calls lie in ``first_seq..through_seq``.
    first_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    vat_rate: Mapped[str] = mapped_column(String(16))
    invoices: Mapped[int] = mapped_column(Integer)
    closed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class InvoiceRow(Base):
    __tablename__ = "invoices"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    licensee_id: Mapped[str] = mapped_column(String(64))
    #: The month it bills: a period's invoice is made by the period's close
    #: (its id ``inv-{period}-{licensee}``), a top-up's is its month of purchase.
    period: Mapped[str] = mapped_column(String(7))
    #: ``period`` (a period's usage) or ``top-up`` (prepaid calls bought).
    kind: Mapped[str] = mapped_column(String(16), server_default="period")
    status: Mapped[str] = mapped_column(String(16))
    calls: Mapped[int] = mapped_column(BigInteger)
    subtotal_fen: Mapped[int] = mapped_column(BigInteger)
    vat_rate: Mapped[str] = mapped_column(String(16))
    vat_fen: Mapped[int] = mapped_column(BigInteger)
    total_fen: Mapped[int] = mapped_column(BigInteger)
    closed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: SHA-256 (hex) of ``content``.
    content_hash: Mapped[str] = mapped_column(String(64))
    #: The invoice as canonical JSON (sorted keys, compact): what was hashed.
    content: Mapped[str] = mapped_column(Text)
    #: Given at issue (``billing.register``); empty on invoices issued before numbers.
    number: Mapped[str | None] = mapped_column(String(40), nullable=True)
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: ``YYYY-MM-DD`` in the billing time zone.
    due_at: Mapped[str | None] = mapped_column(String(10), nullable=True)

    __table_args__ = (
        Index("ix_invoices_period", "period"),
        Index("ux_invoices_number", "number", unique=True),
    )


class InvoiceLineRow(Base):
    """One line: a dataset and purpose (and, for late usage, the period the
    calls belong to), its calls, their records, the exact charge and the
    rounded amount with its split."""

    __tablename__ = "invoice_lines"

    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"), primary_key=True)
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    dataset_id: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    #: ``usage`` (calls of the invoice's period) or ``late`` (calls of ``usage_period``).
    kind: Mapped[str] = mapped_column(String(16))
    usage_period: Mapped[str] = mapped_column(String(7))
    calls: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(BigInteger)
    #: The calls' charges summed, in 1/10000 fen (before rounding).
    charge_e4: Mapped[int] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    provider_fen: Mapped[int] = mapped_column(BigInteger)
    operator_fen: Mapped[int] = mapped_column(BigInteger)
    public_fund_fen: Mapped[int] = mapped_column(BigInteger)
    #: The revenue split applied, in basis points.
    split_provider: Mapped[int] = mapped_column(Integer)
    split_operator: Mapped[int] = mapped_column(Integer)
    split_public_fund: Mapped[int] = mapped_column(Integer)
    #: The version of the dataset's terms the line's calls were charged
    #: under (null on lines closed before terms had versions).
    terms_version: Mapped[int | None] = mapped_column(Integer, nullable=True)


class InvoiceCallRow(Base):
    """A call an invoice billed: the billing side's own copy of its id and
    charge, so reconciliation can name a call the ledger no longer holds. Its
    line is the invoice's line of the call's dataset, purpose and period. The
    key is the record's ``seq``: no record is billed twice.

    A close copies every call it bills (a million rows a month), so the table
    has its key and nothing else: no foreign key (its row-by-row check doubled
    the copy's time; the close writes the invoice and its calls in one
    transaction, and reconciliation treats a call billed on an unknown invoice
    as unbilled) and no index on ``invoice_id`` (a period's billed calls are
    read by ``seq`` range: :mod:`billing.reconcile`)."""

    __tablename__ = "invoice_calls"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    call_id: Mapped[str] = mapped_column(String(36))
    invoice_id: Mapped[str] = mapped_column(String(100))
    charge_e4: Mapped[int] = mapped_column(BigInteger)


class BillingDraftRow(Base):
    """A period closed for review: its invoices are drafts, computed from the
    call record when read, until it is issued (``billing_closes``)."""

    __tablename__ = "billing_drafts"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RegisterRow(Base):
    """One issued document in the billing register's hash chain (``billing.register``)."""

    __tablename__ = "billing_register"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    document_id: Mapped[str] = mapped_column(String(120))
    series: Mapped[str] = mapped_column(String(60))
    series_no: Mapped[int] = mapped_column(BigInteger)
    number: Mapped[str] = mapped_column(String(40), unique=True)
    #: Canonical JSON of the entry; ``hash`` chains it to the one before.
    body: Mapped[str] = mapped_column(Text)
    hash: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    #: Hex of the ledger key's signature of ``hash``.
    signature: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("series", "series_no", name="uq_billing_register_series"),
        UniqueConstraint("kind", "document_id", name="uq_billing_register_document"),
    )


class BillingNoteRow(Base):
    """A credit or debit note: a correction of a closed invoice, issued in a
    later period. Notes of one invoice are numbered 1, 2, ... (``note_no``,
    unique per invoice): two notes issued at once cannot both be checked
    against the same earlier notes, so together they never exceed the invoice.
    Amounts are positive; ``kind`` says which way they go."""

    __tablename__ = "billing_notes"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"))
    note_no: Mapped[int] = mapped_column(Integer)
    #: ``credit`` (the licensee owes less) or ``debit`` (more).
    kind: Mapped[str] = mapped_column(String(8))
    #: The billing period it was issued in (after the invoice's).
    period: Mapped[str] = mapped_column(String(7))
    #: The invoice line it corrects, or null for the invoice as a whole.
    line_no: Mapped[int | None] = mapped_column(Integer, nullable=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    vat_fen: Mapped[int] = mapped_column(BigInteger)
    total_fen: Mapped[int] = mapped_column(BigInteger)
    provider_fen: Mapped[int] = mapped_column(BigInteger)
    operator_fen: Mapped[int] = mapped_column(BigInteger)
    public_fund_fen: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    #: The admin token that issued it (``cli`` from the command line).
    issued_by: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: SHA-256 (hex) of ``content``.
    content_hash: Mapped[str] = mapped_column(String(64))
    #: The note as canonical JSON (sorted keys, compact): what was hashed.
    content: Mapped[str] = mapped_column(Text)
    #: Given at issue (``billing.register``); empty on notes issued before numbers.
    number: Mapped[str | None] = mapped_column(String(40), nullable=True)

    __table_args__ = (
        UniqueConstraint("invoice_id", "note_no"),
        Index("ix_billing_notes_period", "period"),
        Index("ux_billing_notes_number", "number", unique=True),
    )


class PaymentRow(Base):
    """A payment received against an issued invoice (``billing.payments``).
    Payments of one invoice are numbered 1, 2, ... (``payment_no``, unique per
    invoice): two recorded at once cannot both be checked against the same
    earlier payments, so together they never pay more than is owed. Amounts
    are positive integers of fen. Append-only, like the rest of billing."""

    __tablename__ = "payments"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"))
    payment_no: Mapped[int] = mapped_column(Integer)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    #: The day the money was paid (its value date), as the remittance says.
    paid_on: Mapped[date] = mapped_column(Date)
    #: When the payment was recorded.
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The bank's or the payer's reference (may be empty).
    reference: Mapped[str] = mapped_column(String(200))
    #: The admin token that recorded it (``cli`` from the command line).
    recorded_by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("invoice_id", "payment_no"),
        CheckConstraint("amount_fen > 0", name="amount_positive"),
    )
