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
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection

import licensing.models  # noqa: F401  (registers the tables)
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
    context = MigrationContext.configure(connection, opts={"compare_type": True})
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
