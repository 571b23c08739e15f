"""Tables of the catalogue and of licensing.

Prices are stored as integers in units of 1/10000 fen (``*_e4``) so that the
four decimal places a unit price may have survive every backend exactly;
revenue splits are stored in basis points of 1/10000.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, UTCDateTime, utcnow


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(64), index=True)
    upstream_url: Mapped[str] = mapped_column(String(1000))
    classification: Mapped[int] = mapped_column(Integer)
    open_class: Mapped[str] = mapped_column(String(16))
    free_monthly_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    per_call_e4: Mapped[int] = mapped_column(BigInteger, default=0)
    per_record_e4: Mapped[int] = mapped_column(BigInteger, default=0)
    #: ``[{"up_to": int | None, "per_call_e4": int}, ...]``
    tiers: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    split_provider: Mapped[int] = mapped_column(Integer)
    split_operator: Mapped[int] = mapped_column(Integer)
    split_public_fund: Mapped[int] = mapped_column(Integer)
    burst_per_second: Mapped[float] = mapped_column(Float)
    burst_capacity: Mapped[int] = mapped_column(Integer)
    timeout_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    idle_timeout_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    #: The tax classification code (税收分类编码) of its invoice lines (None:
    #: ``billing.tax_code``).
    tax_code: Mapped[str | None] = mapped_column(String(19), nullable=True)
    #: The VAT rate of its invoice lines, e.g. ``"0.06"`` (None: ``billing.vat_rate``).
    vat_rate: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: The methods served, e.g. ``["GET", "HEAD"]``.
    methods: Mapped[list[str]] = mapped_column(JSON)
    #: Path patterns served (``[]``: every path).
    paths: Mapped[list[str]] = mapped_column(JSON)
    max_response_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_records_per_call: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: ``schemas.UpstreamPool`` as JSON (``None``: ``upstream_url`` alone).
    upstream_pool: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: ``schemas.UpstreamTls`` as JSON (``None``: the system's CAs, no client certificate).
    upstream_tls: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: The version of the terms above (``DatasetTermsRow``): the one in force.
    terms_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class DatasetTermsRow(Base):
    """One version of a dataset's terms: its prices and revenue split as in
    force from ``effective_from`` until the next version. Append-only: a
    change of terms is a new version, and every call record names the
    version it was charged under."""

    __tablename__ = "dataset_terms"

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    per_call_e4: Mapped[int] = mapped_column(BigInteger)
    per_record_e4: Mapped[int] = mapped_column(BigInteger)
    #: ``[{"up_to": int | None, "per_call_e4": int}, ...]``
    tiers: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    split_provider: Mapped[int] = mapped_column(Integer)
    split_operator: Mapped[int] = mapped_column(Integer)
    split_public_fund: Mapped[int] = mapped_column(Integer)


class LicenseeRow(Base):
    __tablename__ = "licensees"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    credit_code: Mapped[str] = mapped_column(String(18), unique=True)
    contact: Mapped[str] = mapped_column(String(200), default="")
    #: What an invoice names its buyer by, besides name and credit code.
    address: Mapped[str] = mapped_column(String(300), default="", server_default="")
    bank: Mapped[str] = mapped_column(String(200), default="", server_default="")
    account: Mapped[str] = mapped_column(String(64), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LicenceRow(Base):
    __tablename__ = "licences"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    licensee_id: Mapped[str] = mapped_column(ForeignKey("licensees.id"), index=True)
    datasets: Mapped[list[str]] = mapped_column(JSON)
    max_classification: Mapped[int] = mapped_column(Integer)
    purposes: Mapped[list[str]] = mapped_column(JSON)
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime)
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))
    security_officer: Mapped[str] = mapped_column(String(200))
    conditions: Mapped[str] = mapped_column(Text, default="")
    free_monthly_calls: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    paid_credit_limit_fen: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    paid_prepaid_calls: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: The agreed unit price of a prepaid call (1/10000 fen): the price of its
    #: top-ups unless one names its own.
    paid_prepaid_unit_price_e4: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: Narrowing of every granted dataset's methods (``None``: theirs).
    methods: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    #: Narrowing of datasets' paths: ``["{dataset}/{pattern}", ...]`` (``None``: theirs).
    paths: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class PrepaidTopUpRow(Base):
    """A purchase of prepaid calls for a licence (``billing.prepaid``): its
    calls take positions ``first_position + 1 .. first_position + calls`` of
    the licence's prepaid balance (what it held before, granted or bought,
    comes first), at ``unit_price_e4`` each, billed on invoice
    ``invoice_id``. Append-only; a licence's top-ups never overlap."""

    __tablename__ = "prepaid_top_ups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    licence_id: Mapped[str] = mapped_column(ForeignKey("licences.id"))
    licensee_id: Mapped[str] = mapped_column(String(64))
    calls: Mapped[int] = mapped_column(BigInteger)
    first_position: Mapped[int] = mapped_column(BigInteger)
    unit_price_e4: Mapped[int] = mapped_column(BigInteger)
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"))
    bought_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The admin token that bought it (``cli`` from the command line).
    bought_by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("licence_id", "first_position"),
        CheckConstraint("calls > 0", name="calls_positive"),
        CheckConstraint("unit_price_e4 >= 0", name="price_not_negative"),
    )


class AppRow(Base):
    __tablename__ = "apps"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    licensee_id: Mapped[str] = mapped_column(ForeignKey("licensees.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    #: ``client_secret`` (basic or post) or ``private_key_jwt``.
    auth_method: Mapped[str] = mapped_column(String(32))
    #: Argon2id hash of the client secret; never the secret itself.
    secret_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: The secret before the last rotation, valid until ``previous_secret_until``.
    previous_secret_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AdminTokenRow(Base):
    __tablename__ = "admin_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    licensee_id: Mapped[str | None] = mapped_column(ForeignKey("licensees.id"), nullable=True)
    #: Argon2id hash of the token's secret part.
    token_hash: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: Refused from this instant on (``None``: until revoked).
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SigningKeyRow(Base):
    """The keys that sign access tokens, shared by all replicas (``licensing.keys``)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: A shared key's private half, PKCS#8 PEM (encrypted under the key
    #: passphrase when one is set); ``None`` for a replica's own key file.
    private_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: When it began to sign (the latest activated, not retired, signs).
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class CatalogueVersionRow(Base):
    """One row whose counter moves on every catalogue or licence change; each
    replica polls it to know when to reload its in-memory view."""

    __tablename__ = "catalogue_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
