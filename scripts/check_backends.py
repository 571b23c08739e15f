"""Exit 0 when the PostgreSQL and Redis named by PDG_TEST_DATABASE_URL and
PDG_TEST_REDIS_URL answer; else print which does not and exit 1."""

from __future__ import annotations

import asyncio
import os
import sys

import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


async def main() -> int:
    failed = []
    engine = create_async_engine(os.environ["PDG_TEST_DATABASE_URL"])
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        failed.append(f"PostgreSQL: {exc}")
    finally:
        await engine.dispose()
    client = aioredis.Redis.from_url(os.environ["PDG_TEST_REDIS_URL"])
    try:
        async with asyncio.timeout(5):
            await client.ping()
    except Exception as exc:  # noqa: BLE001
        failed.append(f"Redis: {exc}")
    finally:
        await client.aclose()
    for line in failed:
        sys.stderr.write(f"unreachable: {line}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
