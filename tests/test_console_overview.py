"""The console's overview and the developer portal's keys, invoices and
statement: over HTTP on both backends, from real calls through the gateway,
and once in a real browser, which writes a screenshot of each page it shows
to ``$PDG_TEST_SCREENSHOTS`` (default ``tests/.screenshots``). The README's
pictures are made with::

    PDG_TEST_SCREENSHOTS=docs pytest tests/test_console_overview.py -k browser
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.state import ADMIN_TOKENS, ENGINE
from ledger import admin_log
from licensing.schemas import AdminTokenIn
from tests.conftest import World
from tests.test_console import PASSWORD, Client, _csrf, _sign_in, _users
from tests.test_ledger import records_of
from tests.test_oauth import KeyClient, post_token, public_jwk

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(os.environ.get("PDG_TEST_SCREENSHOTS") or Path(__file__).parent / ".screenshots")


def _figure(page: str, chart: str) -> str:
    match = re.search(rf'<figure class="chart" id="{chart}">(.*?)</figure>', page, re.S)
    assert match, chart
    return match.group(1)


def _table(figure: str) -> tuple[list[str], list[list[str]]]:
    """A chart's table: its column heads, and each row's cells (head first)."""
    heads = re.findall(r'<th scope="col">(.*?)</th>', figure)
    rows = [
        re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)
        for row in re.findall(r"<tr>(.*?)</tr>", figure.split("<tbody>", 1)[1])
    ]
    return heads, rows


def _column_sums(figure: str) -> dict[str, int]:
    heads, rows = _table(figure)
    return {head: sum(int(row[n]) for row in rows) for n, head in enumerate(heads) if n}


async def _shot(page: Any, name: str) -> None:
    """A screenshot of the whole page once its fonts have loaded."""
    await page.evaluate("document.fonts.ready.then(() => true)")
    await page.screenshot(path=str(SHOTS / name), full_page=True)


async def _page(client: Client, path: str) -> tuple[int, str]:
    async with client.get(path) as resp:
        return resp.status, await resp.text()


async def _calls(world: World) -> dict[str, Any]:
    """Six calls: five of one licensee on one dataset (two free, one paid,
    one refused, one failed upstream) and one of another on another."""
    ds = await world.dataset(name="企业登记信息", free_monthly_calls=5)
    mine = await world.licensee(name="星河数据科技有限公司")
    licence = await world.licence(
        mine["id"], [ds["id"]], paid={"prepaid_calls": 1000, "prepaid_unit_price_fen": "2.5"}
    )
    app = await world.app_client(mine["id"])
    free = await world.token(app, f"purpose:public-interest dataset:{ds['id']}")
    paid = await world.token(app, f"purpose:industrial dataset:{ds['id']}")
    for token, path, method, expected in (
        (free, "x", "GET", 200),
        (free, "y", "GET", 200),
        (paid, "x", "GET", 200),
        (free, "x", "DELETE", 405),
        (free, "status/503", "GET", 502),
    ):
        status, body, _ = await world.call(f"/data/{ds['id']}/{path}", token, method=method)
        assert status == expected, body
    other_ds = await world.dataset(name="公交实时位置")
    theirs = await world.licensee(name="Other Co")
    await world.licence(theirs["id"], [other_ds["id"]])
    their_app = await world.app_client(theirs["id"])
    token = await world.token(their_app, f"purpose:public-interest dataset:{other_ds['id']}")
    status, body, _ = await world.call(f"/data/{other_ds['id']}/x", token)
    assert status == 200, body
    assert len(await records_of(world, 6)) == 6
    return {"dataset": ds, "licence": licence, "mine": mine, "theirs": theirs}


async def test_overview_charts_count_the_call_record(world: World) -> None:
    await _calls(world)
    await _users(world).add("viewer", "viewer", password=PASSWORD)
    await _sign_in(world.client, "viewer")
    status, page = await _page(world.client, "/console/?lang=en")
    assert status == 200

    calls = _figure(page, "chart-calls")
    assert '<svg xmlns="http://www.w3.org/2000/svg" role="img"' in calls
    assert 'aria-labelledby="chart-calls-t chart-calls-d"' in calls
    assert '<title id="chart-calls-t">Calls per day by dataset</title>' in calls
    assert "6 in all" in calls
    assert _column_sums(calls) == {"企业登记信息": 5, "公交实时位置": 1, "Total": 6}

    pools = _figure(page, "chart-pools")
    assert _column_sums(pools) == {"Free allowance": 3, "Paid (prepaid or credit)": 1, "Total": 4}
    assert "Free allowance (3)" in pools  # the legend, in the picture

    refusals = _figure(page, "chart-refusals")
    assert _table(refusals)[1] == [["method-not-allowed", "1"]]
    assert ">method-not-allowed</text>" in refusals
    assert ">1</text>" in refusals

    licensees = _figure(page, "chart-licensees")
    assert _table(licensees)[1] == [["星河数据科技有限公司", "5"], ["Other Co", "1"]]

    upstream = _figure(page, "chart-upstream")
    assert _column_sums(upstream) == {
        "Answered 5xx": 1,
        "Answered a redirect": 0,
        "No answer in time": 0,
        "Total": 1,
    }

    # The ledger: what the writer stored and what waits; no verification record.
    assert re.search(r'id="ledger-stored">6<', page)
    assert re.search(r'id="ledger-backlog">\d+<', page)
    assert "Never verified here" in page

    # Another window: a month long past holds none of them.
    status, page = await _page(world.client, "/console/?lang=en&from=2020-01-01&to=2020-01-31")
    assert status == 200
    assert _table(_figure(page, "chart-calls"))[1] == [["No calls in these days."]]
    assert "0 in all" in page
    for query in ("from=2020-13-01", "from=2024-02-01&to=2024-01-01", "from=2020-01-01&to=2024-01-01"):
        status, page = await _page(world.client, f"/console/?lang=en&{query}")
        assert status == 400, query
        assert "Traceback" not in page


async def test_portal_charts_count_only_the_developers_own_calls(world: World) -> None:
    made = await _calls(world)
    await _users(world).add("dev", "developer", licensee_id=made["mine"]["id"], password=PASSWORD)
    await _sign_in(world.client, "dev")
    status, page = await _page(world.client, "/console/portal/?lang=en")
    assert status == 200
    # Its five calls; the other licensee's one is not there, nor its dataset.
    assert _column_sums(_figure(page, "chart-calls")) == {"企业登记信息": 5, "Total": 5}
    assert "公交实时位置" not in page
    assert _column_sums(_figure(page, "chart-pools")) == {
        "Free allowance": 2,
        "Paid (prepaid or credit)": 1,
        "Total": 3,
    }


async def test_overview_is_the_operating_companys(world: World) -> None:
    licensee = await world.licensee()
    await _users(world).add("dev", "developer", licensee_id=licensee["id"], password=PASSWORD)
    await _sign_in(world.client, "dev")
    async with world.client.get("/console/?from=2020-01-01", allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/console/portal/"
    world.client.session.cookie_jar.clear()
    async with world.client.get("/console/", allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"].startswith("/console/login")


async def _top_up(world: World, licence_id: str, finance: dict[str, str], calls: int) -> None:
    async with world.client.post(
        f"/admin/v1/licences/{licence_id}/top-ups", json={"calls": calls}, headers=finance
    ) as resp:
        assert resp.status == 201, await resp.text()


async def _invoices_of(world: World, licensee_id: str) -> list[dict[str, Any]]:
    async with world.client.get(f"/admin/v1/invoices?licensee={licensee_id}", headers=world.admin) as resp:
        found: list[dict[str, Any]] = await resp.json()
    return found


async def test_developer_sees_only_its_own_invoices_and_statement(world: World) -> None:
    ds = await world.dataset()
    mine, theirs = await world.licensee(name="星河数据科技有限公司"), await world.licensee(name="Other Co")
    terms = {"paid": {"prepaid_calls": 10, "prepaid_unit_price_fen": "2.5"}}
    my_licence = await world.licence(mine["id"], [ds["id"]], **terms)
    their_licence = await world.licence(theirs["id"], [ds["id"]], **terms)
    finance = {
        "Authorization": "Bearer "
        + (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    }
    await _top_up(world, my_licence["id"], finance, 400)  # 400 x 2.5 fen = 10.00 yuan, before VAT
    await _top_up(world, their_licence["id"], finance, 4000)
    [my_invoice] = await _invoices_of(world, mine["id"])
    [their_invoice] = await _invoices_of(world, theirs["id"])
    users = _users(world)
    await users.add("dev", "developer", licensee_id=mine["id"], password=PASSWORD)
    await users.add("viewer", "viewer", password=PASSWORD)

    await _sign_in(world.client, "dev")
    status, page = await _page(world.client, "/console/portal/invoices?lang=en")
    assert status == 200
    assert f'id="invoice-{my_invoice["id"]}"' in page
    assert their_invoice["id"] not in page
    assert "Other Co" not in page
    status, page = await _page(world.client, f"/console/portal/invoices/{my_invoice['id']}")
    assert status == 200
    assert my_invoice["number"] in page
    assert re.search(r'id="invoice-total">¥[\d,]+\.\d\d<', page)
    async with world.client.get(f"/console/portal/invoices/{my_invoice['id']}/pdf") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/pdf"
        assert (await resp.read()).startswith(b"%PDF")
    for path in (
        f"/console/portal/invoices/{their_invoice['id']}",
        f"/console/portal/invoices/{their_invoice['id']}/pdf",
        "/console/portal/invoices/inv-nothing",
    ):
        status, page = await _page(world.client, path)
        assert status == 404, path
        assert "Other Co" not in page
        assert their_invoice["number"] not in page

    status, page = await _page(world.client, "/console/portal/statement?lang=en")
    assert status == 200
    assert my_invoice["number"] in page
    assert their_invoice["number"] not in page
    closing = re.search(r'id="statement-balance">¥([\d,]+\.\d\d)<', page)
    assert closing
    assert int(closing.group(1).replace(",", "").replace(".", "")) == my_invoice["total_fen"]
    async with world.client.get("/console/portal/statement/pdf") as resp:
        assert resp.status == 200
        assert (await resp.read()).startswith(b"%PDF")
    status, page = await _page(world.client, "/console/portal/statement?from_month=2024-13")
    assert status == 400

    # The operating company's staff use the finance pages, not the portal.
    await _sign_in(world.client, "viewer")
    for path in ("/console/portal/invoices", f"/console/portal/invoices/{my_invoice['id']}"):
        status, _ = await _page(world.client, path)
        assert status == 403, path


async def test_developer_registers_and_replaces_public_keys(world: World) -> None:
    ds = await world.dataset()
    mine, theirs = await world.licensee(), await world.licensee(name="Other Co")
    await world.licence(mine["id"], [ds["id"]])
    their_app = await world.app_client(theirs["id"])
    secret_app = await world.app_client(mine["id"])
    await _users(world).add("dev", "developer", licensee_id=mine["id"], password=PASSWORD)
    await _sign_in(world.client, "dev")
    token = await _csrf(world.client, "/console/portal/keys/new")
    first = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [public_jwk(first, kid="first", use="sig")]}

    # Bad keys: the form again, with what was wrong; nothing registered.
    private = json.loads(json.dumps(jwks))
    private["keys"][0]["d"] = "AAAA"
    for text in ("not json", json.dumps([1]), json.dumps(private)):
        async with world.client.post(
            "/console/portal/keys", data={"csrf": token, "name": "调度大屏", "jwks": text}
        ) as resp:
            assert resp.status == 400, text
            assert "jwks" in await resp.text()
    assert [a["id"] for a in await _apps(world, mine["id"])] == [secret_app["id"]]

    async with world.client.post(
        "/console/portal/keys",
        data={"csrf": token, "name": "调度大屏", "jwks": json.dumps(jwks)},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        match = re.fullmatch(r"/console/portal/apps/([^/]+)/jwks\?done=created", resp.headers["Location"])
        assert match, resp.headers["Location"]
    app_id = match.group(1)
    status, page = await _page(world.client, f"/console/portal/apps/{app_id}/jwks")
    assert status == 200
    assert "<code>first</code>" in page
    endpoint = f"{world.settings.public_url}/oauth/token"
    scope = f"purpose:public-interest dataset:{ds['id']}"
    old = KeyClient({"client_id": app_id}, first, "first", "ES256", endpoint)
    assert (await post_token(world, old.form(scope)))[0] == 200

    second = ec.generate_private_key(ec.SECP256R1())
    replaced = {"keys": [public_jwk(second, kid="second", use="sig")]}
    async with world.client.post(
        f"/console/portal/apps/{app_id}/jwks", data={"csrf": token, "jwks": json.dumps(replaced)}
    ) as resp:
        assert resp.status == 200  # followed to the page, with the notice
        text = await resp.text()
        assert "<code>second</code>" in text
        assert "<code>first</code>" not in text
    new = KeyClient({"client_id": app_id}, second, "second", "ES256", endpoint)
    assert (await post_token(world, new.form(scope)))[0] == 200
    assert (await post_token(world, old.form(scope)))[0] == 401
    [entry] = [
        e for e in await admin_log.read(world.app[ENGINE], limit=1000) if e["action"] == "app.set-jwks"
    ]
    assert entry["actor"] == "console:dev (developer)"
    assert entry["target"] == app_id
    assert entry["before"]["jwks"]["keys"][0]["kid"] == "first"
    assert entry["after"]["jwks"]["keys"][0]["kid"] == "second"

    # Another licensee's app is not there; a secret app takes no keys.
    for path in (f"/console/portal/apps/{their_app['id']}/jwks",):
        status, page = await _page(world.client, path)
        assert status == 404
        assert "Other Co" not in page
    async with world.client.post(
        f"/console/portal/apps/{their_app['id']}/jwks", data={"csrf": token, "jwks": json.dumps(replaced)}
    ) as resp:
        assert resp.status == 404
    async with world.client.post(
        f"/console/portal/apps/{secret_app['id']}/jwks", data={"csrf": token, "jwks": json.dumps(replaced)}
    ) as resp:
        assert resp.status == 409
    async with world.client.post(f"/console/portal/apps/{app_id}/jwks", data={"jwks": "{}"}) as resp:
        assert resp.status == 403  # no CSRF token
    assert len([e for e in await admin_log.read(world.app[ENGINE]) if e["action"] == "app.set-jwks"]) == 1

    # The admin API replaces them the same way.
    async with world.client.put(
        f"/admin/v1/apps/{app_id}/jwks", json={"jwks": jwks}, headers=world.admin
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["auth_method"] == "private_key_jwt"
    assert (await post_token(world, old.form(scope)))[0] == 200
    async with world.client.put(
        f"/admin/v1/apps/{secret_app['id']}/jwks", json={"jwks": jwks}, headers=world.admin
    ) as resp:
        assert resp.status == 409
        assert (await resp.json())["code"] == "conflict"


async def _apps(world: World, licensee_id: str) -> list[dict[str, Any]]:
    async with world.client.get(f"/admin/v1/apps?licensee={licensee_id}", headers=world.admin) as resp:
        found: list[dict[str, Any]] = await resp.json()
    return found


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.xdist_group("browser")
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="Chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
)
async def test_browser_overview_and_portal(world: World) -> None:
    from playwright.async_api import Page, async_playwright

    made = await _calls(world)
    licence = made["licence"]
    finance = {
        "Authorization": "Bearer "
        + (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    }
    await _top_up(world, licence["id"], finance, 2000)
    [invoice] = await _invoices_of(world, made["mine"]["id"])
    users = _users(world)
    await users.add("ops", "licence-admin", password=PASSWORD)
    await users.add("dev", "developer", licensee_id=made["mine"]["id"], password=PASSWORD)
    await asyncio.to_thread(SHOTS.mkdir, parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{world.client.server.port}"

    async def sign_in(page: Page, username: str) -> None:
        await page.goto(f"{base}/console/login")
        await page.fill("input[name=username]", username)
        await page.fill("input[name=password]", PASSWORD)
        await page.click("form[action='/console/login'] button[type=submit]")
        await page.wait_for_load_state()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = await browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            await sign_in(page, "ops")
            assert page.url.endswith("/console/")
            assert await page.inner_text("h1") == "概览"
            assert await page.locator("figure.chart svg[role=img]").count() == 5
            assert "method-not-allowed" in (await page.text_content("#chart-refusals svg") or "")
            assert await page.inner_text("#ledger-stored") == "6"
            await _shot(page, "console-overview.png")

            developer = await browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 800})
            page = await developer.new_page()
            await sign_in(page, "dev")
            assert page.url.endswith("/console/portal/")
            row = f"#usage-{licence['id']}-{made['dataset']['id']}"
            assert await page.inner_text(f"{row} .used") == "2"  # the free allowance's bar
            await _shot(page, "console-portal.png")
            await page.click("a[href='/console/portal/invoices']")
            await page.wait_for_load_state()
            await page.click(f"a[href='/console/portal/invoices/{invoice['id']}']")
            await page.wait_for_load_state()
            assert invoice["number"] in await page.inner_text("h1")
            await _shot(page, "console-invoice.png")
        finally:
            await browser.close()
