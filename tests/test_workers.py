"""``pdg serve --workers 2`` as an operator runs it: one access log and one
metrics view for both workers; what one worker issued honoured by the other
at once; and a graceful stop — not ready first, calls still served while
draining, the call in flight when the listeners close finished and its
record stored, the process gone within its bound."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import World, free_port
from tests.test_operations_listen import samples
from tests.test_processes import PDG, _admin_headers, _embedded_env, _request, _stop, _wait_http, licensed

pytestmark = pytest.mark.slow

CALLS = 40
DRAIN_SECONDS = 3.0
#: The upstream's answer to ``/slow`` outlasts the drain: the call is still
#: in flight when the listeners close.
SLOW_SECONDS = DRAIN_SECONDS + 2.0
#: The whole stop: the drain, the slow call's rest, the records' flush.
STOP_BOUND_SECONDS = DRAIN_SECONDS + 15.0 + 10.0


class _Upstream(BaseHTTPRequestHandler):
    slow_arrived = threading.Event()

    def do_GET(self) -> None:
        if self.path.endswith("/slow"):
            type(self).slow_arrived.set()
            time.sleep(SLOW_SECONDS)
        body = b'[{"id": 1}]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str, token: str) -> tuple[int, dict[str, str]]:
    """A data call on a connection of its own (so the kernel picks a worker)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
            resp.read()
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, dict(exc.headers)


def _token(base: str, app: dict[str, Any], scope: str) -> str:
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": scope}).encode()
    basic = base64.b64encode(f"{app['client_id']}:{app['client_secret']}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 - loopback
        base + "/oauth/token",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Basic {basic}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        return str(json.loads(resp.read())["access_token"])


def _scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:  # noqa: S310 - loopback
        return samples(resp.read().decode())


def _access_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "pdg.access":
                lines.append(entry)
    return lines


def test_two_workers_one_log_one_metrics_view_and_a_graceful_stop(tmp_path: Path, slow_upstream: str) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {
        **_embedded_env(data_dir),
        "PDG_ACCESS_LOG": "true",
        "PDG_LOG_LEVEL": "INFO",
        "PDG_LOG_FORMAT": "json",
        "PDG_DRAIN_SECONDS": str(DRAIN_SECONDS),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PDG, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base + "/healthz", proc)
        admin = _admin_headers(env)
        dataset = {
            "id": "firms",
            "name": "Firms",
            "provider": "market-regulation",
            "upstream_url": slow_upstream,
            "classification": 1,
            "open_class": "open",
            "free_monthly_calls": 1000,
            "price": {"per_call_fen": "1", "per_record_fen": "0"},
            "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
        }
        licensee = licensed(base, admin, dataset, "Workers Co")

        # An app made through one worker, its token issued by either, and at
        # once its call served by either: eight times, so that with the
        # kernel spreading connections both ways round are taken.
        for round_ in range(8):
            status, app = _request(
                "POST", base + "/admin/v1/apps", {"licensee_id": licensee["id"], "name": f"w{round_}"}, admin
            )
            assert status == 201, app
            token = _token(base, app, "purpose:public-interest dataset:firms")
            status, headers = _get(f"{base}/data/firms/records", token)
            assert status == 200, (round_, headers)
        answers = [_get(f"{base}/data/firms/records", token) for _ in range(CALLS)]
        assert Counter(status for status, _ in answers) == {200: CALLS}, answers
        call_ids = [headers["X-Call-Id"] for _, headers in answers]
        served = CALLS + 8

        # One metrics view: whichever worker answers a scrape, it counts
        # every worker's calls.
        label = 'dataset="firms",outcome="2xx",purpose="public-interest"'
        for _ in range(6):
            seen = _scrape(base)
            assert seen[f"pdg_data_calls_total{{{label}}}"] == served, seen
            assert seen['pdg_tokens_issued_total{method="client_secret_basic"}'] == 8
            assert seen['pdg_data_call_seconds_count{dataset="firms"}'] == served
            assert seen["pdg_redis_up"] == seen["pdg_database_up"] == 1

        # One access log: a JSON line per call, from both workers.
        lines: list[dict[str, Any]] = []
        for _ in range(50):
            lines = [entry for entry in _access_lines(log) if entry.get("call_id") in call_ids]
            if len(lines) >= CALLS:
                break
            time.sleep(0.1)
        assert sorted(entry["call_id"] for entry in lines) == sorted(call_ids)
        assert len({entry["pid"] for entry in lines}) == 2, "both workers served and logged"
        for entry in lines:
            assert entry["path"] == "/data/firms/records"
            assert entry["status"] == 200
            assert entry["outcome"] == "served"
            assert entry["dataset"] == "firms"
            assert entry["licensee"] == licensee["id"]
            assert entry["method"] == "GET"
            assert entry["request_id"]
            assert entry["bytes"] > 0
            assert entry["gateway_ms"] >= entry["upstream_ms"] >= 0
            assert entry["time"].endswith("Z")
            assert entry["level"] == "info"
        assert token not in log.read_text()

        # The graceful stop: a call in flight, then SIGTERM to pdg serve.
        slow: dict[str, Any] = {}
        in_flight = threading.Thread(
            target=lambda: slow.update(answer=_get(f"{base}/data/firms/slow", token)), daemon=True
        )
        in_flight.start()
        assert _Upstream.slow_arrived.wait(20), "the slow call did not reach the upstream"
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        not_ready = 0
        served_while_draining = 0
        while time.monotonic() - signalled < DRAIN_SECONDS - 1.0:
            status, body = _request("GET", base + "/readyz")
            if status == 503:
                assert body["components"]["accepting"] is False, body
                not_ready += 1
            status, _ = _get(f"{base}/data/firms/records", token)
            if status == 200:
                served_while_draining += 1
            time.sleep(0.1)
        assert not_ready > 0, "/readyz never turned false while draining"
        assert served_while_draining > 0, "no call was served while draining"
        proc.wait(STOP_BOUND_SECONDS)
        stopped_after = time.monotonic() - signalled
        assert proc.returncode == 0
        in_flight.join(10)
        status, headers = slow["answer"]
        assert status == 200, headers
        # The listeners closed with the call in flight, which still finished.
        assert stopped_after > DRAIN_SECONDS, stopped_after
    finally:
        _stop(proc)

    traced = subprocess.run(
        [PDG, "audit", "trace", headers["X-Call-Id"], "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(traced.stdout)
    record = record[0] if isinstance(record, list) else record
    assert record["call_id"] == headers["X-Call-Id"]
    assert record["status"] == 200
    assert "Traceback" not in log.read_text()


async def test_what_one_replica_made_the_other_honours_at_once(
    world_factory: Callable[..., Awaitable[World]],
) -> None:
    """Two replicas whose background refresh is far off (30 s): a dataset,
    licence and app made through one, a token from either, a call to
    either — each served at its first try, round after round (the reload
    before a refusal waits its turn rather than refusing)."""
    first = await world_factory(server__catalogue_refresh_seconds=30)
    second = await world_factory(server__catalogue_refresh_seconds=30)
    for round_ in range(4):
        ds, _lic, app, _token = await first.licensed()
        scope = f"purpose:public-interest dataset:{ds['id']}"
        for issuer, caller in ((second, second), (first, second), (second, first)):
            token = await issuer.token(app, scope)
            status, body, _ = await caller.call(f"/data/{ds['id']}/records", token)
            assert status == 200, (round_, body)
