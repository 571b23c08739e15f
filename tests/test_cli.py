"""The ``pdg`` command line (DESIGN §3 "Command line", §7 bad input), run as the
real executable in a subprocess: exit codes, ``--json`` output, and on bad
input exactly one line on stderr, ``pdg: error: ...``, with nothing written.

Each run costs about a second (imports, Argon2), so steps are grouped into
scenarios, and independent runs are started side by side.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import World, credit_code

PDG = Path(sys.executable).parent / "pdg"
TABLES = ("datasets", "licensees", "licences", "apps", "admin_tokens")


@dataclass(frozen=True)
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self
        assert self.err == "", self
        return json.loads(self.out)

    def ok(self) -> Run:
        assert self.code == 0, self
        return self

    def failed(self, *, code: int | None = None, mentions: str = "") -> str:
        """Assert a clean failure: non-zero exit, one ``pdg: error:`` line, no traceback."""
        assert self.code != 0, self
        if code is not None:
            assert self.code == code, self
        lines = self.err.splitlines()
        assert len(lines) == 1, self
        assert lines[0].startswith("pdg: error: "), self
        assert "Traceback" not in self.err, self
        assert self.out == "", self
        assert mentions in lines[0], self
        return lines[0]


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any ``PDG_*`` setting, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDG_")}
    env["PDG_DATA_DIR"] = str(data_dir)
    env.update(extra)
    return env


def run_all(
    commands: Sequence[Sequence[str]], env: Mapping[str, str], cwd: Path, stdin: str | None = None
) -> list[Run]:
    """Run ``pdg`` once per command, all at the same time."""
    procs = [
        (
            tuple(args),
            subprocess.Popen(
                [str(PDG), *args],
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in commands
    ]
    runs = []
    for args, proc in procs:
        out, err = proc.communicate(stdin, timeout=120)
        runs.append(Run(args, proc.returncode, out, err))
    return runs


def pdg(*args: str, env: Mapping[str, str], cwd: Path, stdin: str | None = None) -> Run:
    return run_all([args], env, cwd, stdin)[0]


async def apdg(*args: str, env: Mapping[str, str], cwd: Path) -> Run:
    """``pdg`` without blocking the event loop (a gateway may be serving on it)."""
    proc = await asyncio.create_subprocess_exec(
        str(PDG),
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return Run(tuple(args), proc.returncode, out.decode(), err.decode())


def database_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the catalogue and licensing tables, read with sqlite3 itself."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


DATASET_FLAGS = (
    "--name", "Enterprise registry", "--provider", "market-regulation",
    "--upstream-url", "http://127.0.0.1:9/ent", "--classification", "2", "--open-class", "conditional",
)  # fmt: skip


# -- help -------------------------------------------------------------------------


def test_help_for_pdg_and_every_group(tmp_path: Path) -> None:
    env = environment(tmp_path / "data")
    groups = ["dataset", "licensee", "licence", "app", "admin-token", "db", "serve"]
    runs = run_all([["--help"], *([g, "--help"] for g in groups), []], env, tmp_path)
    top, *group_runs, bare = runs
    assert top.code == 0, top
    for name in ("serve", "demo", "db", "dataset", "licensee", "licence", "app", "admin-token"):
        assert name in top.out
    for run, group in zip(group_runs, groups, strict=True):
        assert run.code == 0, run
        assert run.out.startswith("usage: pdg " + group), run
    for action in ("create", "update", "list", "show"):
        assert action in group_runs[0].out
    for action in ("suspend", "resume", "revoke"):
        assert action in group_runs[2].out
    assert "--port" in group_runs[-1].out
    assert "--config" in group_runs[-1].out
    # No command at all: a usage error, one line.
    bare.failed(code=2)
    assert not (tmp_path / "data").exists()  # help writes nothing


# -- the whole path, embedded ------------------------------------------------------------


def test_scenario_with_flags_on_the_embedded_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = environment(data)
    code = credit_code(2015)

    token = pdg("admin-token", "create", "--role", "licence-admin", "--json", env=env, cwd=tmp_path).json()
    assert token["token"].startswith("pdga_")
    assert token["role"] == "licence-admin"

    dataset = pdg(
        "dataset", "create", "--id", "ent-registry", *DATASET_FLAGS,
        "--free-monthly-calls", "100", "--per-call-fen", "2.5", "--per-record-fen", "0.0125",
        "--max-records-per-call", "500", "--tier", "1000:3", "--tier", ":1.5", "--split", "0.5,0.3,0.2",
        "--burst-per-second", "10", "--burst-capacity", "5", "--json",
        env=env, cwd=tmp_path,
    ).json()  # fmt: skip
    assert dataset["id"] == "ent-registry"
    assert dataset["classification"] == 2
    assert dataset["open_class"] == "conditional"
    assert dataset["upstream_url"] == "http://127.0.0.1:9/ent"
    assert dataset["price"] == {
        "per_call_fen": "2.5",
        "per_record_fen": "0.0125",
        "tiers": [{"up_to": 1000, "per_call_fen": "3"}, {"up_to": None, "per_call_fen": "1.5"}],
    }
    assert dataset["revenue_split"] == {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"}
    assert dataset["burst"] == {"per_second": 10, "capacity": 5}

    licensee = pdg(
        "licensee", "create", "--id", "wuhan", "--name", "武汉智慧城市", "--credit-code", code.lower(),
        "--contact", "ops@example.com", "--json", env=env, cwd=tmp_path,
    ).json()  # fmt: skip
    assert licensee == {**licensee, "id": "wuhan", "name": "武汉智慧城市", "credit_code": code}

    licence = pdg(
        "licence", "create", "--id", "lic-1", "--licensee", "wuhan",
        "--dataset", "ent-registry", "--dataset", "market-regulation/*",
        "--purpose", "public-interest", "--purpose", "industrial", "--max-classification", "2",
        "--valid-from", "2025-01-01T00:00:00+08:00", "--valid-until", "2099-01-01T00:00:00Z",
        "--security-officer", "Li Wei", "--prepaid-calls", "500", "--json",
        env=env, cwd=tmp_path,
    ).json()  # fmt: skip
    assert licence["datasets"] == ["ent-registry", "market-regulation/*"]
    assert licence["purposes"] == ["public-interest", "industrial"]
    assert licence["paid"] == {"credit_limit_fen": None, "prepaid_calls": 500}
    assert licence["status"] == "active"
    assert licence["valid_from"].startswith("2024-12-31T16:00:00")

    # The human form shows the client secret, once.
    app_run = pdg("app", "create", "--licensee", "wuhan", "--name", "dashboard", env=env, cwd=tmp_path).ok()
    secret_lines = [line for line in app_run.out.splitlines() if line.startswith("client_secret:")]
    assert len(secret_lines) == 1, app_run
    secret = secret_lines[0].split(":", 1)[1].strip()
    assert len(secret) >= 32
    app_id = next(line for line in app_run.out.splitlines() if line.startswith("client_id:")).split()[-1]

    suspended = pdg("licence", "suspend", "lic-1", "--json", env=env, cwd=tmp_path).json()
    assert suspended["status"] == "suspended"
    resumed = pdg("licence", "resume", "lic-1", "--json", env=env, cwd=tmp_path).json()
    assert resumed["status"] == "active"
    revoked = pdg("licence", "revoke", "lic-1", "--json", env=env, cwd=tmp_path).json()
    assert revoked["status"] == "revoked"
    before = database_rows(data / "pdg.sqlite3")

    again, disabled, updated, revoked_token, datasets, licences, apps, shown, tokens = run_all(
        [
            ["licence", "resume", "lic-1"],  # revoked is final
            ["app", "disable", app_id, "--json"],
            ["dataset", "update", "ent-registry", "--classification", "3", "--split", "1,0,0", "--json"],
            ["admin-token", "revoke", token["id"], "--json"],
            ["dataset", "list", "--json"],
            ["licence", "list", "--licensee", "wuhan", "--json"],
            ["app", "list", "--json"],
            ["licensee", "show", "wuhan", "--json"],
            ["admin-token", "list", "--json"],
        ],
        env,
        tmp_path,
    )
    assert "revoked" in again.failed(code=1)
    assert disabled.json()["enabled"] is False
    assert [d["id"] for d in datasets.json()] == ["ent-registry"]
    assert [(x["id"], x["status"]) for x in licences.json()] == [("lic-1", "revoked")]
    listed_apps = apps.json()
    assert [(a["id"], a["client_secret"]) for a in listed_apps] == [(app_id, None)]
    assert secret not in apps.out
    assert shown.json()["credit_code"] == code
    changed = updated.json()
    assert (changed["classification"], changed["revenue_split"]["provider"]) == (3, "1")
    assert changed["price"] == dataset["price"]  # not named, not changed
    assert changed["terms_version"] == 2  # a new split: the next version of the terms
    versions = pdg("dataset", "terms", "ent-registry", "--json", env=env, cwd=tmp_path).json()
    assert [(v["version"], v["revenue_split"]["provider"]) for v in versions] == [
        (1, dataset["revenue_split"]["provider"]),
        (2, "1"),
    ]
    table = pdg("dataset", "terms", "ent-registry", env=env, cwd=tmp_path).ok().out
    assert "1/0/0" in table, table
    assert revoked_token.json() == {"id": token["id"], "revoked": True}
    assert [t["id"] for t in tokens.json()] == [token["id"]]
    assert "token" not in tokens.json()[0]

    after = database_rows(data / "pdg.sqlite3")
    assert after["licences"] == before["licences"]  # the refused resume changed nothing
    assert after["admin_tokens"][0][-2] is not None  # revoked_at
    assert after["admin_tokens"][0][-1] is None  # expires_at: none asked for
    # The secrets are stored only as hashes.
    raw = json.dumps(after, default=str)
    assert secret not in raw
    assert token["token"].split("_", 2)[2] not in raw


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = environment(data)
    existing = credit_code(1)
    pdg(
        "licensee", "create", "--id", "first", "--name", "First", "--credit-code", existing,
        env=env, cwd=tmp_path,
    ).ok()  # fmt: skip
    before = database_rows(data / "pdg.sqlite3")

    good = credit_code(2)
    wrong_check = good[:17] + ("0" if good[17] != "0" else "1")
    (tmp_path / "bad.toml").write_text("[server\nport = 1\n", encoding="utf-8")
    (tmp_path / "wrong.toml").write_text("[server]\nport = 'eighty'\n", encoding="utf-8")
    (tmp_path / "a-folder.toml").mkdir()
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00{")
    licence_flags = [
        "--dataset", "ent-registry", "--purpose", "industrial", "--max-classification", "1",
        "--valid-from", "2025-01-01T00:00:00Z", "--valid-until", "2030-01-01T00:00:00Z",
        "--security-officer", "Li",
    ]  # fmt: skip
    new_dataset = ["dataset", "create", "--id", "d4", *DATASET_FLAGS, "--split", "1,0,0"]
    new_licence = ["licence", "create", "--licensee", "first", *licence_flags]
    cases: list[tuple[list[str], int | None, str]] = [
        (["licensee", "create", "--name", "X", "--credit-code", wrong_check], 1, "credit_code"),
        (["licensee", "create", "--name", "X", "--credit-code", existing], 1, "already exists"),
        (["dataset", "create", "--id", "d1", *DATASET_FLAGS, "--split", "0.5,0.5"], 2, "--split"),
        (["dataset", "create", "--id", "d2", *DATASET_FLAGS, "--split", "0.6,0.3,0.2"], 1, "revenue_split"),
        (["dataset", "create", "--id", "d3", *DATASET_FLAGS[:-4], "--split", "1,0,0"], 1, "classification"),
        ([*new_dataset, "--classification", "7"], 1, "classification"),
        ([*new_dataset, "--per-call-fen", "0.00001"], 1, "price.per_call_fen"),
        (["dataset", "create", "--file", "binary.json"], 1, "binary.json"),
        (["licence", "create", "--licensee", "nobody", *licence_flags], 1, "licensee_id"),
        ([*new_licence, "--valid-until", "2020-01-01T00:00:00Z"], 1, "valid_until"),
        (["app", "create", "--licensee", "first"], 1, "name"),
        (["dataset", "list", "--config", "a-folder.toml"], 1, "a-folder.toml"),
        (["dataset", "list", "--config", "missing.toml"], 1, "missing.toml"),
        (["dataset", "list", "--config", "bad.toml"], 1, "bad.toml"),
        (["--config", "wrong.toml", "dataset", "list"], 1, "server.port"),
        (["licence", "suspend", "nope"], 1, "nope"),
    ]  # fmt: skip
    runs = run_all([args for args, _, _ in cases], env, tmp_path)
    runs.append(pdg("dataset", "list", env={**env, "PDG_PORT": "eighty"}, cwd=tmp_path))
    cases.append((["PDG_PORT=eighty"], 1, "server.port"))
    for run, (_, code, mentions) in zip(runs, cases, strict=True):
        run.failed(code=code, mentions=mentions)
    assert database_rows(data / "pdg.sqlite3") == before


# -- PostgreSQL, and a gateway sharing the database --------------------------------------------


async def test_schema_commands_and_a_write_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    env = environment(tmp_path / "data", PDG_DATABASE_URL=postgres_url)
    upgraded = (await apdg("db", "upgrade", "--json", env=env, cwd=tmp_path)).json()
    current = (await apdg("db", "current", "--json", env=env, cwd=tmp_path)).json()
    assert current["revision"] == current["head"] == upgraded["revision"]
    assert current["revision"]

    spec = {
        "id": "pg-ds",
        "name": "On PostgreSQL",
        "provider": "p",
        "upstream_url": "https://example.com/api",
        "classification": 1,
        "open_class": "open",
        "revenue_split": {"provider": "0.7", "operator": "0.3", "public_fund": "0"},
    }
    (tmp_path / "ds.json").write_text(json.dumps(spec), encoding="utf-8")
    created, duplicate = [
        await apdg("dataset", "create", "--file", "ds.json", "--json", env=env, cwd=tmp_path)
        for _ in range(2)
    ]
    assert created.json()["id"] == "pg-ds"
    assert "already exists" in duplicate.failed(code=1)
    # Nothing of the embedded default was made.
    assert not (tmp_path / "data" / "pdg.sqlite3").exists()


async def test_cli_changes_reach_a_gateway_on_the_same_database(world: World, tmp_path: Path) -> None:
    ds, licence, _app, token = await world.licensed()
    status, body, _ = await world.call(f"/data/{ds['id']}/x", token)
    assert status == 200, body
    env = environment(tmp_path / "cli-data", PDG_DATABASE_URL=world.backend.database_url)

    suspended = (await apdg("licence", "suspend", licence["id"], "--json", env=env, cwd=tmp_path)).json()
    assert suspended["status"] == "suspended"
    async with world.client.get(f"/admin/v1/licences/{licence['id']}", headers=world.admin) as resp:
        assert (await resp.json())["status"] == "suspended"
    # Every replica refuses calls on a suspended licence within 2 seconds.
    deadline = time.monotonic() + 2.5
    while True:
        status, body, _ = await world.call(f"/data/{ds['id']}/x", token)
        if status != 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert status == 403, body
    assert body["code"] == "licence-inactive"

    created = await apdg(
        "dataset", "create", "--id", "from-cli", *DATASET_FLAGS, "--split", "0.5,0.5,0", "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert created.json()["id"] == "from-cli"
    async with world.client.get("/admin/v1/datasets/from-cli", headers=world.admin) as resp:
        assert resp.status == 200
        assert (await resp.json())["revenue_split"]["public_fund"] == "0"
