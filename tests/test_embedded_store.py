"""The embedded Valkey of the default deployment, attacked from another local
process: without the password it answers nothing but ``PING`` (no counter
reset, no edit of records waiting in the log, no reconfiguration); it fsyncs
before it replies; its folder and secret are the owner's alone."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from storage.redis import EmbeddedValkey, running_embedded_url


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw(port: int, *commands: bytes) -> list[bytes]:
    """Each command (inline form) on one fresh connection, as a local process
    that never signed in would send it; the first line of each reply."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        for command in commands:
            sock.sendall(command + b"\r\n")
            replies.append(reader.readline().rstrip(b"\r\n"))
    return replies


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[str]:
    """The URL of an embedded server started on a fresh data folder."""
    store = EmbeddedValkey(tmp_path / "data")
    url = store.start_blocking()
    try:
        yield url
    finally:
        store.stop_blocking()


def test_without_the_password_only_ping_is_answered(embedded: str) -> None:
    url = embedded
    client = redis.Redis.from_url(url)
    client.set("pdg:{lic-1}:free:ds:2026-11", 958)
    client.xadd("pdg:log", {"r": b"record"})
    port = client.connection_pool.connection_kwargs["port"]

    attacks = [
        b"SET pdg:{lic-1}:free:ds:2026-11 0",  # a quota counter reset
        b"GET pdg:{lic-1}:free:ds:2026-11",
        b"XTRIM pdg:log MAXLEN 0",  # records not yet chained
        b"FLUSHALL",
        b"CONFIG SET appendonly no",
        b"EVAL \"return redis.call('DEL', KEYS[1])\" 1 pdg:log",
        b"ACL LIST",
        b"KEYS *",
    ]
    replies = raw(port, *attacks)
    for command, reply in zip(attacks, replies, strict=True):
        assert reply.startswith((b"-NOAUTH", b"-NOPERM")), (command, reply)
    assert raw(port, b"PING") == [b"+PONG"]
    assert raw(port, b"AUTH pdg wrong-password")[0].startswith(b"-WRONGPASS")
    # Signing in as "default" (which takes any password) still allows PING only.
    assert raw(port, b"AUTH default x", b"FLUSHALL")[1].startswith(b"-NOPERM")
    # Nothing changed.
    assert client.get("pdg:{lic-1}:free:ds:2026-11") == b"958"
    assert client.xlen("pdg:log") == 1
    # Every write is fsynced before the reply.
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()


def test_the_folder_and_the_secret_are_the_owners_alone(tmp_path: Path, embedded: str) -> None:
    url = embedded
    data = tmp_path / "data"
    secret = (data / "valkey" / "secret").read_text()
    assert len(secret) >= 32
    assert mode(data) == 0o700
    assert mode(data / "valkey") == 0o700
    assert mode(data / "valkey" / "secret") == 0o600
    assert mode(data / "valkey" / "users.acl") == 0o600
    assert secret not in (data / "valkey" / "users.acl").read_text()
    assert secret in url
    # Another process of the data folder finds the server and signs in.
    again = running_embedded_url(data)
    assert again == url
    client = redis.Redis.from_url(again)
    assert client.ping()
    client.close()


def test_a_restart_keeps_the_password_and_the_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = EmbeddedValkey(data)
    url = first.start_blocking()
    client = redis.Redis.from_url(url)
    client.set("kept", "yes")
    client.close()
    first.stop_blocking()
    second = EmbeddedValkey(data)
    url_again = second.start_blocking()
    try:
        assert url_again.split("@")[0] == url.split("@")[0]  # the same user and password
        client = redis.Redis.from_url(url_again)
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        second.stop_blocking()
