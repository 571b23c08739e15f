"""Archiving a closed partition of the call record (PostgreSQL).

``pdg audit archive PERIOD --out DIR``:

1. refuses unless partition ``PERIOD`` is closed and not archived, every
   earlier partition is archived, and billing has closed through its last
   record (``billing_closes.through_seq``): nothing billed later reads it;
2. exports its records with their manifest (:func:`ledger.audit.export`):
   the partition starts and ends at a checkpoint, so the manifest holds the
   checkpoint that vouches for its start and every one inside it;
3. verifies the export offline with the trusted keys, as an auditor would
   (:func:`ledger.audit.verify_export`), and stops if it does not verify;
4. detaches the partition's table and records the archive (the manifest's
   SHA-256, where it was written) in ``ledger_partitions``, in one
   transaction.

The detached table stays in the database until the operator drops it, once
the archive is stored where it must be kept. Verification of the database
then starts at the first record after the archived ones, from the signed
checkpoint that ends the archive (:func:`ledger.audit.verify`).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.audit.common import AuditError, PublicKeys
from ledger.audit.export import MANIFEST, export, verify_export
from ledger.partitions import PARTITIONS, table_of


async def archive(engine: AsyncEngine, period: str, out_dir: Path, public_keys: PublicKeys) -> dict[str, Any]:
    if engine.dialect.name != "postgresql":
        raise AuditError("archiving needs PostgreSQL: an SQLite ledger is not partitioned")
    try:
        table = table_of(period)
    except ValueError as exc:
        raise AuditError(f"{exc} (YYYY-MM)") from None
    async with engine.connect() as conn:
        p = PARTITIONS.c
        rows = (
            await conn.execute(select(p.period, p.first_seq, p.last_seq, p.archived_at).order_by(p.first_seq))
        ).all()
        billed = await conn.scalar(text("SELECT max(through_seq) FROM billing_closes"))
    part = next((r for r in rows if r.period == period), None)
    if part is None:
        known = ", ".join(r.period for r in rows) or "none yet"
        raise AuditError(f"no partition {period} (partitions: {known})")
    if part.archived_at is not None:
        raise AuditError(f"partition {period} was archived at {part.archived_at.isoformat()}")
    if part.last_seq is None:
        raise AuditError(f"partition {period} is open: it closes at the first record of a later period")
    earlier = [r.period for r in rows if r.first_seq < part.first_seq and r.archived_at is None]
    if earlier:
        raise AuditError(f"archive partitions in order: {earlier[0]} first")
    if billed is None or billed < part.last_seq:
        raise AuditError(
            f"billing has not closed through seq {part.last_seq}, the last record of {period}: "
            "close its periods first ('pdg billing close')"
        )
    manifest = await export(
        engine, out_dir, from_seq=part.first_seq, to_seq=part.last_seq, public_keys=public_keys
    )
    if (manifest["first_seq"], manifest["last_seq"]) != (part.first_seq, part.last_seq):
        raise AuditError(
            f"the export covers seq {manifest['first_seq']}..{manifest['last_seq']}, not the partition's "
            f"{part.first_seq}..{part.last_seq}: run 'pdg audit verify'"
        )
    report = await asyncio.to_thread(verify_export, out_dir / MANIFEST, public_keys)
    if not report.ok:
        problem = report.problem
        raise AuditError(
            f"the export of {period} does not verify ({problem.reason if problem else 'unknown'}); "
            "nothing was detached"
        )
    manifest_bytes = await asyncio.to_thread((out_dir / MANIFEST).read_bytes)
    location = str(await asyncio.to_thread(out_dir.resolve))[:1000]
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE calls DETACH PARTITION {table}"))
        await conn.execute(
            update(PARTITIONS)
            .where(PARTITIONS.c.period == period, PARTITIONS.c.archived_at.is_(None))
            .values(archived_at=now, archive_sha256=digest, archive_location=location)
        )
    return {
        "period": period,
        "first_seq": part.first_seq,
        "last_seq": part.last_seq,
        "records": manifest["records"],
        "checkpoints": len(manifest["checkpoints"]),
        "manifest": str(out_dir / MANIFEST),
        "manifest_sha256": digest,
        "detached_table": table,
        "archived_at": now.isoformat().replace("+00:00", "Z"),
    }
