"""The console over HTTP, on both backends (the browser suite is
test_console_browser.py): sign-in, cookies, CSRF, lock-out, TOTP, session
expiry, role checks, the licence actions and their audit trail, the
console-user commands, and the two languages' tables."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from console import ROLES
from console.i18n import CATALOGUES
from console.users import ConsoleUsers, totp_code
from console.web import ACTIONS
from gateway.state import ENGINE, SESSIONS
from ledger import admin_log
from licensing.schemas import PURPOSES
from storage.db import utcnow
from tests.conftest import World
from tests.test_cli import environment, pdg, run_all

PASSWORD = "correct horse battery"
Client = TestClient[Any, Any]


def _users(world: World) -> ConsoleUsers:
    return ConsoleUsers(world.app[SESSIONS], world.settings.console)


async def _csrf(client: Client, path: str = "/console/login") -> str:
    async with client.get(path) as resp:
        text = await resp.text()
    match = re.search(r'name="csrf" value="([0-9a-f]*)"', text)
    assert match, text
    return match.group(1)


async def _sign_in(client: Client, username: str, password: str = PASSWORD) -> aiohttp.ClientResponse:
    """Sign in afresh (a browser of its own: no cookies of an earlier one)."""
    client.session.cookie_jar.clear()
    form = {"csrf": await _csrf(client), "username": username, "password": password, "next": "/console/"}
    async with client.post("/console/login", data=form, allow_redirects=False) as resp:
        await resp.read()
        return resp


async def _log(world: World, action: str) -> list[dict[str, Any]]:
    return [e for e in await admin_log.read(world.app[ENGINE], limit=10_000) if e["action"] == action]


async def test_sign_in_cookies_and_csrf(world: World) -> None:
    await _users(world).add("ops", "licence-admin", password=PASSWORD)
    client = world.client
    async with client.get("/console/", allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/console/login?next=/console/"

    # No token, a token of another cookie, another origin: 403, no session.
    async with client.post("/console/login", data={"username": "ops", "password": PASSWORD}) as resp:
        assert resp.status == 403
        assert resp.content_type == "text/html"
        assert "pdg_console" not in resp.cookies
    token = await _csrf(client)
    async with client.post(
        "/console/login",
        data={"csrf": token, "username": "ops", "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
    ) as resp:
        assert resp.status == 403
    async with client.post(
        "/console/login", data={"csrf": "0" * 64, "username": "ops", "password": PASSWORD}
    ) as resp:
        assert resp.status == 403
    assert await _log(world, "console.sign-in") == []  # refused before any check

    resp = await _sign_in(client, "ops")
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/"
    cookie = next(v for v in resp.headers.getall("Set-Cookie") if v.startswith("pdg_console="))
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/console/" in cookie
    assert "Secure" not in cookie
    async with client.get("/console/") as resp:
        assert resp.status == 200
        assert "no-store" in resp.headers["Cache-Control"]
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert "script-src" not in resp.headers["Content-Security-Policy"]  # default-src 'none'
    # A signed-in form without its token changes nothing.
    async with client.post("/console/logout", data={}) as resp:
        assert resp.status == 403
    async with client.get("/console/", allow_redirects=False) as resp:
        assert resp.status == 200
    entries = await _log(world, "console.sign-in")
    assert [e["after"]["outcome"] for e in entries] == ["ok"]
    assert entries[0]["actor"] == "console:ops"
    assert PASSWORD not in str(await admin_log.read(world.app[ENGINE], limit=10_000))
    # Sign out: the session is gone on the server too.
    async with client.post("/console/logout", data={"csrf": await _csrf(client, "/console/")}) as resp:
        assert resp.status == 200  # followed to the sign-in page
    async with client.get("/console/", allow_redirects=False) as resp:
        assert resp.status == 303


async def test_secure_cookies_when_the_setting_says_so(
    world_factory: Callable[..., Coroutine[Any, Any, World]],
) -> None:
    world = await world_factory(console__secure_cookies=True)
    await _users(world).add("ops", "viewer", password=PASSWORD)
    async with world.client.get("/console/login") as resp:
        assert "Secure" in resp.headers["Set-Cookie"]


async def test_lock_out_after_failures_and_reset(world: World) -> None:
    users = _users(world)
    await users.add("ops", "viewer", password=PASSWORD)
    limit = world.settings.console.lockout_failures
    for _ in range(limit):
        resp = await _sign_in(world.client, "ops", "wrong password!")
        assert resp.status == 401
    resp = await _sign_in(world.client, "ops")
    assert resp.status == 401  # locked: the right password is refused too
    resp = await _sign_in(world.client, "nobody")
    assert resp.status == 401
    outcomes = [e["after"]["outcome"] for e in await _log(world, "console.sign-in")]
    assert outcomes == ["wrong-password"] * (limit - 1) + ["locked-now", "locked", "unknown-user"]
    new = await users.reset("ops")
    resp = await _sign_in(world.client, "ops", new)
    assert resp.status == 303
    # Disabled: its sessions end, and it cannot sign in.
    await users.disable("ops")
    async with world.client.get("/console/", allow_redirects=False) as resp:
        assert resp.status == 303
    assert (await _sign_in(world.client, "ops", new)).status == 401


async def test_totp_step(world: World) -> None:
    created = await _users(world).add("ops", "licence-admin", password=PASSWORD, totp=True)
    assert created.totp_secret is not None
    assert created.totp_uri is not None
    assert created.totp_uri.startswith("otpauth://totp/")
    client = world.client
    resp = await _sign_in(client, "ops")
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/console/login/totp")
    # The password alone does not sign in.
    async with client.get("/console/", allow_redirects=False) as resp:
        assert resp.status == 303
    token = await _csrf(client, "/console/login/totp")
    async with client.post("/console/login/totp", data={"csrf": token, "code": "000000"}) as resp:
        assert resp.status == 401
    code = totp_code(created.totp_secret, utcnow())
    async with client.post(
        "/console/login/totp",
        data={"csrf": token, "code": code, "next": "/console/licences"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/console/licences"
    async with client.get("/console/licences") as resp:
        assert resp.status == 200
    # The same code is never accepted twice.
    await _sign_in(client, "ops")
    token = await _csrf(client, "/console/login/totp")
    async with client.post("/console/login/totp", data={"csrf": token, "code": code}) as resp:
        assert resp.status == 401
    outcomes = [e["after"]["outcome"] for e in await _log(world, "console.sign-in")]
    assert outcomes == ["password-ok", "wrong-code", "ok", "password-ok", "wrong-code"]


async def test_sessions_end_when_idle_or_old(world: World) -> None:
    users = _users(world)
    await users.add("ops", "viewer", password=PASSWORD)
    settings = world.settings.console
    now = utcnow()
    signed = await users.sign_in("ops", PASSWORD, address="127.0.0.1", now=now)
    assert signed.token is not None
    assert await users.principal(signed.token, now) is not None
    idle = now + timedelta(seconds=settings.idle_timeout_seconds + 1)
    assert await users.principal(signed.token, idle) is None
    assert await users.principal(signed.token, now) is None  # forgotten, not only refused
    # Kept busy, it still ends at its longest life.
    signed = await users.sign_in("ops", PASSWORD, address="127.0.0.1", now=now)
    assert signed.token is not None
    step = timedelta(seconds=settings.idle_timeout_seconds - 5)
    at = now
    while at + step < now + timedelta(seconds=settings.session_max_seconds):
        at += step
        assert await users.principal(signed.token, at) is not None
    assert await users.principal(signed.token, at + step) is None


async def test_roles_and_licensee_scope(world: World) -> None:
    ds = await world.dataset()
    mine, theirs = await world.licensee(), await world.licensee(name="Other Co")
    await world.licence(mine["id"], [ds["id"]])
    their_app = await world.app_client(theirs["id"])
    users = _users(world)
    await users.add("viewer", "viewer", password=PASSWORD)
    await users.add("dev", "developer", licensee_id=mine["id"], password=PASSWORD)

    await _sign_in(world.client, "viewer")
    for path in ("/console/datasets", f"/console/datasets/{ds['id']}", "/console/licences", "/console/apps"):
        async with world.client.get(path) as resp:
            assert resp.status == 200, path
    async with world.client.get("/console/licences/new") as resp:
        assert resp.status == 403
    token = await _csrf(world.client, "/console/licences")
    async with world.client.post(
        "/console/licences", data={"csrf": token, "licensee_id": mine["id"]}
    ) as resp:
        assert resp.status == 403
    async with world.client.get("/console/portal/") as resp:
        assert resp.status == 403

    await _sign_in(world.client, "dev")
    async with world.client.get("/console/", allow_redirects=False) as resp:
        assert resp.headers["Location"] == "/console/portal/"
    for path, status in (
        ("/console/portal/", 200),
        (f"/console/portal/datasets/{ds['id']}", 200),
        (f"/console/portal/apps/{their_app['id']}", 404),
        (f"/console/licensees/{theirs['id']}", 403),
        ("/console/apps", 403),
    ):
        async with world.client.get(path) as resp:
            assert resp.status == status, path
            assert "Other Co" not in await resp.text()
    token = await _csrf(world.client, "/console/portal/")
    async with world.client.post(
        f"/console/portal/apps/{their_app['id']}/rotate",
        data={"csrf": token, "overlap_seconds": "0", "confirm": "yes"},
    ) as resp:
        assert resp.status == 404
    assert await _log(world, "app.rotate-secret") == []


async def test_licence_actions_need_a_reason_and_are_logged(world: World) -> None:
    ds = await world.dataset()
    licensee = await world.licensee()
    licence = await world.licence(licensee["id"], [ds["id"]])
    await _users(world).add("ops", "licence-admin", password=PASSWORD)
    await _sign_in(world.client, "ops")
    path = f"/console/licences/{licence['id']}/suspend"
    token = await _csrf(world.client, path)
    async with world.client.post(path, data={"csrf": token, "reason": "  "}) as resp:
        assert resp.status == 400
    async with world.client.get(f"/admin/v1/licences/{licence['id']}", headers=world.admin) as resp:
        assert (await resp.json())["status"] == "active"
    async with world.client.post(
        path, data={"csrf": token, "reason": "安全检查"}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == f"/console/licences/{licence['id']}?done=suspend"
    [change] = await _log(world, "licence.suspend")
    assert change["actor"] == "console:ops (licence-admin)"
    assert change["after"]["status"] == "suspended"
    [reason] = await _log(world, "licence.suspend.reason")
    assert reason["after"] == {"reason": "安全检查"}
    assert reason["target"] == licence["id"]
    # Revoked is final: resuming it is a conflict, shown as a page.
    revoke = f"/console/licences/{licence['id']}/revoke"
    async with world.client.post(revoke, data={"csrf": token, "reason": "违约"}) as resp:
        assert resp.status == 200
    resume = f"/console/licences/{licence['id']}/resume"
    async with world.client.post(resume, data={"csrf": token, "reason": "试试"}) as resp:
        assert resp.status == 409
        assert resp.content_type == "text/html"
    async with world.client.get(f"/console/licences/{licence['id']}/rename") as resp:
        assert resp.status == 404


def test_console_user_commands(tmp_path: Path) -> None:
    env = environment(tmp_path / "data")
    added = pdg("console-user", "add", "ops", "--role", "licence-admin", "--json", env=env, cwd=tmp_path)
    created = added.json()
    assert created["role"] == "licence-admin"
    assert len(created["password"]) >= 20
    runs = run_all(
        [
            ["console-user", "add", "dev", "--role", "developer"],
            ["console-user", "add", "x y", "--role", "viewer"],
            ["console-user", "add", "ops", "--role", "viewer"],
            ["console-user", "add", "eve", "--role", "root"],
            ["console-user", "disable", "nobody"],
        ],
        env,
        tmp_path,
    )
    assert "licensee" in runs[0].failed()
    assert "username" in runs[1].failed()
    assert "already exists" in runs[2].failed()
    runs[3].failed(code=2)
    assert "nobody" in runs[4].failed()
    piped = run_all(
        [
            ["console-user", "add", "aud", "--role", "auditor", "--password-stdin", "--totp", "--json"],
            ["console-user", "reset", "ops", "--password-stdin", "--json"],
        ],
        env,
        tmp_path,
        stdin="a long enough password\n",
    )
    assert "password" not in piped[0].json()
    assert piped[0].json()["totp_uri"].startswith("otpauth://totp/pdg:aud?")
    assert piped[1].json() == {"username": "ops"}
    short = run_all(
        [["console-user", "add", "tiny", "--role", "viewer", "--password-stdin"]], env, tmp_path, "short\n"
    )
    assert "12 characters" in short[0].failed()
    listed = (pdg("console-user", "list", "--json", env=env, cwd=tmp_path)).json()
    assert [(u["username"], u["role"], u["totp"]) for u in listed] == [
        ("aud", "auditor", True),
        ("ops", "licence-admin", False),
    ]
    with sqlite3.connect(tmp_path / "data" / "pdg.sqlite3") as conn:
        entries = [json.loads(body) for (body,) in conn.execute("SELECT body FROM admin_log ORDER BY seq")]
    assert [e["action"] for e in entries] == [
        "console-user.create",
        "console-user.create",
        "console-user.reset",
    ]
    assert all(e["actor"].startswith("cli:") for e in entries)
    text = str(entries)
    assert created["password"] not in text
    assert "a long enough password" not in text
    assert "totp_secret" not in text


def test_both_languages_have_every_word() -> None:
    assert set(CATALOGUES["zh"]) == set(CATALOGUES["en"])
    templates = Path(__file__).parents[1] / "console" / "templates"
    used = {
        m
        for page in templates.glob("*.html")
        for m in re.findall(r't\("([a-z0-9_.-]*[a-z0-9])"', page.read_text())
    }
    assert used
    assert used <= set(CATALOGUES["en"]), used - set(CATALOGUES["en"])
    dynamic = [f"role.{r}" for r in ROLES] + [f"purpose.{p}" for p in PURPOSES]
    dynamic += [f"status.{s}" for s in ("active", "suspended", "revoked", "expired")]
    dynamic += [f"open_class.{c}" for c in ("open", "conditional", "closed")] + ["unit.calls", "unit.fen"]
    dynamic += [f"{k}.{a}" for a in ACTIONS for k in ("action", "confirm", "confirm.button", "done")]
    assert set(dynamic) <= set(CATALOGUES["en"]), set(dynamic) - set(CATALOGUES["en"])
