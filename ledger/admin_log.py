"""The admin audit log: every change an administrator makes (a dataset, its
price or split; a licence issued, changed, suspended, resumed, revoked; an
app created, disabled, enabled, its secret rotated; a period closed; a note
issued; a signing key rotated; an admin token made or revoked) — who, when,
what, before and after — in a hash chain that ``pdg audit verify`` checks.

An entry is written in the same transaction as the change it describes, so
there is no change without its entry and no entry without its change. Its
body is canonical JSON (sorted keys, compact) of ``seq``, ``at`` (RFC 3339),
``actor``, ``action``, ``target``, ``before`` and ``after``; its hash is
``SHA-256(0x03 || previous hash || body)`` (``0x03`` keeps it apart from the
call record's leaves, nodes and links), the first entry's previous hash 32
zero bytes. Rows are append-only (database triggers), and every field shown
is read from the hashed body, so an edit, a deletion inside the log or a
reordering is found at its ``seq``. Secrets never enter it: any member named
like one (``client_secret``, ``secret_hash``, ``token``, ``private_pem`` …)
is dropped from ``before`` and ``after``.

Appends serialise: on PostgreSQL on a transaction-scoped advisory lock, on
SQLite on the write lock the change itself already holds.

``actor`` is whoever the request or command runs as (``core.actor``):
``admin-token:<id> (<role>)`` for the admin API, ``cli:<user>@<host>`` for
``pdg`` commands, ``system`` otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

import orjson
from pydantic import BaseModel, Field
from sqlalchemy import Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.actor import ACTOR, acting_as
from ledger.models import AdminLogRow

GENESIS: Final = bytes(32)
_PREFIX: Final = b"\x03"
#: The PostgreSQL advisory lock appends take (any fixed number of ours).
_LOCK: Final = 0x706467_61646D
_SECRETS: Final = frozenset(
    {"client_secret", "secret", "secret_hash", "previous_secret_hash", "token", "private_pem", "password"}
)

_LOG = cast(Table, AdminLogRow.__table__)


def scrub(value: Any) -> Any:
    """``value`` without any member named like a secret, at any depth."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in _SECRETS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def _canonical(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def entry_hash(previous: bytes, body: bytes) -> bytes:
    return hashlib.sha256(_PREFIX + previous + body).digest()


async def record(
    conn: AsyncConnection, action: str, target: str, *, before: Any = None, after: Any = None
) -> int:
    """Append one entry in ``conn``'s transaction (after the change it
    describes was written there); its ``seq``."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    last = (await conn.execute(select(_LOG.c.seq, _LOG.c.hash).order_by(_LOG.c.seq.desc()).limit(1))).first()
    seq = int(last.seq) + 1 if last is not None else 1
    previous = bytes.fromhex(last.hash) if last is not None else GENESIS
    entry = {
        "seq": seq,
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "actor": ACTOR.get(),
        "action": action,
        "target": target,
        "before": scrub(orjson.loads(orjson.dumps(before, default=str))),
        "after": scrub(orjson.loads(orjson.dumps(after, default=str))),
    }
    body = _canonical(entry)
    await conn.execute(
        insert(_LOG).values(seq=seq, body=body.decode(), hash=entry_hash(previous, body).hex())
    )
    return seq


class AdminLogEntry(BaseModel):
    """One admin-log entry, as the admin API and ``pdg audit admin-log`` show it."""

    seq: int
    at: str = Field(description="RFC 3339, UTC")
    actor: str = Field(description="admin-token:<id> (<role>), cli:<user>@<host> or system")
    action: str = Field(description="e.g. dataset.update, licence.suspend, app.rotate-secret, billing.close")
    target: str
    before: Any = Field(description="the resource before the change (secrets left out); null for a creation")
    after: Any = Field(description="the resource after it (secrets left out)")
    hash: str = Field(description="SHA-256(0x03 || previous hash || canonical body), hex")


@dataclass(frozen=True, slots=True)
class AdminLogReport:
    entries: int
    #: The first entry that does not verify, and why (``None``: all do).
    problem_seq: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem_seq is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "problem_seq": self.problem_seq,
            "reason": self.reason,
        }


async def verify(engine: AsyncEngine) -> AdminLogReport:
    """Re-derive every entry's hash, in order."""
    previous, expected, count = GENESIS, 1, 0
    async with engine.connect() as conn:
        result = await conn.stream(select(_LOG).order_by(_LOG.c.seq))
        async for row in result:
            seq = int(row.seq)
            if seq != expected:
                return AdminLogReport(count, expected, f"entry {expected} is missing")
            body = str(row.body).encode()
            try:
                entry = orjson.loads(body)
            except orjson.JSONDecodeError:
                return AdminLogReport(count, seq, "the entry is not JSON")
            if not isinstance(entry, dict) or entry.get("seq") != seq or _canonical(entry) != body:
                return AdminLogReport(count, seq, "the entry's body was altered")
            digest = entry_hash(previous, body)
            if not hmac.compare_digest(digest.hex(), str(row.hash)):
                return AdminLogReport(
                    count, seq, "the entry's hash does not match its body and the one before"
                )
            previous, expected, count = digest, expected + 1, count + 1
    return AdminLogReport(count)


async def read(engine: AsyncEngine, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Entries after ``seq`` ``after``, oldest first, with their hashes."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(_LOG).where(_LOG.c.seq > after).order_by(_LOG.c.seq).limit(limit))
        return [{**orjson.loads(str(row.body)), "hash": str(row.hash)} for row in rows]


__all__ = ["ACTOR", "AdminLogEntry", "AdminLogReport", "acting_as", "read", "record", "scrub", "verify"]
