"""Tables of the call record (DESIGN §5).

``calls`` holds one row per data call that passed authentication, in ledger
order (``seq``), never updated or deleted. Every column but ``hash`` is part
of the record's hashed bytes (``ledger.record.hashed``), so an edit of any
column, a deleted row, an inserted row or two swapped rows is found by
``pdg audit verify``. Money is integer (1/10000 fen), times are UTC.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, SmallInteger, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, UTCDateTime, utcnow


class CallRow(Base):
    __tablename__ = "calls"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    #: Unique (on PostgreSQL per partition, ``ledger.partitions``; the
    #: parent indexes it for look-ups across them: ``ix_calls_call_id``).
    call_id: Mapped[str] = mapped_column(String(36), unique=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    #: When the record was made (the call's end); inside the hashed bytes.
    time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    app_id: Mapped[str] = mapped_column(String(64))
    licensee_id: Mapped[str] = mapped_column(String(64))
    licence_id: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))
    #: The path below ``/data/``, without the query string.
    path: Mapped[str] = mapped_column(String(2048))
    #: SHA-256 (or SM3) of the raw query string, when there was one: the query
    #: may carry personal data, so only its digest is kept.
    query_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: What the caller got.
    status: Mapped[int] = mapped_column(Integer)
    upstream_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: served | refused | upstream-failure | incomplete
    outcome: Mapped[str] = mapped_column(String(20))
    #: The problem code of a refusal or failure (DESIGN §3), else null.
    problem: Mapped[str | None] = mapped_column(String(40), nullable=True)
    records: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    latency_us: Mapped[int] = mapped_column(BigInteger)
    #: The quota pool the call drew on (free | prepaid | credit | none), null
    #: when it was refused before a reservation; ``replay`` for a repeat of an
    #: idempotent call already charged (served, drawn on no pool).
    pool: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: The billing period of the call's start (``YYYY-MM``).
    period: Mapped[str] = mapped_column(String(7))
    #: What the call costs, in 1/10000 fen (0 unless served from a paid pool).
    charge_e4: Mapped[int] = mapped_column(BigInteger)
    client_address: Mapped[str] = mapped_column(String(64))
    #: The access token's ``jti``; never the token.
    token_id: Mapped[str] = mapped_column(String(64))
    #: Digest (hex) of the response body as sent; null when nothing was sent.
    response_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The version of the dataset's terms the call was charged under (null:
    #: a call refused before its dataset was known, or a record written
    #: before terms had versions, which leaves it out of its hashed bytes).
    terms_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The name of the upstream target that gave the answer relayed (or the
    #: last one tried); null when nothing was forwarded, and in records
    #: written before pools, which leaves it out of their hashed bytes.
    upstream_target: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The chain entry of this record (hex); not part of the hashed bytes.
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_calls_licensee_seq", "licensee_id", "seq"),
        Index("ix_calls_dataset_seq", "dataset_id", "seq"),
        Index("ix_calls_period_licensee", "period", "licensee_id"),
        Index("ix_calls_call_id", "call_id"),
    )


class CheckpointRow(Base):
    """A signed checkpoint over ``first_seq..last_seq`` (``ledger.chain``)."""

    __tablename__ = "ledger_checkpoints"

    first_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    chain_head: Mapped[str] = mapped_column(String(64))
    merkle_root: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    algorithm: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(64))
    #: DER ECDSA signature, hex.
    signature: Mapped[str] = mapped_column(String(256))


class LedgerStateRow(Base):
    """The writer's position, moved in the same transaction as the rows it
    writes: the next sequence number, the chain head, the last log entry
    consumed. Writers fence each other on ``next_seq``."""

    __tablename__ = "ledger_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_seq: Mapped[int] = mapped_column(BigInteger)
    head: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(16))
    #: The id of the last log (Redis stream) entry moved into ``calls``.
    log_position: Mapped[str] = mapped_column(String(64))
    #: The last seq covered by a checkpoint (0: none yet).
    checkpointed_seq: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerPartitionRow(Base):
    """A partition of ``calls`` on PostgreSQL: the records from ``first_seq``
    to ``last_seq`` (``None``: the open one), and its archive once made
    (``ledger.partitions``, ``ledger.audit.archive``)."""

    __tablename__ = "ledger_partitions"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    first_seq: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: The ``time`` of its first record.
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: SHA-256 of the archive's manifest, and where it was written.
    archive_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    archive_location: Mapped[str | None] = mapped_column(String(1000), nullable=True)


class LedgerKeyRow(Base):
    """Public halves of the keys that sign checkpoints (for exports and
    provers); ``pdg audit verify`` trusts the key files it is given, not this
    table."""

    __tablename__ = "ledger_keys"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TreeNodeRow(Base):
    """A complete subtree of the whole-log Merkle tree (``ledger.tree``) of
    ``2**level`` leaves, ``level >= ledger.tree.TILE_LEVEL``; never updated."""

    __tablename__ = "ledger_tree"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))


class LogCheckpointRow(Base):
    """A signed C2SP checkpoint of the whole-log tree at ``size`` records
    (``ledger.note``), as published at ``/audit/v1/checkpoint``; never updated."""

    __tablename__ = "log_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AdminLogRow(Base):
    """One entry of the admin audit log (``ledger.admin_log``); never updated."""

    __tablename__ = "admin_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    #: Canonical JSON of the entry (what is hashed, and all that is shown).
    body: Mapped[str] = mapped_column(Text)
    hash: Mapped[str] = mapped_column(String(64))
