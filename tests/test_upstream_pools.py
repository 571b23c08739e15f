"""Upstream pools (issue 16, finding 8): several targets with weights, passive
health and a breaker, active health checks, retries only where they are safe,
and TLS with a private CA and a client certificate. Real target servers on
loopback ports; every call's record names the target that answered."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.state import ADMIN_TOKENS
from licensing.schemas import AdminTokenIn
from tests.conftest import World, free_port
from tests.test_data_plane import WorldFactory, check_problem
from tests.test_operations import record_of
from tests.test_quota import usage

EMBEDDED = pytest.mark.parametrize("backend", ["embedded"], indirect=True)


@dataclass
class Target:
    """One upstream target: ``/api/...`` answers its name (or fails as
    ``failing`` says), ``/api/healthz`` answers ``health``."""

    name: str
    url: str = ""
    failing: int | None = None
    health: int = 200
    hits: Counter[str] = field(default_factory=Counter)
    checks: int = 0


@pytest.fixture
async def targets() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(name: str, *, tls: ssl.SSLContext | None = None) -> Target:
        state = Target(name)

        async def health(request: web.Request) -> web.Response:
            state.checks += 1
            return web.Response(status=state.health)

        async def api(request: web.Request) -> web.Response:
            await request.read()
            state.hits[request.method] += 1
            if state.failing is not None:
                return web.Response(status=state.failing, text="down")
            return web.json_response({"target": name})

        app = web.Application()
        app.router.add_get("/api/healthz", health)
        app.router.add_route("*", "/api/{tail:.*}", api)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
        runners.append(runner)
        state.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/api"
        return state

    yield start
    for runner in runners:
        await runner.cleanup()


def pool(*members: tuple[Target, int], **options: Any) -> dict[str, Any]:
    return {
        "targets": [{"name": t.name, "url": t.url, "weight": w} for t, w in members],
        **options,
    }


async def licensed_pool(
    world: World, upstream_pool: dict[str, Any], **fields: Any
) -> tuple[dict[str, Any], dict[str, Any], str]:
    ds, lic, _app, token = await world.licensed(
        dataset_fields={"upstream_url": None, "upstream_pool": upstream_pool, **fields}
    )
    return ds, lic, token


async def test_calls_are_spread_by_weight_and_each_record_names_its_target(
    world: World, targets: Callable[..., Any]
) -> None:
    a, b = await targets("a"), await targets("b")
    ds, lic, token = await licensed_pool(world, pool((a, 3), (b, 1)))
    assert ds["upstream_url"].rstrip("/") == a.url
    answered = []
    for _ in range(8):
        status, body, resp = await world.call(f"/data/{ds['id']}/items", token)
        assert status == 200, body
        answered.append((body["target"], resp.headers["X-Call-Id"]))
    # Smooth weighted round robin: exactly the weights over each run of 4.
    assert Counter(name for name, _ in answered) == {"a": 6, "b": 2}
    assert (a.hits["GET"], b.hits["GET"]) == (6, 2)
    for name, call_id in answered:
        row = await record_of(world, call_id)
        assert (row["upstream_target"], row["outcome"], row["status"]) == (name, "served", 200), row
    assert (await usage(world, lic, ds, row["period"]))["free"]["used"] == 8


@EMBEDDED
async def test_a_failing_target_is_retried_elsewhere_then_its_breaker_opens_and_closes(
    world: World, targets: Callable[..., Any]
) -> None:
    """An idempotent call a target fails (503) is served by another, reserved
    and charged once; two failures in a row open the target's breaker, so it
    is left alone until its trial, which closes it again."""
    a, b = await targets("a"), await targets("b")
    a.failing = 503
    ds, lic, token = await licensed_pool(
        world, pool((a, 1), (b, 1), retries=1, breaker={"failures": 2, "open_seconds": 1})
    )
    rows = []
    for _ in range(6):
        status, body, resp = await world.call(f"/data/{ds['id']}/x", token)
        assert (status, body) == (200, {"target": "b"})
        rows.append(await record_of(world, resp.headers["X-Call-Id"]))
    assert a.hits["GET"] == 2, "the breaker did not open after two failures"
    assert b.hits["GET"] == 6
    assert {(r["upstream_target"], r["upstream_status"], r["outcome"]) for r in rows} == {
        ("b", 200, "served")
    }
    assert (await usage(world, lic, ds, rows[0]["period"]))["free"]["used"] == 6
    # The target recovers; after open_seconds one call tries it, and it is back.
    a.failing = None
    await asyncio.sleep(1.1)
    seen = Counter()
    for _ in range(4):
        status, body, _resp = await world.call(f"/data/{ds['id']}/x", token)
        assert status == 200, body
        seen[body["target"]] += 1
    assert seen == {"a": 2, "b": 2}, seen


@EMBEDDED
async def test_only_idempotent_calls_with_a_held_body_are_retried(
    world: World, targets: Callable[..., Any]
) -> None:
    a, b = await targets("a"), await targets("b")
    a.failing = b.failing = 503
    ds, lic, token = await licensed_pool(
        world,
        pool((a, 1), (b, 1), retries=3, breaker={"failures": 100, "open_seconds": 1}),
        methods=["GET", "POST", "PUT"],
    )
    path = f"/data/{ds['id']}/x"
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    # Each target once (retries stop when every target was tried).
    assert (a.hits["GET"], b.hits["GET"]) == (1, 1)
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["outcome"], row["upstream_status"], row["charge_e4"]) == ("upstream-failure", 503, 0), row
    assert row["upstream_target"] in ("a", "b")
    # POST is not idempotent: one target, once.
    status, body, resp = await world.call(path, token, method="POST", data=b"x")
    check_problem(status, body, resp, 502, "upstream-unavailable")
    assert a.hits["POST"] + b.hits["POST"] == 1
    # PUT is, but a body streamed with its Content-Length is not held: once.
    status, body, resp = await world.call(path, token, method="PUT", data=b"{}")
    check_problem(status, body, resp, 502, "upstream-unavailable")
    assert a.hits["PUT"] + b.hits["PUT"] == 1
    assert (await usage(world, lic, ds, row["period"]))["free"]["used"] == 0


@EMBEDDED
async def test_with_every_breaker_open_calls_are_refused_unforwarded(
    world: World, targets: Callable[..., Any]
) -> None:
    a, b = await targets("a"), await targets("b")
    a.failing = b.failing = 500
    ds, lic, token = await licensed_pool(
        world, pool((a, 1), (b, 1), retries=1, breaker={"failures": 1, "open_seconds": 60})
    )
    path = f"/data/{ds['id']}/x"
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    status, body, resp = await world.call(path, token)
    check_problem(status, body, resp, 503, "upstream-unavailable")
    assert 55 <= int(resp.headers["Retry-After"]) <= 60
    assert (a.hits["GET"], b.hits["GET"]) == (1, 1), "a call was forwarded to an open breaker"
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["outcome"], row["upstream_target"], row["upstream_status"]) == (
        "upstream-failure",
        None,
        None,
    )
    assert (await usage(world, lic, ds, row["period"]))["free"]["used"] == 0


async def _until(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    for _ in range(int(seconds * 20)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


@EMBEDDED
async def test_active_health_checks_take_a_target_out_and_bring_it_back(
    world: World, targets: Callable[..., Any]
) -> None:
    a, b = await targets("a"), await targets("b")
    a.health = 500
    check = {"path": "healthz", "interval_seconds": 1, "unhealthy_after": 1, "healthy_after": 1}
    ds, _lic, token = await licensed_pool(world, pool((a, 1), (b, 1), health_check=check))
    await _until(lambda: a.checks >= 1 and b.checks >= 1, "both targets checked")
    await asyncio.sleep(0.2)  # the check's verdict lands after its answer
    for _ in range(4):
        status, body, _resp = await world.call(f"/data/{ds['id']}/x", token)
        assert (status, body) == (200, {"target": "b"})
    assert a.hits["GET"] == 0, "a target failing its health checks was sent calls"
    a.health = 204
    passed_from = a.checks
    await _until(lambda: a.checks > passed_from, "a checked again")
    await asyncio.sleep(0.2)
    seen = Counter()
    for _ in range(4):
        status, body, _resp = await world.call(f"/data/{ds['id']}/x", token)
        seen[body["target"]] += 1
    assert seen["a"] == 2, seen


# -- TLS -----------------------------------------------------------------------


@dataclass
class Pki:
    ca_pem: str
    server: ssl.SSLContext
    client_cert: Path
    client_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, ca: tuple[x509.Certificate, Any] | None, **kind: Any
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca[0].subject if ca else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[0].public_key()), critical=False
        )
    if kind.get("server"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(ca[1] if ca else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("pdg test CA", ca_key, None)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _issue("127.0.0.1", server_key, (ca, ca_key), server=True)
    client = _issue("gateway", client_key, (ca, ca_key))
    (tmp_path / "server.pem").write_bytes(_pem(server) + _key_pem(server_key))
    (tmp_path / "client.crt").write_bytes(_pem(client))
    (tmp_path / "client.key").write_bytes(_key_pem(client_key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=_pem(ca).decode())
    context.load_cert_chain(tmp_path / "server.pem")
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    return Pki(_pem(ca).decode(), context, tmp_path / "client.crt", tmp_path / "client.key")


@EMBEDDED
async def test_upstream_tls_with_a_private_ca_and_a_client_certificate(
    world_factory: WorldFactory, targets: Callable[..., Any], pki: Pki
) -> None:
    world = await world_factory(
        proxy__client_certificates={
            "gw": {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        }
    )
    secure = await targets("secure", tls=pki.server)
    tls = {"ca_pem": pki.ca_pem, "client_certificate": "gw"}
    ds, _lic, _app, token = await world.licensed(
        dataset_fields={"upstream_url": secure.url, "upstream_tls": tls}
    )
    status, body, resp = await world.call(f"/data/{ds['id']}/x", token)
    assert (status, body) == (200, {"target": "secure"})
    row = await record_of(world, resp.headers["X-Call-Id"])
    assert (row["upstream_target"], row["outcome"]) == ("default", "served")
    # Not trusting the private CA: refused, never served.
    ds2, _lic, _app, token2 = await world.licensed(dataset_fields={"upstream_url": secure.url})
    status, body, resp = await world.call(f"/data/{ds2['id']}/x", token2)
    check_problem(status, body, resp, 502, "upstream-unavailable")
    # Trusting it but showing no client certificate: the upstream refuses.
    ds3, _lic, _app, token3 = await world.licensed(
        dataset_fields={"upstream_url": secure.url, "upstream_tls": {"ca_pem": pki.ca_pem}}
    )
    status, body, resp = await world.call(f"/data/{ds3['id']}/x", token3)
    assert status in (502, 503), body
    assert body["code"] == "upstream-unavailable"
    assert secure.hits["GET"] == 1


# -- the admin API ---------------------------------------------------------------


@EMBEDDED
async def test_pool_settings_are_checked_and_hidden_from_licensees(
    world: World, targets: Callable[..., Any]
) -> None:
    a, b = await targets("a"), await targets("b")
    base = {
        "name": "Pooled",
        "provider": "p",
        "classification": 1,
        "open_class": "open",
        "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
    }
    bad = [
        {"upstream_pool": pool((a, 1), (a, 2))},  # one target twice
        {"upstream_pool": {"targets": []}},
        {"upstream_pool": pool((a, 0))},
        {"upstream_pool": pool((a, 1)), "upstream_url": b.url},  # not the first target
        {"upstream_pool": pool((a, 1), health_check={"path": "../admin"})},
        {"upstream_pool": pool((a, 1), retries=9)},
        {"upstream_url": a.url, "upstream_tls": {"ca_pem": "not a certificate"}},
        {"upstream_url": a.url, "upstream_tls": {"client_certificate": "not-configured"}},
        {},  # no upstream at all
    ]
    for n, fields in enumerate(bad):
        async with world.client.post(
            "/admin/v1/datasets", json={"id": f"bad-{n}", **base, **fields}, headers=world.admin
        ) as resp:
            body = await resp.json()
            assert resp.status == 400, (fields, body)
            assert body["code"] == "bad-request", body
    ds = await world.dataset(upstream_url=None, upstream_pool=pool((a, 1), (b, 2)))
    assert [t["name"] for t in ds["upstream_pool"]["targets"]] == ["a", "b"]
    # While a pool is set, upstream_url changes only with it.
    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}", json={"upstream_url": b.url}, headers=world.admin
    ) as resp:
        assert resp.status == 400, await resp.text()
    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}", json={"upstream_pool": pool((b, 1))}, headers=world.admin
    ) as resp:
        changed = await resp.json()
        assert resp.status == 200, changed
        assert changed["upstream_url"].rstrip("/") == b.url
    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}", json={"upstream_pool": None}, headers=world.admin
    ) as resp:
        cleared = await resp.json()
        assert (resp.status, cleared["upstream_pool"]) == (200, None), cleared
        assert cleared["upstream_url"].rstrip("/") == b.url
    licensee = await world.licensee()
    scoped = await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="licensee", licensee_id=licensee["id"]))
    pooled = await world.dataset(upstream_url=None, upstream_pool=pool((a, 1)), upstream_tls={"ca_pem": None})
    async with world.client.get(
        f"/admin/v1/datasets/{pooled['id']}", headers={"Authorization": f"Bearer {scoped.token}"}
    ) as resp:
        seen = await resp.json()
        assert resp.status == 200, seen
    assert not {"upstream_url", "upstream_pool", "upstream_tls"} & seen.keys(), seen
