"""Finance and auditors in the console, over a month of real calls through
the gateway (its clock stopped in November 2026, then moved past the month).

In a browser (Playwright driving Debian's Chromium, the embedded backend):
finance closes the period, reviews the drafts, issues them and downloads
the invoice's PDF and the period's CSV; an auditor traces a call by its id,
downloads its inclusion proof and verifies the ledger. Every page visited
is screenshotted to ``$PDG_TEST_SCREENSHOTS`` (default
``tests/.screenshots``).

Over HTTP, on both backends: the role table (a developer is refused every
finance page, a viewer reads but cannot close), the CSRF check on the close
form, a changed draft refused at issue with a clear message, notes and
payments typed in yuan, a top-up, and bad input answered with a 4xx page.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from billing import notes, payments
from billing.invoices import list_invoices
from billing.notes import list_notes
from billing.payments import list_payments
from console.i18n import CATALOGUES
from gateway.state import CLOCK, ENGINE, REGISTRY
from ledger import admin_log, audit
from licensing.keys import load_or_create_signing_key
from tests.browser_kit import MISSING, SKIP_REASON, Visit, chromium
from tests.conftest import World
from tests.test_console import PASSWORD, _csrf, _sign_in, _users
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

IN_NOV = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
AFTER_NOV = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

WorldFactory = Callable[..., Awaitable[World]]


@dataclass
class Month:
    """November's calls through the gateway, then the clock after November."""

    world: World
    clock: StoppedClock
    dataset: dict[str, Any]
    licensee: dict[str, Any]
    token: str
    call_ids: list[str] = field(default_factory=list)

    async def call(self, at: datetime = IN_NOV) -> str:
        self.clock.now = at
        status, body, resp = await self.world.call(f"/data/{self.dataset['id']}/records?n=2", self.token)
        assert status == 200, body
        self.call_ids.append(resp.headers["X-Call-Id"])
        await records_of(self.world, len(self.call_ids))
        self.clock.now = AFTER_NOV
        return self.call_ids[-1]


async def november(world_factory: WorldFactory, calls: int = 3) -> Month:
    world = await world_factory(
        ledger__checkpoint_seconds=0.2,
        billing__seller__name="城市公共数据运营有限公司",
        billing__seller__credit_code="91310000MA1K000007",
    )
    clock = StoppedClock(IN_NOV)
    world.app[CLOCK].source = clock
    dataset = await world.dataset(name="企业登记信息", price={"per_call_fen": "2.5", "per_record_fen": "0"})
    licensee = await world.licensee(name="星河数据科技有限公司")
    await world.licence(licensee["id"], [dataset["id"]], paid={"credit_limit_fen": 100_000})
    app = await world.app_client(licensee["id"])
    token = await world.token(app, f"purpose:industrial dataset:{dataset['id']}")
    month = Month(world, clock, dataset, licensee, token)
    for _ in range(calls):
        await month.call()
    return month


async def _post(world: World, path: str, data: dict[str, str], csrf_from: str) -> tuple[int, str, str]:
    """A form sent from ``csrf_from``'s page: status, Location, text."""
    form = {"csrf": await _csrf(world.client, csrf_from), **data}
    async with world.client.post(path, data=form, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Location", ""), await resp.text()


async def _get(world: World, path: str) -> tuple[int, str]:
    async with world.client.get(path, allow_redirects=False) as resp:
        return resp.status, await resp.text()


def _drafts_hash(page: str) -> str:
    match = re.search(r'name="drafts_hash" value="([0-9a-f]{64})"', page)
    assert match, page
    return match.group(1)


async def _log(world: World, action: str) -> list[dict[str, Any]]:
    return [e for e in await admin_log.read(world.app[ENGINE], limit=10_000) if e["action"] == action]


# -- over HTTP, on both backends ---------------------------------------------------------


async def test_roles_csrf_and_bad_input(world_factory: WorldFactory, tmp_path: Path) -> None:
    month = await november(world_factory, calls=1)
    world = month.world
    users = _users(world)
    for name, role in (("fin", "finance"), ("view", "viewer"), ("aud", "auditor")):
        await users.add(name, role, password=PASSWORD)
    await users.add("dev", "developer", licensee_id=month.licensee["id"], password=PASSWORD)
    period = "/console/finance/periods/2026-11"

    await _sign_in(world.client, "dev")
    for path in ("/console/finance/", period, "/console/finance/ageing", "/console/audit/"):
        status, _ = await _get(world, path)
        assert status == 403, path
    status, _, _ = await _post(world, f"{period}/close", {}, "/console/portal/")
    assert status == 403

    await _sign_in(world.client, "view")
    status, text = await _get(world, "/console/finance/")
    assert status == 200
    assert "2026-11" in text
    status, text = await _get(world, period)
    assert status == 200
    assert 'id="close-form"' not in text  # a viewer is not offered the form
    status, _, _ = await _post(world, f"{period}/close", {}, period)
    assert status == 403
    status, _ = await _get(world, "/console/audit/")
    assert status == 403  # audit:read is the auditor's

    await _sign_in(world.client, "fin")
    status, text = await _get(world, period)
    assert 'id="close-form"' in text
    # No token, a wrong one, another origin: refused before anything is done.
    async with world.client.post(f"{period}/close", data={}, allow_redirects=False) as resp:
        assert resp.status == 403
        assert resp.content_type == "text/html"
    async with world.client.post(f"{period}/close", data={"csrf": "0" * 64}, allow_redirects=False) as resp:
        assert resp.status == 403
    token = await _csrf(world.client, period)
    async with world.client.post(
        f"{period}/close", data={"csrf": token}, headers={"Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 403
    assert await _log(world, "billing.close") == []
    status, text = await _get(world, period)
    assert "period-open" in text

    for path, expected in (
        ("/console/finance/periods/2026-13", 400),
        ("/console/finance/periods/november", 400),
        ("/console/finance/periods/2026-13/export?format=csv", 400),
        ("/console/finance/periods/2026-11/export?format=pdf", 400),
        ("/console/finance/periods/2026-11/summary", 404),  # nothing billed yet
        ("/console/finance/periods/2026-11/reconciliation", 409),  # not closed
        ("/console/finance/invoices/inv-2026-11-nobody", 404),
        ("/console/finance/invoices/inv-2026-11-nobody/pdf", 404),
        ("/console/finance/licensees/nobody/statement", 404),
        (f"/console/finance/licensees/{month.licensee['id']}/statement?from_month=2026-99", 400),
        ("/console/finance/ageing?as_of=yesterday", 400),
        ("/console/finance/licences/lic-nope/prepaid", 404),
    ):
        status, text = await _get(world, path)
        assert status == expected, (path, text)
        assert "<h1>" in text
        assert "Traceback" not in text
    # A period that has not ended cannot be closed: a 409 page, nothing written.
    status, _, text = await _post(world, "/console/finance/periods/2026-12/close", {}, period)
    assert status == 409
    assert "has not ended" in text
    assert await _log(world, "billing.close") == []

    await _sign_in(world.client, "aud")
    for path, expected in (
        ("/console/audit/", 200),
        (f"/console/audit/calls/{month.call_ids[0]}", 200),
        ("/console/audit/calls/01234567-89ab-7def-8123-456789abcdef", 404),
        ("/console/audit/calls/01234567-89ab-7def-8123-456789abcdef/proof", 404),
        ("/console/audit/calls?call_id=", 400),
        ("/console/audit/export?format=xml", 400),
        ("/console/audit/export?from=2026-11-01&from_seq=1", 400),
        ("/console/audit/export?from_seq=99", 400),  # past the ledger's end
    ):
        status, text = await _get(world, path)
        assert status == expected, (path, text)
    status, _, _ = await _post(world, f"{period}/close", {}, "/console/audit/")
    assert status == 403  # an auditor reads and reconciles; it does not close

    # The export of records is pdg audit export's, zipped: it verifies offline.
    async with world.client.get("/console/audit/export?format=csv&from=2026-11-01&to=2026-12-01") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/zip"
        assert resp.headers["Content-Disposition"] == 'attachment; filename="pdg-audit-export-1-1.zip"'
        archive = zipfile.ZipFile(io.BytesIO(await resp.read()))
    assert sorted(archive.namelist()) == ["calls-1-1.csv", "manifest.json"], archive.namelist()
    folder = tmp_path / "export"
    archive.extractall(folder)
    key = load_or_create_signing_key(world.settings.ledger_key_path, "ES256")
    report = audit.verify_export(folder / "manifest.json", {key.kid: key.private_key.public_key()})
    assert (report.ok, report.records) == (True, 1), report
    assert month.call_ids[0] in (folder / "calls-1-1.csv").read_text()


async def test_close_review_issue_notes_and_payments(world_factory: WorldFactory) -> None:
    month = await november(world_factory)
    world = month.world
    await _users(world).add("fin", "finance", password=PASSWORD)
    await _sign_in(world.client, "fin")
    period = "/console/finance/periods/2026-11"

    status, location, _ = await _post(world, f"{period}/close", {}, period)
    assert (status, location) == (303, f"{period}?done=close")
    status, text = await _get(world, period)
    assert status == 200
    reviewed = _drafts_hash(text)
    invoice_id = f"inv-2026-11-{month.licensee['id']}"
    assert f'id="invoice-{invoice_id}"' in text
    assert "¥0.08" in text  # 3 calls x 2.5 fen = 7.5 fen, rounded once to 8
    [close] = await _log(world, "billing.close")
    assert close["actor"] == "console:fin (finance)"

    # A November record lands after the review: the reviewed drafts are refused.
    await month.call()
    status, _, text = await _post(world, f"{period}/issue", {"drafts_hash": reviewed}, period)
    assert status == 409
    assert "changed since they were reviewed" in text
    fresh = _drafts_hash(text)
    assert fresh != reviewed
    assert [inv["status"] for inv in await list_invoices(world.app[ENGINE])] == []
    status, _, _ = await _post(world, f"{period}/issue", {"drafts_hash": "nonsense"}, period)
    assert status == 400
    status, location, _ = await _post(world, f"{period}/issue", {"drafts_hash": fresh}, period)
    assert (status, location) == (303, f"{period}?done=issue")
    [invoice] = await list_invoices(world.app[ENGINE], period="2026-11")
    assert (invoice["status"], invoice["calls"], invoice["subtotal_fen"]) == ("issued", 4, 10)
    assert invoice["number"] is not None

    page = f"/console/finance/invoices/{invoice_id}"
    status, text = await _get(world, page)
    assert status == 200
    for shown in (invoice["number"], "星河数据科技有限公司", "城市公共数据运营有限公司", "企业登记信息"):
        assert shown in text, shown
    # Notes and payments, typed in yuan, read as whole fen.
    note = {"kind": "credit", "amount": "0.03", "reason": "退回重复调用", "line_no": "1"}
    status, location, _ = await _post(world, f"{page}/notes", note, page)
    assert (status, location) == (303, f"{page}?done=note")
    status, _, text = await _post(world, f"{page}/notes", {**note, "amount": "1.5.0"}, page)
    assert status == 400
    assert 'role="alert"' in text
    status, _, text = await _post(world, f"{page}/notes", {**note, "amount": "500"}, page)
    assert status == 409  # more than the line billed
    [credit] = await list_notes(world.app[ENGINE], invoice_id=invoice_id)
    assert (credit["kind"], credit["amount_fen"], credit["line_no"]) == ("credit", 3, 1)
    assert credit["issued_by"] == "console:fin"

    payment = {"amount": "0.05", "paid_on": "2026-12-01", "reference": "银行流水 0001"}
    status, _, text = await _post(world, f"{page}/payments", {**payment, "amount": "9.99"}, page)
    assert status == 409  # more than the balance
    status, location, _ = await _post(world, f"{page}/payments", payment, page)
    assert (status, location) == (303, f"{page}?done=payment")
    [paid] = await list_payments(world.app[ENGINE], invoice_id)
    assert (paid["amount_fen"], paid["reference"], paid["recorded_by"]) == (5, "银行流水 0001", "console:fin")
    status, text = await _get(world, page)
    assert "银行流水 0001" in text
    assert "partially-paid" not in text  # shown in words, not as the code
    assert [e["actor"] for e in await _log(world, "payment.record")] == ["console:fin (finance)"]

    # The period's reports, their files and the statement.
    for path in (f"{period}/summary", f"{period}/payouts", f"{period}/reconciliation"):
        status, text = await _get(world, path)
        assert status == 200, path
    status, text = await _get(world, f"{period}/reconciliation")
    assert 'id="zero-differences"' in text, text
    for path, media in (
        (f"{period}/summary?format=csv", "text/csv"),
        (f"{period}/payouts?format=xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml"),
        (f"{period}/export?format=json", "application/json"),
    ):
        async with world.client.get(path) as resp:
            assert resp.status == 200, path
            assert resp.content_type.startswith(media), path
            assert resp.headers["Content-Disposition"].startswith("attachment")
            body = await resp.read()
        assert body
    async with world.client.get(f"/console/finance/licensees/{month.licensee['id']}/statement.pdf") as resp:
        assert resp.status == 200
        assert (await resp.read()).startswith(b"%PDF")


async def test_top_up_a_prepaid_licence(world_factory: WorldFactory) -> None:
    world = await world_factory()
    dataset = await world.dataset()
    licensee = await world.licensee()
    licence = await world.licence(
        licensee["id"], [dataset["id"]], paid={"prepaid_calls": 2, "prepaid_unit_price_fen": "12.5"}
    )
    users = _users(world)
    await users.add("fin", "finance", password=PASSWORD)
    await users.add("view", "viewer", password=PASSWORD)
    page = f"/console/finance/licences/{licence['id']}/prepaid"

    await _sign_in(world.client, "view")
    status, text = await _get(world, page)
    assert status == 200
    assert 'id="top-up-form"' not in text
    status, _, _ = await _post(world, f"{page.removesuffix('/prepaid')}/top-ups", {"calls": "5"}, page)
    assert status == 403

    await _sign_in(world.client, "fin")
    status, _, text = await _post(world, f"{page.removesuffix('/prepaid')}/top-ups", {"calls": "0"}, page)
    assert status == 400
    status, location, _ = await _post(world, f"{page.removesuffix('/prepaid')}/top-ups", {"calls": "5"}, page)
    assert (status, location) == (303, f"{page}?done=top-up")
    status, text = await _get(world, page)
    assert re.search(r'id="remaining-calls">7<', text), text
    [entry] = await _log(world, "licence.top-up")
    assert entry["actor"] == "console:fin (finance)"
    [top_up] = await world.app[REGISTRY].list_top_ups(licence["id"])
    assert top_up.calls == 5
    invoice_id = top_up.invoice_id
    status, text = await _get(world, f"/console/finance/invoices/{invoice_id}")
    assert status == 200
    assert "¥0.63" in text  # 5 x 12.5 fen = 62.5 fen, rounded once


def test_every_state_and_kind_has_its_words() -> None:
    dynamic = [f"period_state.{s}" for s in ("issued", "draft", "open", "current")]
    dynamic += [f"invoice_status.{s}" for s in ("draft", "closed", *payments.STATUSES)]
    dynamic += [f"line_kind.{k}" for k in ("usage", "late", "prepaid", "top-up")]
    dynamic += [f"note_kind.{k}" for k in notes.KINDS]
    dynamic += [f"entry_kind.{k}" for k in ("invoice", "debit-note", "credit-note", "payment")]
    dynamic += [f"bucket.{name}" for name, _, _ in payments.BUCKETS]
    dynamic += [f"finance.done.{d}" for d in ("close", "issue", "note", "payment", "top-up")]
    for lang in ("zh", "en"):
        assert set(dynamic) <= set(CATALOGUES[lang]), set(dynamic) - set(CATALOGUES[lang])


# -- in a browser ----------------------------------------------------------------------


browser_test = pytest.mark.skipif(MISSING, reason=SKIP_REASON)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as launched:
        yield launched


@browser_test
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.xdist_group("browser")
@pytest.mark.timeout(180)
async def test_finance_issues_a_month_and_an_auditor_traces_a_call(
    world_factory: WorldFactory, browser: Any
) -> None:
    month = await november(world_factory)
    world = month.world
    users = _users(world)
    await users.add("fin", "finance", password=PASSWORD)
    await users.add("aud", "auditor", password=PASSWORD)
    invoice_id = f"inv-2026-11-{month.licensee['id']}"

    visit = await Visit.open(browser, world, "finance")
    page = visit.page
    await visit.sign_in("fin")
    await page.click("header nav a[href='/console/finance/']")
    await page.wait_for_load_state()
    await visit.shot("periods")
    assert await page.inner_text("h1") == "财务"
    assert "2026-11" in await page.inner_text("#next")
    assert "已结束未结账" in await page.inner_text("#period-2026-11")

    await page.click("#next a")
    await page.wait_for_load_state()
    await visit.shot("period-open")
    await visit.submit("#close-form", "drafts")
    assert page.url.endswith("/console/finance/periods/2026-11?done=close")
    assert "已结账待审" in await page.inner_text("h1")
    drafts_hash = await page.inner_text("#drafts-hash")
    assert re.fullmatch(r"[0-9a-f]{64}", drafts_hash)
    draft = page.locator(f"[id='invoice-{invoice_id}']")
    assert "草稿" in await draft.inner_text()
    line = await page.inner_text(f"[id='line-{invoice_id}-1']")
    assert "企业登记信息" in line
    assert "7.5000" in line  # the exact charge, then the amount rounded once
    assert "¥0.08" in line

    await visit.submit("#issue-form", "issued")
    assert "已开具" in await page.inner_text("h1")
    [invoice] = await list_invoices(world.app[ENGINE], period="2026-11")
    number = invoice["number"]
    assert number in await draft.inner_text()

    csv = (await visit.download("#export-csv")).decode("utf-8-sig")
    assert invoice_id in csv

    await page.click(f"[id='invoice-{invoice_id}'] h2 a")
    await page.wait_for_load_state()
    await visit.shot("invoice")
    assert await page.inner_text("#invoice-number") == number
    assert "星河数据科技有限公司" in await page.inner_text("#buyer")
    assert await page.inner_text("#due-at") == invoice["due_at"]
    pdf = await visit.download("#pdf-zh")
    assert pdf.startswith(b"%PDF")
    words = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)
    assert number in words

    for path, label in (
        ("/console/finance/periods/2026-11/summary", "summary"),
        ("/console/finance/periods/2026-11/payouts", "payouts"),
        ("/console/finance/periods/2026-11/reconciliation", "reconciliation"),
        (f"/console/finance/licensees/{month.licensee['id']}/statement", "statement"),
        ("/console/finance/ageing?as_of=2026-12-31", "ageing"),
    ):
        response = await visit.go(path, label)
        assert response.status == 200, path
    assert await page.locator("#zero-differences").count() == 0  # the ageing page
    await visit.go("/console/finance/periods/2026-11/reconciliation", "reconciliation")
    assert await page.locator("#zero-differences").count() == 1

    # An auditor traces a call by its id and takes its inclusion proof.
    call_id = month.call_ids[1]
    engine = world.app[ENGINE]
    for _ in range(100):  # until a signed checkpoint covers it
        try:
            await audit.prove(engine, call_id)
            break
        except audit.AuditError:
            await page.wait_for_timeout(100)
    auditor = await Visit.open(browser, world, "audit")
    page = auditor.page
    await auditor.sign_in("aud")
    await page.click("header nav a[href='/console/audit/']")
    await page.wait_for_load_state()
    await auditor.shot("audit")
    await page.fill("#trace-form input[name=call_id]", call_id)
    await auditor.submit("#trace-form", "call")
    assert await page.inner_text("#call-id") == call_id
    assert (await page.inner_text("#seq")).startswith("2")
    assert await page.inner_text("#billed-by") == number
    assert await page.inner_text("#record .field-dataset_id") == month.dataset["id"]

    proof = json.loads(await auditor.download("#proof"))
    assert (proof["format"], proof["call_id"], proof["seq"]) == ("pdg.inclusion-proof.v1", call_id, 2)
    assert proof["record"]["call_id"] == call_id
    assert proof["audit_path"]
    key = load_or_create_signing_key(world.settings.ledger_key_path, "ES256")
    check = audit.check_proof(proof, key.private_key.public_key())
    assert check.ok, check.reason

    await auditor.go("/console/audit/", "audit-again")
    await auditor.submit("#verify-form", "verified")
    assert await page.inner_text("#ledger-result") == "通过"
    assert await page.inner_text("#records-checked") == "3"
    assert "通过" in await page.inner_text("#register-result")
