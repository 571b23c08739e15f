"""Migrations on SQLite and on PostgreSQL: they build exactly the schema the
models describe, go down and up again, and replicas migrating at once do not
trip over each other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

import licensing.models  # noqa: F401  (registers the tables)
from ledger.partitions import in_models
from licensing.models import CatalogueVersionRow
from storage import migrate
from storage.db import Base, create_engine
from tests.conftest import PG_URL, fresh_postgres_database

TABLES = {"datasets", "licensees", "licences", "apps", "admin_tokens", "signing_keys", "catalogue_version"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'm.sqlite3'}"
        return
    if not PG_URL:
        pytest.skip("PDG_TEST_DATABASE_URL is not set (CI sets it)")
    async with fresh_postgres_database() as url:
        yield url


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": in_models})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_builds_the_models_schema(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) >= TABLES
            assert await conn.run_sync(_diff) == []
            version = (await conn.execute(select(CatalogueVersionRow.version))).scalar_one()
        assert version == 0
        # Upgrading an up-to-date schema is a no-op.
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate.upgrade(engine)
        await migrate.downgrade(engine, "base")
        async with engine.connect() as conn:
            assert not (TABLES & await conn.run_sync(_tables))
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_replicas_migrating_at_once(database_url: str) -> None:
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate.upgrade(e) for e in engines))
        for engine in engines:
            assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_ledger_with_records_becomes_partitioned_and_back(database_url: str) -> None:
    """The records written before partitions stay where they were (on
    PostgreSQL: the open partition), append-only, and come back whole on the
    way down."""
    engine = create_engine(database_url)
    postgres = engine.dialect.name == "postgresql"
    columns = (
        "seq, call_id, request_id, time, started_at, app_id, licensee_id, licence_id, dataset_id, purpose, "
        "method, path, status, outcome, records, bytes, latency_us, period, charge_e4, client_address, "
        "token_id, hash"
    )
    values = (
        "{n}, 'call-{n}', 'r', '2026-11-01 00:00:00', '2026-11-01 00:00:00', 'a', 'l', 'c', 'd', "
        "'industrial', 'GET', 'p', 200, 'served', 1, 1, 1, '2026-11', 0, '127.0.0.1', 't', 'h'"
    )
    try:
        await migrate.upgrade(engine, "0008")
        async with engine.begin() as conn:
            for n in (1, 2, 3):
                await conn.execute(text(f"INSERT INTO calls ({columns}) VALUES ({values.format(n=n)})"))
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            seqs = (await conn.execute(text("SELECT seq FROM calls ORDER BY seq"))).scalars().all()
            assert seqs == [1, 2, 3]
            if postgres:
                kinds = (
                    await conn.execute(text("SELECT DISTINCT tableoid::regclass::text FROM calls"))
                ).all()
                assert kinds == [("calls_open",)]
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE calls SET status = 500 WHERE seq = 2"))
        with pytest.raises(DBAPIError):  # a call id once
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        f"INSERT INTO calls ({columns}) VALUES ({values.format(n=4)})".replace(
                            "'call-4'", "'call-1'"
                        )
                    )
                )
        await migrate.downgrade(engine, "0008")
        async with engine.connect() as conn:
            seqs = (await conn.execute(text("SELECT seq FROM calls ORDER BY seq"))).scalars().all()
            assert seqs == [1, 2, 3]
    finally:
        await engine.dispose()


async def test_issued_invoices_keep_their_rows_and_stay_append_only_through_0017(database_url: str) -> None:
    """0017 rebuilds ``invoices`` on SQLite (its period no longer names a
    close, nor is unique per licensee): an issued invoice, its line and its
    payment keep their rows, the invoice becomes kind ``period``, and the
    table refuses UPDATE and DELETE as before, on the way up and down."""
    engine = create_engine(database_url)
    invoice = (
        "INSERT INTO invoices (id, licensee_id, period, status, calls, subtotal_fen, vat_rate, vat_fen, "
        "total_fen, closed_at, content_hash, content) VALUES ('inv-2026-10-l', 'l', '2026-10', 'issued', "
        "1, 100, '0.06', 6, 106, '2026-11-01 00:00:00', 'h', '{}')"
    )
    try:
        await migrate.upgrade(engine, "0016")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO billing_closes (period, after_seq, through_seq, first_seq, vat_rate, "
                    "invoices, closed_at) VALUES ('2026-10', 0, 1, 1, '0.06', 1, '2026-11-01 00:00:00')"
                )
            )
            await conn.execute(text(invoice))
            await conn.execute(
                text(
                    "INSERT INTO payments (id, invoice_id, payment_no, amount_fen, paid_on, received_at, "
                    "reference, recorded_by) VALUES ('p1', 'inv-2026-10-l', 1, 50, '2026-11-02', "
                    "'2026-11-02 00:00:00', '', 'cli')"
                )
            )
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, kind, total_fen FROM invoices"))).all()
            assert [tuple(r) for r in rows] == [("inv-2026-10-l", "period", 106)]
            paid = await conn.scalar(
                text("SELECT amount_fen FROM payments WHERE invoice_id = 'inv-2026-10-l'")
            )
            assert paid == 50
        for statement in ("UPDATE invoices SET total_fen = 1", "DELETE FROM invoices"):
            with pytest.raises(DBAPIError):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        await migrate.downgrade(engine, "0016")
        async with engine.connect() as conn:
            ids = (await conn.execute(text("SELECT id FROM invoices ORDER BY id"))).scalars().all()
            assert ids == ["inv-2026-10-l"]
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text("DELETE FROM invoices WHERE id = 'inv-2026-10-l'"))
        await migrate.upgrade(engine)
        async with engine.begin() as conn:  # a second invoice of the licensee, in an open month: a top-up
            await conn.execute(
                text(
                    invoice.replace("'inv-2026-10-l'", "'inv-tu-1'")
                    .replace("'2026-10'", "'2026-12'")
                    .replace("(id,", "(kind, id,")
                    .replace("VALUES (", "VALUES ('top-up', ")
                )
            )
        with pytest.raises(RuntimeError, match="top-up invoice"):
            await migrate.downgrade(engine, "0016")
    finally:
        await engine.dispose()
