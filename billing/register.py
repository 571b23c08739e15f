"""The billing register: every issued invoice and note, numbered, in one
hash chain, each entry signed with the ledger's checkpoint key.

**Numbers.** A document gets its number when it is issued, in the
transaction that issues it: the next in its series (one more than the
series' last entry), formatted by ``billing.invoice_number_format``,
``credit_note_number_format`` or ``debit_note_number_format``. A series is a
kind and, when the format names ``{year}``, the year of issue in the billing
time zone. Appends serialise (below) and a failed issue rolls its numbers
back with it, so each series is gap-free and a number is never given twice
(unique in the table besides).

**The chain.** An entry's body is canonical JSON (sorted keys, compact) of
``seq``, ``kind``, ``document_id``, ``number``, ``series``, ``series_no``,
``issued_at`` and the document's ``content_hash``; its hash is
``SHA-256(0x04 || previous hash || body)`` (``0x04`` keeps it apart from the
call record's and the admin log's), the first entry's previous hash 32 zero
bytes. The hash is signed with the ledger key (ECDSA P-256, DER; or SM2),
named by ``key_id``. Rows are append-only (database triggers).

**What it proves.** :func:`verify` re-derives every entry, checks each
signature against the trusted ledger keys, each series for gaps, and each
document's stored bytes against the ``content_hash`` its entry signed. A
document rewritten together with its hash and its rows (what the content
hash alone cannot catch) no longer matches its signed entry: ``invoice-altered``
or ``note-altered``, at its number.

Appends serialise: on PostgreSQL on a transaction-scoped advisory lock, on
SQLite on the write lock the issue already holds.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast
from zoneinfo import ZoneInfo

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.models import BillingNoteRow, InvoiceRow, RegisterRow
from config.settings import Settings
from core import sm2
from ledger.chain import rfc3339
from licensing.keys import load_or_create_signing_key

GENESIS: Final = bytes(32)
_PREFIX: Final = b"\x04"
#: The PostgreSQL advisory lock appends take (any fixed number of ours).
_LOCK: Final = 0x706467_726567

INVOICE: Final = "invoice"
CREDIT_NOTE: Final = "credit-note"
DEBIT_NOTE: Final = "debit-note"
KINDS: Final = (INVOICE, CREDIT_NOTE, DEBIT_NOTE)

_REGISTER = cast(Table, RegisterRow.__table__)
_INVOICES = cast(Table, InvoiceRow.__table__)
_NOTES = cast(Table, BillingNoteRow.__table__)


def number_format(settings: Settings, kind: str) -> str:
    billing = settings.billing
    return {
        INVOICE: billing.invoice_number_format,
        CREDIT_NOTE: billing.credit_note_number_format,
        DEBIT_NOTE: billing.debit_note_number_format,
    }[kind]


def series_of(kind: str, fmt: str, year: int) -> str:
    return f"{kind}:{year}" if "{year" in fmt else kind


def _canonical(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def entry_hash(previous: bytes, body: bytes) -> bytes:
    return hashlib.sha256(_PREFIX + previous + body).digest()


def _sign(private_key: Any, digest: bytes) -> bytes:
    if sm2.is_private_key(private_key):
        return sm2.sign(private_key, digest)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the ledger key is EC P-256 or SM2")
    return private_key.sign(digest, ec.ECDSA(hashes.SHA256()))


def _verifies(public_key: Any, signature: bytes, digest: bytes) -> bool:
    if sm2.is_public_key(public_key):
        return sm2.verify(public_key, signature, digest)
    try:
        public_key.verify(signature, digest, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Signer:
    """The ledger key and its id, as the register signs with them."""

    private_key: Any
    key_id: str


@dataclass(frozen=True, slots=True)
class Issuer:
    """Who issues billing documents, and how: the settings (the seller, the
    number formats, the due date, the time zone) and the ledger key."""

    settings: Settings
    signer: Signer

    @classmethod
    def from_settings(cls, settings: Settings) -> Issuer:
        """The deployment's: its settings and its ledger checkpoint key (the
        writer's; made here if the data folder has none yet)."""
        sm2.start(required=settings.ledger.signing_algorithm == sm2.ALG)
        key = load_or_create_signing_key(settings.ledger_key_path, settings.ledger.signing_algorithm)
        return cls(settings, Signer(key.private_key, key.kid))


@dataclass(frozen=True, slots=True)
class Numbered:
    """The number a document is about to be registered with."""

    kind: str
    series: str
    series_no: int
    number: str


async def next_number(conn: AsyncConnection, settings: Settings, kind: str, issued_at: datetime) -> Numbered:
    """The next number of ``kind``'s series for a document issued at
    ``issued_at``, in ``conn``'s transaction (whose appends this serialises):
    :func:`register` the document with it before asking for another."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    fmt = number_format(settings, kind)
    year = issued_at.astimezone(ZoneInfo(settings.billing.time_zone)).year
    series = series_of(kind, fmt, year)
    last_no = await conn.scalar(select(func.max(_REGISTER.c.series_no)).where(_REGISTER.c.series == series))
    series_no = int(last_no or 0) + 1
    return Numbered(kind, series, series_no, fmt.format(year=year, n=series_no))


async def register(
    conn: AsyncConnection,
    signer: Signer,
    numbered: Numbered,
    *,
    document_id: str,
    issued_at: datetime,
    content_hash: str,
) -> int:
    """Append the entry of a document numbered by :func:`next_number` (in
    the same transaction); its ``seq``."""
    last = (
        await conn.execute(
            select(_REGISTER.c.seq, _REGISTER.c.hash).order_by(_REGISTER.c.seq.desc()).limit(1)
        )
    ).first()
    seq = int(last.seq) + 1 if last is not None else 1
    previous = bytes.fromhex(last.hash) if last is not None else GENESIS
    body = _canonical(
        {
            "seq": seq,
            "kind": numbered.kind,
            "document_id": document_id,
            "number": numbered.number,
            "series": numbered.series,
            "series_no": numbered.series_no,
            "issued_at": rfc3339(issued_at),
            "content_hash": content_hash,
        }
    )
    digest = entry_hash(previous, body)
    await conn.execute(
        insert(_REGISTER).values(
            seq=seq,
            kind=numbered.kind,
            document_id=document_id,
            series=numbered.series,
            series_no=numbered.series_no,
            number=numbered.number,
            body=body.decode(),
            hash=digest.hex(),
            key_id=signer.key_id,
            signature=_sign(signer.private_key, digest).hex(),
        )
    )
    return seq


@dataclass
class RegisterReport:
    """What :func:`verify` found: documents checked, and each problem."""

    entries: int = 0
    #: ``{"cause", "number", "document_id", "detail"}``, in register order.
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, cause: str, entry: dict[str, Any] | None, detail: str) -> None:
        entry = entry or {}
        self.problems.append(
            {
                "cause": cause,
                "seq": entry.get("seq"),
                "number": entry.get("number"),
                "document_id": entry.get("document_id"),
                "detail": detail,
            }
        )


ALTERED: Final = {INVOICE: "invoice-altered", CREDIT_NOTE: "note-altered", DEBIT_NOTE: "note-altered"}
REGISTER_ALTERED: Final = "register-altered"


async def verify(engine: AsyncEngine, keys: Mapping[str, Any]) -> RegisterReport:
    """Re-derive the register, check its signatures under ``keys`` (the
    trusted ledger keys, by id), its series for gaps, and every registered
    document against the hash its entry signed (see the module docstring)."""
    report = RegisterReport()
    async with engine.connect() as conn:
        rows = (await conn.execute(select(_REGISTER).order_by(_REGISTER.c.seq))).all()
        invoices = {
            r.id: r
            for r in (
                await conn.execute(
                    select(_INVOICES.c.id, _INVOICES.c.content, _INVOICES.c.content_hash, _INVOICES.c.number)
                )
            ).all()
        }
        notes = {
            r.id: r
            for r in (
                await conn.execute(
                    select(
                        _NOTES.c.id, _NOTES.c.kind, _NOTES.c.content, _NOTES.c.content_hash, _NOTES.c.number
                    )
                )
            ).all()
        }
    previous = GENESIS
    last_in_series: dict[str, int] = {}
    registered: set[tuple[str, str]] = set()
    for expected_seq, row in enumerate(rows, 1):
        report.entries += 1
        try:
            entry = orjson.loads(row.body)
        except orjson.JSONDecodeError:
            report.add(REGISTER_ALTERED, {"seq": row.seq}, "its body is not JSON")
            previous = bytes.fromhex(row.hash)
            continue
        digest = entry_hash(previous, row.body.encode())
        fields = (row.seq, row.kind, row.document_id, row.number, row.series, row.series_no)
        stated = tuple(entry.get(k) for k in ("seq", "kind", "document_id", "number", "series", "series_no"))
        if row.seq != expected_seq or fields != stated:
            report.add(
                REGISTER_ALTERED, entry, "its columns differ from its hashed body, or it is out of order"
            )
        if not hmac.compare_digest(digest.hex(), row.hash):
            report.add(REGISTER_ALTERED, entry, "its hash does not chain from the entry before")
        key = keys.get(row.key_id)
        if key is None:
            report.add(REGISTER_ALTERED, entry, f"signed by key {row.key_id}, which is not trusted")
        elif not _verifies(key, bytes.fromhex(row.signature), bytes.fromhex(row.hash)):
            report.add(REGISTER_ALTERED, entry, "its signature does not verify")
        if row.series_no != last_in_series.get(row.series, 0) + 1:
            report.add(REGISTER_ALTERED, entry, f"series {row.series} skips or repeats a number")
        last_in_series[row.series] = row.series_no
        registered.add((row.kind, row.document_id))
        _check_document(report, entry, invoices if row.kind == INVOICE else notes)
        previous = bytes.fromhex(row.hash)
    for row in invoices.values():
        if row.number is not None and (INVOICE, row.id) not in registered:
            report.add(
                "invoice-altered", {"number": row.number, "document_id": row.id}, "not in the register"
            )
    for row in notes.values():
        kind = CREDIT_NOTE if row.kind == "credit" else DEBIT_NOTE
        if row.number is not None and (kind, row.id) not in registered:
            report.add(ALTERED[kind], {"number": row.number, "document_id": row.id}, "not in the register")
    return report


def _check_document(report: RegisterReport, entry: dict[str, Any], documents: dict[str, Any]) -> None:
    cause = ALTERED.get(str(entry.get("kind")), REGISTER_ALTERED)
    row = documents.get(str(entry.get("document_id")))
    if row is None:
        report.add(cause, entry, "the registered document is missing")
        return
    actual = hashlib.sha256(row.content.encode()).hexdigest()
    signed = str(entry.get("content_hash"))
    if not (hmac.compare_digest(actual, signed) and hmac.compare_digest(row.content_hash, signed)):
        report.add(cause, entry, "its content is not what was issued (the register signed another hash)")
    elif orjson.loads(row.content).get("number") != entry.get("number") or row.number != entry.get("number"):
        report.add(cause, entry, "its number differs from the register's")
