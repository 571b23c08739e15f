"""A ledger for years (issue 16, finding 9): on PostgreSQL the call record is
partitioned by period, a closed partition is archived as a verifiable export
and detached, and verification starts from a trusted checkpoint instead of
seq 1. Real PostgreSQL, the real writer's store, ``pdg`` as auditors run it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from billing.invoices import close_period
from ledger.models import CallRow
from ledger.record import FIELDS
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_billing import AFTER_NOV, NOV, VAT, Books, books, november  # noqa: F401  (the fixture)

pytestmark = pytest.mark.parametrize("backend", ["servers"], indirect=True)

JAN = datetime(2027, 1, 10, 4, 0, tzinfo=UTC)


async def partitions(ledger: Books) -> list[tuple[str, int, int | None, bool]]:
    async with ledger.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT period, first_seq, last_seq, archived_at FROM ledger_partitions ORDER BY first_seq")
        )
        return [(r.period, r.first_seq, r.last_seq, r.archived_at is not None) for r in rows]


async def attached(ledger: Books) -> dict[str, str]:
    """The partitions of ``calls`` and their bounds, as PostgreSQL has them."""
    async with ledger.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'calls'::regclass"
            )
        )
        return {r.relname: r.bound for r in rows}


async def checkpoint_ends(ledger: Books) -> list[int]:
    async with ledger.engine.connect() as conn:
        return list(
            (await conn.execute(text("SELECT last_seq FROM ledger_checkpoints ORDER BY 1"))).scalars()
        )


async def test_the_first_record_of_a_new_period_closes_the_partition_at_a_checkpoint(books: Books) -> None:
    # November's 12 records, then December's first, then a November call
    # that ended just before midnight but was written after it.
    await november(books)
    assert await partitions(books) == [("2026-11", 1, 12, False), ("2026-12", 13, None, False)]
    assert await attached(books) == {
        "calls_p2026_11": "FOR VALUES FROM ('1') TO ('13')",
        "calls_open": "DEFAULT",
    }
    assert 12 in await checkpoint_ends(books), "the closed partition does not end at a checkpoint"
    async with books.engine.connect() as conn:
        where = await conn.execute(
            text("SELECT seq, tableoid::regclass::text AS part FROM calls ORDER BY seq")
        )
        placed = {r.seq: r.part for r in where}
    assert {s for s, p in placed.items() if p == "calls_p2026_11"} == set(range(1, 13))
    assert {s for s, p in placed.items() if p == "calls_open"} == {13, 14}
    # Both partitions are append-only.
    for seq in (3, 13):
        with pytest.raises(DBAPIError, match="append-only"):
            async with books.engine.begin() as conn:
                await conn.execute(text("UPDATE calls SET status = 1 WHERE seq = :s"), {"s": seq})
    # A repeat of a call written in the closed partition lands nowhere.
    async with books.engine.connect() as conn:
        first = (await conn.execute(select(CallRow).where(CallRow.seq == 1))).mappings().one()
    repeat = {k: v for k, v in first.items() if k in FIELDS and k != "seq"}
    appended = await books.store.append([repeat], "99-0")
    assert appended.skipped == 1, appended
    # Two periods at once: each gets its partition.
    await books.calls(("lic-a", "ds-weather", "industrial", "served", 1, 1, JAN))
    assert [p[:3] for p in await partitions(books)] == [
        ("2026-11", 1, 12),
        ("2026-12", 13, 14),
        ("2027-01", 15, None),
    ]


async def test_archive_exports_verifies_and_detaches_then_verify_starts_after_it(
    books: Books,
    pdg: PdgRunner,
    tmp_path: Path,
) -> None:
    await november(books)
    config = str(books.config(tmp_path))
    out = tmp_path / "archive-2026-11"
    # Not before billing has closed through the partition's last record.
    refused = await pdg("audit", "archive", "2026-11", "--out", str(out), "--config", config)
    refused.one_line_error("billing has not closed")
    # The open partition cannot be archived, nor one that does not exist.
    (await pdg("audit", "archive", "2026-12", "--out", str(out), "--config", config)).one_line_error("open")
    (await pdg("audit", "archive", "2026-10", "--out", str(out), "--config", config)).one_line_error(
        "no partition"
    )
    await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
    run = await pdg("audit", "archive", "2026-11", "--out", str(out), "--config", config, "--json")
    assert run.code == 0, run
    done = run.json()
    assert (done["first_seq"], done["last_seq"], done["records"]) == (1, 12, 12)
    assert await attached(books) == {"calls_open": "DEFAULT"}
    assert [p[3] for p in await partitions(books)] == [True, False]
    # The export verifies offline, with the deployment's key.
    offline = await pdg(
        "audit", "verify", "--export", str(out / "manifest.json"), "--config", config, "--json"
    )
    assert offline.code == 0, offline
    assert (offline.json()["first_seq"], offline.json()["last_seq"]) == (1, 12)
    # The database verifies from the checkpoint that ends the archive.
    online = await pdg("audit", "verify", "--config", config, "--json")
    assert online.code == 0, online
    assert (online.json()["first_seq"], online.json()["last_seq"], online.json()["records"]) == (13, 14, 2)
    (
        await pdg("audit", "archive", "2026-11", "--out", str(tmp_path / "again"), "--config", config)
    ).one_line_error("was archived")
    (await pdg("audit", "verify", "--since", "5", "--config", config)).one_line_error("archived")


async def test_verify_since_a_checkpoint_trusts_it_and_checks_the_rest(
    books: Books,
    pdg: PdgRunner,
    tmp_path: Path,
) -> None:
    await november(books)
    await books.calls(
        *(("lic-a", "ds-weather", "industrial", "served", 1, 1, JAN + timedelta(seconds=i)) for i in range(3))
    )
    config = str(books.config(tmp_path))
    assert (await pdg("audit", "verify", "--since", "12", "--config", config)).code == 0
    (await pdg("audit", "verify", "--since", "7", "--config", config)).one_line_error(
        "no checkpoint ends at seq 7"
    )
    # An edit before the checkpoint is outside what --since checks; after it, found.
    async with books.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE calls DISABLE TRIGGER calls_append_only"))
        await conn.execute(text("ALTER TABLE calls_p2026_11 DISABLE TRIGGER calls_append_only"))
        await conn.execute(text("UPDATE calls SET records = records + 1 WHERE seq = 2"))
    whole = await pdg("audit", "verify", "--config", config, "--json")
    assert (whole.code, whole.json()["problem"]["seq"]) == (1, 2)
    assert (await pdg("audit", "verify", "--since", "12", "--config", config)).code == 0
    async with books.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE calls_open DISABLE TRIGGER calls_append_only"))
        await conn.execute(text("UPDATE calls SET records = records + 1 WHERE seq = 15"))
    since = await pdg("audit", "verify", "--since", "12", "--config", config, "--json")
    assert (since.code, since.json()["problem"]["seq"]) == (1, 15), since
    assert json.loads(since.out)["first_seq"] == 13
