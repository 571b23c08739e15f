"""The installed ``pdg`` as a user runs it: ``pdg demo`` and its printed
copy-paste steps, ``pdg serve`` with several workers on the embedded
defaults, and a restart on the same data folder."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import credit_code, free_port

PDG = str(Path(sys.executable).with_name("pdg"))
pytestmark = pytest.mark.slow


def _wait_http(url: str, proc: subprocess.Popen[Any], seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback URL built by the test
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _stop(proc: subprocess.Popen[Any]) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise
    return proc.returncode


def _valkeys_under(folder: Path) -> list[int]:
    """Pids of valkey-server processes working in ``folder`` (their cwd)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "comm").read_text().strip() == "valkey-server"
                and str((proc / "cwd").resolve()).startswith(str(folder))
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - loopback URL built by the test
        url,
        data=data,
        method=method,
        headers={
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def licensed(base: str, admin: dict[str, str], dataset: dict[str, Any], name: str) -> dict[str, Any]:
    """``dataset`` made through the admin API, and a licensee ``name`` with a
    public-interest licence for it; the licensee."""
    assert _request("POST", base + "/admin/v1/datasets", dataset, admin)[0] == 201
    status, licensee = _request(
        "POST", base + "/admin/v1/licensees", {"name": name, "credit_code": credit_code()}, admin
    )
    assert status == 201, licensee
    licence = {
        "licensee_id": licensee["id"],
        "datasets": [dataset["id"]],
        "max_classification": 1,
        "purposes": ["public-interest"],
        "valid_from": "2020-01-01T00:00:00Z",
        "valid_until": "2099-01-01T00:00:00Z",
        "security_officer": "Officer Li",
    }
    assert _request("POST", base + "/admin/v1/licences", licence, admin)[0] == 201
    return dict(licensee)


def _embedded_env(data_dir: Path) -> dict[str, str]:
    """The environment of a user on the embedded defaults in ``data_dir``."""
    env = dict(os.environ, PDG_DATA_DIR=str(data_dir))
    for name in ("PDG_DATABASE_URL", "PDG_REDIS_URL", "PDG_CONFIG"):
        env.pop(name, None)
    return env


def _admin_headers(env: dict[str, str]) -> dict[str, str]:
    """Headers with a licence-admin token made by the CLI, as an operator would."""
    created = subprocess.run(
        [PDG, "admin-token", "create", "--role", "licence-admin", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"Authorization": f"Bearer {json.loads(created.stdout)['token']}"}


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen(
            [PDG, "demo", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        end = time.monotonic() + 60
        while "Press Ctrl-C" not in out.read_text() and time.monotonic() < end:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.2)
        yield out.read_text(), f"http://127.0.0.1:{port}"
    finally:
        assert _stop(proc) == 0
    assert "pdg demo stopped." in out.read_text()
    assert not _valkeys_under(tmp_path)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the demo's steps use curl")
def test_demo_printed_steps_work_as_pasted(demo: tuple[str, str]) -> None:
    text, _base = demo
    token_step = re.search(r"^   (TOKEN=\$\(curl .*?\))$", text, re.S | re.M)
    assert token_step, text
    calls = re.findall(
        r"^   (curl -s -H \"Authorization: Bearer \$TOKEN\" "
        r"\S+/data/(?:ent-registry|weather-obs|bus-lines)\S*)$",
        text,
        re.M,
    )
    assert len(calls) == 3, text
    refused = re.search(
        r"^   (curl -s -H \"Authorization: Bearer \$TOKEN\" \S+/household-register/\S+)", text, re.M
    )
    assert refused
    script = "set -euo pipefail\n" + token_step.group(1).replace("\\\n", " ") + "\n"
    for line in [*calls, refused.group(1)]:
        script += line + "\necho\n"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(outputs) == 4, done.stdout
    for served in outputs[:3]:
        assert isinstance(served, list)
        assert served
    assert outputs[3]["code"] == "dataset-closed"
    assert outputs[3]["status"] == 403

    # Step 5: the four calls are in the call record, which verifies.
    admin = re.search(r"^   (ADMIN=\S+)$", text, re.M)
    listing = re.search(r"^   (curl -s -H \"Authorization: Bearer \$ADMIN\" \S+/admin/v1/calls)$", text, re.M)
    verify = re.search(r"^   pdg (audit verify --data-dir \S+)$", text, re.M)
    assert admin, text
    assert listing, text
    assert verify, text
    recorded: list[dict[str, object]] = []
    end = time.monotonic() + 15
    while len(recorded) < 4 and time.monotonic() < end:
        time.sleep(0.3)
        done = subprocess.run(
            ["bash", "-c", f"{admin.group(1)}\n{listing.group(1)}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        recorded = json.loads(done.stdout)
    assert len(recorded) == 4, recorded
    assert sorted(str(r["outcome"]) for r in recorded) == ["refused", "served", "served", "served"]
    checked = subprocess.run(
        [PDG, *shlex.split(verify.group(1)), "--json"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["ok"] is True


def test_serve_with_workers_on_embedded_defaults(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = _embedded_env(data_dir)
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [PDG, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base + "/healthz", proc)
        assert _valkeys_under(data_dir), "the embedded Valkey server runs under the data folder"
        admin = _admin_headers(env)
        status, licensee = _request(
            "POST", base + "/admin/v1/licensees", {"name": "Workers Co", "credit_code": credit_code()}, admin
        )
        assert status == 201, licensee
        # Every worker answers readiness, and the licensee is visible through whichever serves.
        for _ in range(8):
            status, ready = _request("GET", base + "/readyz")
            assert status == 200, ready
            assert ready["components"] == {
                "database": True,
                "redis": True,
                "ledger": True,
                "catalogue": True,
                "accepting": True,
            }
            status, listed = _request("GET", base + "/admin/v1/licensees", headers=admin)
            assert [item["id"] for item in listed] == [licensee["id"]]
    finally:
        assert _stop(proc) == 0
    assert not _valkeys_under(data_dir), "stopping pdg serve stops its embedded Valkey"
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_restart_on_the_same_data_folder_keeps_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = _embedded_env(data_dir)
    admin = _admin_headers(env)
    kids = []
    for _ in range(2):
        port = free_port()
        proc = subprocess.Popen(
            [PDG, "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
            status, listed = _request("GET", f"http://127.0.0.1:{port}/admin/v1/licensees", headers=admin)
            assert status == 200, listed
            status, jwks = _request("GET", f"http://127.0.0.1:{port}/.well-known/jwks.json")
            kids.append({k["kid"] for k in jwks["keys"]})
        finally:
            assert _stop(proc) == 0
    assert kids[0] == kids[1], "the signing key survives a restart"
    # Token-signing keys are shared through the database, not kept in a file;
    # the ledger's checkpoint key is a file, the owner's alone.
    assert not (data_dir / "keys" / "signing-key.pem").exists()
    assert (data_dir / "keys" / "ledger-key.pem").stat().st_mode & 0o777 == 0o600


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``pid``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError):
            continue
    return found


def _writer_of(serve: int) -> int:
    """The ledger writer process ``pdg serve`` started beside the gateway."""
    writers = [pid for pid, cmd in _children(serve) if "spawn_main" in cmd]
    assert len(writers) == 1, _children(serve)
    return writers[0]


def _gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2] == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_serve_runs_the_ledger_writer_beside_it_and_takes_it_along(tmp_path: Path, signum: int) -> None:
    """``pdg serve`` runs the ledger writer in a process of its own. Stopped
    (SIGTERM to the gateway alone, as a process manager does) it stops the
    writer; killed (SIGKILL), it leaves no writer behind either: the writer
    notices its parent is gone and stops by itself."""
    data_dir = tmp_path / "data"
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [PDG, "serve", "--port", str(port)],
            env=_embedded_env(data_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        writer = _writer_of(proc.pid)
        os.kill(proc.pid, signum)
        assert _gone(writer, 20), "the ledger writer outlived its gateway"
        if signum == signal.SIGTERM:
            assert proc.wait(30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in _valkeys_under(data_dir):  # a killed gateway leaves its Valkey, to be adopted
            os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_access_log_keeps_no_query_and_no_personal_segment(tmp_path: Path, log_format: str) -> None:
    """``logging.access_log`` on: a call with an ID number in a ``{personal}``
    segment and in its query is logged with the segment's digest and no query;
    one refused before its token, with its dataset only. As JSON lines, each
    access line carries the call's fields."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    data_dir = tmp_path / "data"
    port = free_port()
    env = {
        **_embedded_env(data_dir),
        "PDG_ACCESS_LOG": "true",
        "PDG_LOG_LEVEL": "INFO",
        "PDG_LOG_FORMAT": log_format,
    }
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [PDG, "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    id_number = "11010119900307123X"
    try:
        _wait_http(base + "/healthz", proc)
        admin = _admin_headers(env)
        dataset = {
            "id": "persons",
            "name": "Persons",
            "provider": "civil-affairs",
            "upstream_url": f"http://127.0.0.1:{upstream.server_address[1]}/api",
            "classification": 1,
            "open_class": "open",
            "paths": ["persons/{personal}"],
            "free_monthly_calls": 100,
            "price": {"per_call_fen": "1", "per_record_fen": "0"},
            "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
        }
        licensee = licensed(base, admin, dataset, "Log Co")
        status, app = _request(
            "POST", base + "/admin/v1/apps", {"licensee_id": licensee["id"], "name": "l"}, admin
        )
        assert status == 201, app
        form = urllib.parse.urlencode(
            {"grant_type": "client_credentials", "scope": "purpose:public-interest dataset:persons"}
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback
            base + "/oauth/token",
            data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        basic = base64.b64encode(f"{app['client_id']}:{app['client_secret']}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            token = json.loads(resp.read())["access_token"]
        path = f"/data/persons/persons/{id_number}?idcard={id_number}"
        headers = {"Authorization": f"Bearer {token}", "X-Request-Id": "trace-7"}
        assert _request("GET", base + path, headers=headers)[0] == 200
        assert _request("GET", base + path)[0] == 401
    finally:
        assert _stop(proc) == 0
        upstream.shutdown()
        upstream.server_close()
    text = (tmp_path / "serve.log").read_text()
    assert id_number not in text
    assert token not in text
    assert app["client_secret"] not in text
    if log_format == "text":
        assert "/data/persons/persons/{personal:" in text
        assert "/data/persons/… 401" in text
        return
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "pdg.access"]
    served = next(line for line in access if line.get("request_id") == "trace-7")
    assert served["path"].startswith("/data/persons/persons/{personal:")
    assert (served["method"], served["status"], served["outcome"]) == ("GET", 200, "served")
    assert served["licensee"] == licensee["id"]
    assert served["dataset"] == "persons"
    assert served["bytes"] >= 2
    assert served["gateway_ms"] > 0
    assert 0 < served["upstream_ms"] <= served["gateway_ms"]
    assert len(served["call_id"]) >= 16
    assert served["time"].endswith("Z")
    refused = [line for line in access if line["path"] == "/data/persons/…"]
    assert [line["status"] for line in refused] == [401]
    assert any(line["logger"] != "pdg.access" for line in lines)  # the other lines are JSON too
