"""The console in a real browser: Playwright driving Debian's Chromium
(``/usr/bin/chromium``, headless) against the gateway on a real port, on
the embedded backend. Each test writes a screenshot of every page it visits
to ``$PDG_TEST_SCREENSHOTS`` (default ``tests/.screenshots``).

Without Chromium the tests are skipped locally; in CI (``CI=true``) they
fail, as ``.ci/run`` installs it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from console.users import ConsoleUsers
from gateway.state import ENGINE, SESSIONS
from ledger import admin_log
from tests.browser_kit import MISSING, SKIP_REASON, Visit, chromium
from tests.conftest import World
from tests.test_console import PASSWORD

if MISSING:
    pytest.skip(SKIP_REASON, allow_module_level=True)

# The embedded backend only: the console's pages are the same on both, and
# the HTTP-level tests (test_console.py) run on both.
pytestmark = [
    pytest.mark.parametrize("backend", ["embedded"], indirect=True),
    pytest.mark.xdist_group("browser"),
    pytest.mark.timeout(120),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


async def _user(world: World, username: str, role: str, licensee: str | None = None) -> None:
    users = ConsoleUsers(world.app[SESSIONS], world.settings.console)
    await users.add(username, role, licensee_id=licensee, password=PASSWORD)


async def test_sign_in_language_lock_out_and_csrf(world: World, browser: Any) -> None:
    await _user(world, "ops", "licence-admin")
    await _user(world, "mallory", "viewer")
    visit = await Visit.open(browser, world, "signin")
    page = visit.page

    # Chinese by default; the switch turns the page English and stays so.
    await visit.go("/console/login", "login-zh")
    assert await page.inner_text("h1") == "登录"
    await page.click("#lang-switch")
    await visit.shot("login-en")
    assert await page.inner_text("h1") == "Sign in"
    await visit.sign_in("ops")
    assert page.url.endswith("/console/")
    await visit.shot("overview-en")
    assert await page.inner_text("h1") == "Overview"
    assert "ops" in await page.inner_text("header .who")
    await page.click("#lang-switch")
    assert await page.inner_text("h1") == "概览"
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["pdg_console"]
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/console/"
    assert not session["secure"]  # plain http on loopback

    # A form without its CSRF token is refused, and nothing happens: the
    # session is still there.
    await page.evaluate(
        "document.querySelector('form[action=\"/console/logout\"] input[name=csrf]').remove()"
    )
    async with page.expect_navigation():
        await page.click("form[action='/console/logout'] button")
    await visit.shot("csrf-refused")
    assert "403" in await page.inner_text("h1")
    response = await visit.go("/console/licences", "still-signed-in")
    assert response.status == 200
    assert page.url.endswith("/console/licences")

    # Wrong passwords lock the account out: then even the right one fails.
    other = await Visit.open(browser, world, "lockout")
    for _ in range(world.settings.console.lockout_failures):
        await other.sign_in("mallory", "not the password")
        assert "/console/login" in other.page.url
        assert await other.page.locator("p.error").count() == 1
    await other.sign_in("mallory")
    await other.shot("locked-out")
    assert "/console/login" in other.page.url
    assert await other.page.locator("p.error").count() == 1
    outcomes = [
        e["after"]["outcome"]
        for e in await admin_log.read(world.app[ENGINE], limit=1000)
        if e["action"] == "console.sign-in" and e["target"] == "mallory"
    ]
    assert outcomes[-2:] == ["locked-now", "locked"]


async def _signed_token(world: World, app: dict[str, Any], dataset: str) -> str:
    return await world.token(app, f"purpose:public-interest dataset:{dataset}")


async def test_issue_a_licence_then_suspend_it(world: World, browser: Any) -> None:
    await _user(world, "ops", "licence-admin")
    ds = await world.dataset(name="企业登记信息")
    licensee = await world.licensee(name="星河数据科技有限公司")
    visit = await Visit.open(browser, world, "licence")
    page = visit.page
    await visit.sign_in("ops")
    await visit.go("/console/datasets", "catalogue")
    assert ds["id"] in await page.inner_text("table")
    await visit.go(f"/console/datasets/{ds['id']}", "dataset")
    assert "企业登记信息" in await page.inner_text("h1")

    await visit.go("/console/licences/new", "issue-form")
    await page.select_option("select[name=licensee_id]", licensee["id"])
    await page.check(f"input[name=datasets][value='{ds['id']}']")
    await page.check("input[name=purposes][value='public-interest']")
    await page.fill("input[name=valid_from]", "2020-01-01")
    await page.fill("input[name=valid_until]", "2099-01-01")
    await page.fill("input[name=security_officer]", "李安全")
    await page.click("form[action='/console/licences'] button[type=submit]")
    await page.wait_for_load_state()
    await visit.shot("issued")
    match = re.search(r"/console/licences/([^/?]+)\?done=issue$", page.url)
    assert match, page.url
    licence_id = match.group(1)
    assert await page.inner_text(".status") == "有效"

    # The licensee's developer calls with it.
    app = await world.app_client(licensee["id"])
    token = await _signed_token(world, app, ds["id"])
    status, _, _ = await world.call(f"/data/{ds['id']}/x", token)
    assert status == 200

    # Suspend: a confirmation step asking for a reason.
    await page.click(f"a[href='/console/licences/{licence_id}/suspend']")
    await page.wait_for_load_state()
    await visit.shot("suspend-confirm")
    assert page.url.endswith(f"/console/licences/{licence_id}/suspend")
    await page.fill("textarea[name=reason]", "安全检查")
    await page.click(f"form[action='/console/licences/{licence_id}/suspend'] button[type=submit]")
    await page.wait_for_load_state()
    await visit.shot("suspended")
    assert await page.inner_text("h1 .status") == "已暂停"

    status, body, _ = await world.call(f"/data/{ds['id']}/x", token)
    assert status == 403
    assert body["code"] == "licence-inactive"


async def test_developer_registers_an_app_and_watches_its_quota(world: World, browser: Any) -> None:
    ds = await world.dataset(name="公交实时位置", free_monthly_calls=10)
    mine = await world.licensee(name="星河数据科技有限公司")
    licence = await world.licence(mine["id"], [ds["id"]])
    theirs = await world.licensee(name="Other Co")
    their_ds = await world.dataset(name="Theirs")
    await world.licence(theirs["id"], [their_ds["id"]])
    their_app = await world.app_client(theirs["id"])
    await _user(world, "dev", "developer", mine["id"])

    visit = await Visit.open(browser, world, "portal")
    page = visit.page
    await visit.sign_in("dev")
    assert page.url.endswith("/console/portal/")
    await visit.shot("portal-empty")

    await visit.go("/console/portal/apps/new", "new-app")
    await page.fill("input[name=name]", "调度大屏")
    await page.click("form[action='/console/portal/apps'] button[type=submit]")
    await page.wait_for_load_state()
    await visit.shot("secret-once")
    client_id = await page.inner_text("#client-id")
    secret = await page.inner_text("#client-secret")
    assert client_id
    assert len(secret) > 20

    token = await _signed_token(world, {"client_id": client_id, "client_secret": secret}, ds["id"])
    for _ in range(3):
        status, _, _ = await world.call(f"/data/{ds['id']}/x", token)
        assert status == 200

    row = f"#usage-{licence['id']}-{ds['id']}"
    for _ in range(50):  # the counters settle just after the responses
        await visit.go("/console/portal/", "portal")
        if await page.inner_text(f"{row} .used") == "3":
            break
        await asyncio.sleep(0.1)
    assert await page.inner_text(f"{row} .used") == "3"
    assert await page.inner_text(f"{row} .remaining") == "7"
    assert await page.get_attribute(f"{row} meter", "value") == "3"

    await visit.go(f"/console/portal/datasets/{ds['id']}", "docs")
    docs = await page.inner_text("main")
    assert "/oauth/token" in docs
    assert f"/data/{ds['id']}/" in docs

    # Another licensee's pages do not open.
    for path, status in (
        (f"/console/portal/apps/{their_app['id']}", 404),
        (f"/console/portal/datasets/{their_ds['id']}", 404),
        (f"/console/licensees/{theirs['id']}", 403),
        ("/console/licences", 403),
    ):
        response = await visit.go(path, f"refused-{status}")
        assert response.status == status, path
        assert "Other Co" not in await page.inner_text("body")
