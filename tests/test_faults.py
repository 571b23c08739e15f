"""Faults the quota store and the clients inflict (DESIGN §4, §5, §7), with
real processes: ``pdg serve`` on a private Valkey and PostgreSQL
(``tests.servers``), a real upstream, concurrent callers.

After each fault the same invariant is checked (``tests.test_ledger_faults``):
every response a client received has its record with the status it saw, no
reservation is left in flight, the counters equal the served records, and
the chain verifies.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import Upstream
from tests.servers import PrivateValkey
from tests.test_ledger_faults import (
    Load,
    check_ledger,
    check_quota,
    clean_logs,
    deployment,
    settled,
    summary,
    verify_chain,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

#: Longer than the quota store's command timeout (2 s), shorter than the
#: replica timeout (5 s): the replica stays alive and keeps serving after.
FREEZE_SECONDS = 3.5


async def test_quota_store_frozen_past_the_command_timeout_leaks_no_reservation(
    tmp_path: Path, valkey: PrivateValkey, database_url: str, upstream: Upstream
) -> None:
    """Issue 16, fault 1: calls answered 503 while Redis was frozen (SIGSTOP)
    were reserved anyway when it resumed, and stayed in flight for good: the
    counters drifted from the served calls until the replica restarted."""
    assert valkey.proc is not None
    async with deployment(tmp_path, database_url, valkey.url(), upstream) as deploy:
        gateway = deploy.gateway()
        await deploy.provision()
        client = aioredis.Redis.from_url(deploy.redis_url)
        engine = create_async_engine(deploy.database_url)
        try:
            load = Load(deploy, concurrency=24, slow_every=6)
            load.start()
            await asyncio.sleep(1.5)
            os.kill(valkey.proc.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                await asyncio.sleep(FREEZE_SECONDS)
            finally:
                os.kill(valkey.proc.pid, signal.SIGCONT)
            thawed_at = time.monotonic()
            # Served again once the replica is heard from (a heartbeat).
            end = time.monotonic() + 15
            while not any(r.status == 200 and r.at > thawed_at + 0.5 for r in load.received):
                assert time.monotonic() < end, collections.Counter(
                    (r.status, r.problem) for r in load.received if r.at > thawed_at
                )
                await asyncio.sleep(0.1)
            await load.stop()
            assert gateway.alive(), gateway.tail()
            refused = [r for r in load.received if frozen_at < r.at and r.status == 503]
            assert refused, "no call was refused while the quota store was frozen"
            # The gateway still serves: nothing is left for a restart to end.
            # A refusal for want of the quota store whose record could not
            # be written either (the log lives there too) is answered all
            # the same: 503 quota-unavailable, in the metrics only.
            unrecorded = ("ledger-unavailable", "quota-unavailable")
            rows = await settled(engine, client, deploy.licence_id, load, 30, unrecorded)
            summary("quota store frozen", load, rows)
            check_ledger(rows, load, unrecorded)
            await check_quota(client, deploy.licence_id, rows)
            await verify_chain(engine, deploy.env())
            assert gateway.stop() == 0
        finally:
            await client.aclose()
            await engine.dispose()
        clean_logs(deploy)
