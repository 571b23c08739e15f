"""A close bills everything its period served (issue: nothing bypasses the
meter): before it closes it moves what waits in the call-record log (starting
the embedded Valkey if needed) and waits for the period's calls in flight; if
it cannot, it is refused and writes nothing; ``--allow-pending`` /
``allow_pending=true`` closes anyway and lists what was left. Also ``pdg
billing show PERIOD``'s table. On SQLite + embedded Valkey and on PostgreSQL +
Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing.models import BillingCloseRow, InvoiceCallRow, InvoiceRow
from gateway.state import ADMIN_TOKENS, CLOCK, ENGINE, REDIS
from ledger.log import LOG, WRITER_LOCK
from ledger.models import CallRow
from licensing.schemas import AdminTokenIn
from metering.inflight import key as inflight_key
from metering.periods import period_of, zone
from storage.redis import redis_for
from tests.conftest import Backend, Upstream, credit_code, free_port
from tests.servers import pdg_env
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_billing import Books, books, november  # noqa: F401  (the fixture)
from tests.test_billing_notes import closed_november, note
from tests.test_ledger import records_of
from tests.test_processes import _admin_headers, _request, _valkeys_under, _wait_http
from tests.test_quota import StoppedClock

SHANGHAI = zone("Asia/Shanghai")
#: A replica silent this long is dead (the least allowed is 3).
REPLICA_TIMEOUT = 4

#: ``pdg`` with the gateway's clock set back by argv[1] seconds (the periods
#: of its calls are read from that clock), so that the month its calls fall
#: in has ended when the test closes it with the real clock.
SHIFTED_PDG = """
import sys
from datetime import UTC, datetime, timedelta

import gateway.state

SHIFT = timedelta(seconds=float(sys.argv[1]))


def shifted() -> datetime:
    return datetime.now(UTC) - SHIFT


gateway.state.Clock.__init__.__defaults__ = (shifted,)

from cli.main import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
"""


async def _count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


# -- a gateway killed with records in the log ------------------------------------


@contextlib.contextmanager
def _gateway(tmp_path: Path, env: dict[str, str], shift: float) -> Iterator[subprocess.Popen[bytes]]:
    script = tmp_path / "shifted_pdg.py"
    script.write_text(SHIFTED_PDG, encoding="utf-8")
    log = (tmp_path / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(shift), "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    except BaseException:
        print((tmp_path / "gateway.log").read_text(errors="replace")[-4000:])  # noqa: T201
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        # The embedded Valkey the gateway started outlives a SIGKILL: stop it.
        for pid in _valkeys_under(tmp_path / "data"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _stop_embedded_valkey(data_dir: Path) -> None:
    """Stop (SIGTERM: it writes its append-only file) the embedded Valkey a
    killed gateway left behind, so that the close must start it itself."""
    pids = _valkeys_under(data_dir)
    assert pids, "the embedded Valkey the gateway started is not running"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 20
    while _valkeys_under(data_dir):
        assert time.monotonic() < end, "the embedded Valkey did not stop"
        time.sleep(0.1)


async def _provision(base: str, env: dict[str, str], upstream: Upstream) -> tuple[str, dict[str, str]]:
    """A dataset, a licensee and licence (free allowance, prepaid calls), an
    app; the licence id and a token per purpose."""
    admin = _admin_headers(env)
    status, ds = _request(
        "POST",
        f"{base}/admin/v1/datasets",
        {
            "id": "close-ds",
            "name": "Close dataset",
            "provider": "test-provider",
            "upstream_url": upstream.url,
            "classification": 1,
            "open_class": "open",
            "free_monthly_calls": 100,
            "price": {"per_call_fen": "2.5", "per_record_fen": "0"},
            "revenue_split": {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"},
        },
        admin,
    )
    assert status == 201, ds
    status, licensee = _request(
        "POST",
        f"{base}/admin/v1/licensees",
        {"name": "Close Co", "credit_code": credit_code(), "contact": "ops@example.com"},
        admin,
    )
    assert status == 201, licensee
    status, licence = _request(
        "POST",
        f"{base}/admin/v1/licences",
        {
            "licensee_id": licensee["id"],
            "datasets": ["close-ds"],
            "max_classification": 2,
            "purposes": ["public-interest", "industrial"],
            "valid_from": "2020-01-01T00:00:00Z",
            "valid_until": "2099-01-01T00:00:00Z",
            "security_officer": "Officer Li",
            "paid": {"prepaid_calls": 1000},
        },
        admin,
    )
    assert status == 201, licence
    status, app = _request(
        "POST", f"{base}/admin/v1/apps", {"licensee_id": licensee["id"], "name": "close"}, admin
    )
    assert status == 201, app
    tokens = {}
    async with aiohttp.ClientSession() as session:
        for purpose in ("public-interest", "industrial"):
            form = {"grant_type": "client_credentials", "scope": f"purpose:{purpose} dataset:close-ds"}
            basic = base64.b64encode(f"{app['client_id']}:{app['client_secret']}".encode()).decode()
            headers = {"Authorization": f"Basic {basic}"}
            async with session.post(f"{base}/oauth/token", data=form, headers=headers) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 200, body
                tokens[purpose] = body["access_token"]
    return licence["id"], tokens


@pytest.mark.slow
async def test_a_close_after_a_killed_gateway_bills_every_call_in_its_own_period(
    backend: Backend,
    tmp_path: Path,
    upstream: Upstream,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    """The gateway serves calls of last month (its clock set back) with no
    ledger writer running, so their records wait in the log; a call is
    upstream when the gateway is SIGKILLed. The close moves the log (on the
    embedded defaults it first starts the Valkey the test stopped), waits
    until the dead gateway's call is ended, and bills every served call in
    its own period: none is left to be next period's late usage."""
    now = datetime.now(UTC)
    last_month = period_of(now, SHANGHAI).previous()
    shift = (now - (last_month.start + timedelta(days=10))).total_seconds()
    data_dir = tmp_path / "data"
    port = free_port()
    embedded = backend.name == "embedded"
    settings = {
        "PDG_DATA_DIR": str(data_dir),
        "PDG_PORT": str(port),
        "PDG_LEDGER_RUN_WRITER": "false",
        "PDG_LEDGER_REPLICA_TIMEOUT_SECONDS": str(REPLICA_TIMEOUT),
        "PDG_LOG_LEVEL": "WARNING",
    }
    if not embedded:
        settings |= {"PDG_DATABASE_URL": backend.database_url, "PDG_REDIS_URL": backend.redis_url}
    env = pdg_env(**settings)
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\n'
        + (
            ""
            if embedded
            else f'[storage]\ndatabase_url = "{backend.database_url}"\nredis_url = "{backend.redis_url}"\n'
        ),
        encoding="utf-8",
    )
    database_url = backend.database_url if not embedded else f"sqlite+aiosqlite:///{data_dir / 'pdg.sqlite3'}"
    base = f"http://127.0.0.1:{port}"
    with _gateway(tmp_path, env, shift) as gateway:
        _wait_http(f"{base}/readyz", gateway, seconds=60)
        licence_id, tokens = await _provision(base, env, upstream)
        served: list[str] = []
        async with aiohttp.ClientSession() as session:
            for purpose, n in (("industrial", 3), ("public-interest", 2)):
                headers = {"Authorization": f"Bearer {tokens[purpose]}"}
                for _ in range(n):
                    async with session.get(f"{base}/data/close-ds/records", headers=headers) as resp:
                        assert resp.status == 200, await resp.text()
                        served.append(resp.headers["X-Call-Id"])
            slow = asyncio.create_task(
                session.get(
                    f"{base}/data/close-ds/slow?seconds=8",
                    headers={"Authorization": f"Bearer {tokens['industrial']}"},
                )
            )
            url = backend.redis_url if not embedded else None
            async with redis_for(url, data_dir) as client:
                end = time.monotonic() + 15
                while not await client.hlen(inflight_key(licence_id)):
                    assert time.monotonic() < end, "the slow call never went upstream"
                    await asyncio.sleep(0.05)
                assert await client.xlen(LOG) >= len(served)
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(10)
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await slow
        engine = create_async_engine(database_url)
        try:
            assert await _count(engine, CallRow) == 0, "a writer moved the log: the test needs it waiting"
            if embedded:
                _stop_embedded_valkey(data_dir)
            run = await pdg("billing", "close", "--issue", last_month.name, "--config", str(config), "--json")
            assert run.code == 0, run
            closed = run.json()
            assert closed["pending"] is None
            (invoice,) = closed["invoices"]
            assert [
                (ln["kind"], ln["usage_period"], ln["purpose"], ln["calls"]) for ln in invoice["lines"]
            ] == [
                ("usage", last_month.name, "industrial", 3),
                ("usage", last_month.name, "public-interest", 2),
            ]
            async with engine.connect() as conn:
                rows = (await conn.execute(select(CallRow.__table__).order_by(CallRow.seq))).all()
                billed = set((await conn.execute(select(InvoiceCallRow.call_id))).scalars())
            assert billed == set(served)
            # Every served call of the month is within what the close covered:
            # the next close has none of them to bill as late usage.
            for row in rows:
                assert row.period == last_month.name
                assert row.seq <= closed["through_seq"]
            outcomes = sorted(row.outcome for row in rows)
            assert outcomes == ["incomplete"] + ["served"] * len(served), outcomes
            async with redis_for(url, data_dir) as client:
                assert await client.hlen(inflight_key(licence_id)) == 0
        finally:
            await engine.dispose()


# -- the store down ----------------------------------------------------------------


async def test_a_close_with_the_store_down_is_refused_and_writes_nothing(
    books: Books,  # noqa: F811
    tmp_path: Path,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    """Servers: Redis does not answer. Embedded: the embedded Valkey cannot
    be started. The close says so in one line and writes nothing;
    ``--allow-pending`` closes and says what it could not know."""
    await november(books)
    data_dir = tmp_path / "data"
    if books.backend.name == "embedded":
        (data_dir / "valkey").write_text("not a folder", encoding="utf-8")  # Valkey cannot start
        store = ""
    else:
        store = f'redis_url = "redis://127.0.0.1:{free_port()}/0"\n'
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\n[storage]\ndatabase_url = "{books.backend.database_url}"\n{store}',
        encoding="utf-8",
    )
    refused = await pdg("billing", "close", "--issue", "2026-11", "--config", str(config))
    line = refused.one_line_error("the call-record log cannot be reached")
    assert "nothing was closed" in line, line
    assert await _count(books.engine, BillingCloseRow) == 0
    assert await _count(books.engine, InvoiceRow) == 0
    assert await _count(books.engine, InvoiceCallRow) == 0

    allowed = await pdg("billing", "close", "--issue", "2026-11", "--allow-pending", "--config", str(config))
    assert allowed.code == 0, allowed
    assert "period 2026-11 issued: 2 invoice(s)" in allowed.out, allowed.out
    assert "left for the next period" in allowed.out
    assert "unknown (the log could not be read)" in allowed.out
    assert "the call-record log cannot be reached" in allowed.out
    assert await _count(books.engine, BillingCloseRow) == 1
    # Closed now: asked again, it answers its invoices without the store.
    again = await pdg("billing", "close", "--issue", "2026-11", "--config", str(config), "--json")
    assert again.code == 0, again
    assert again.json()["already_closed"] is True
    assert again.json()["pending"] is None


# -- a call of the period still in flight on a live gateway ----------------------------


async def test_a_call_still_in_flight_holds_the_close_unless_pending_is_allowed(
    world_factory: Any,
    tmp_path: Path,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    world = await world_factory(ledger__replica_timeout_seconds=3)
    clock = StoppedClock(datetime(2026, 11, 20, 4, 0, tzinfo=UTC))
    world.app[CLOCK].source = clock
    # The upstream may be silent for the whole slow call below.
    ds, lic, _app, tok = await world.licensed(
        purpose="industrial", dataset_fields={"idle_timeout_seconds": 30.0}
    )
    for _ in range(2):
        status, body, _ = await world.call(f"/data/{ds['id']}/records", tok)
        assert status == 200, body
    await records_of(world, 2)
    # Upstream until both closes below are done (they wait about 6 s each for
    # it); 20 s at most.
    slow = asyncio.create_task(world.call(f"/data/{ds['id']}/slow?seconds=20&gate=1", tok))
    client = world.app[REDIS]
    end = time.monotonic() + 15
    while not await client.hlen(inflight_key(lic["id"])):
        assert time.monotonic() < end, "the slow call never went upstream"
        await asyncio.sleep(0.05)
    (in_flight,) = [k.decode() for k in await client.hkeys(inflight_key(lic["id"]))]
    clock.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    finance = (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    headers = {"Authorization": f"Bearer {finance}"}
    engine = world.app[ENGINE]
    try:
        async with world.client.post("/admin/v1/billing/2026-11/close?issue=true", headers=headers) as resp:
            problem = await resp.json(content_type=None)
            assert (resp.status, problem["code"]) == (409, "conflict"), problem
        assert "1 call(s) of 2026-11 or before are still in flight" in problem["detail"], problem
        assert [c["call_id"] for c in problem["pending"]["calls"]] == [in_flight]
        assert problem["pending"]["calls"][0]["where"] == "in-flight"
        assert await _count(engine, BillingCloseRow) == 0
        assert await _count(engine, InvoiceRow) == 0
        async with world.client.post(
            "/admin/v1/billing/2026-11/close?issue=true&allow_pending=maybe", headers=headers
        ) as resp:
            assert resp.status == 400, await resp.text()

        config = tmp_path / "pdg-cli.toml"
        config.write_text(
            f'data_dir = "{world.settings.data_dir}"\n[storage]\n'
            f'database_url = "{world.backend.database_url}"\nredis_url = "{world.backend.redis_url}"\n'
            "[ledger]\nreplica_timeout_seconds = 3\n",
            encoding="utf-8",
        )
        run = await pdg("billing", "close", "--issue", "2026-11", "--allow-pending", "--config", str(config))
        assert run.code == 0, run
        assert "left for the next period (billed by its close as late usage): " in run.out, run.out
        assert "0 record(s) in the call-record log, 1 call(s) in flight" in run.out, run.out
        assert f"{in_flight}  in-flight" in run.out, run.out
        async with world.client.get("/admin/v1/invoices?period=2026-11", headers=headers) as resp:
            (invoice,) = await resp.json()
        assert [ln["calls"] for ln in invoice["lines"]] == [2]
        # The call left in flight is served, and lands after what the close
        # covered: the next close bills it, as late usage of November.
        assert not slow.done(), "the slow call ended before both closes were done"
        world.upstream.slow_release.set()
        status, body, _ = await slow
        assert status == 200, body
        rows = await records_of(world, 3)
        (late,) = [row for row in rows if row["call_id"] == in_flight]
        assert (late["outcome"], late["period"]) == ("served", "2026-11")
        assert late["seq"] > invoice["covers"]["through_seq"]
    finally:
        if not slow.done():
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await slow


# -- the log held by a writer that does not move it -------------------------------------


async def test_a_log_that_cannot_be_moved_refuses_the_close_until_it_is(world_factory: Any) -> None:
    """No writer runs beside this gateway, and the writer lock is held by one
    that never moves the log: the close (admin API) waits for it, is refused
    with 503 ``ledger-unavailable`` listing the records, and writes nothing.
    Once the lock is free the close moves the log itself and bills them."""
    world = await world_factory(ledger__run_writer=False)
    clock = StoppedClock(datetime(2026, 11, 20, 4, 0, tzinfo=UTC))
    world.app[CLOCK].source = clock
    ds, _lic, _app, tok = await world.licensed(purpose="industrial")
    served = []
    for _ in range(3):
        status, body, resp = await world.call(f"/data/{ds['id']}/records", tok)
        assert status == 200, body
        served.append(resp.headers["X-Call-Id"])
    engine = world.app[ENGINE]
    assert await _count(engine, CallRow) == 0
    client = world.app[REDIS]
    await client.set(WRITER_LOCK, "a-writer-that-is-stuck", px=60_000)
    clock.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    finance = (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))).token
    headers = {"Authorization": f"Bearer {finance}"}
    async with world.client.post("/admin/v1/billing/2026-11/close?issue=true", headers=headers) as resp:
        problem = await resp.json(content_type=None)
        assert (resp.status, problem["code"]) == (503, "ledger-unavailable"), problem
    assert problem["detail"].startswith(
        "3 record(s) of 2026-11 or before still wait in the call-record log: "
        "the writer that holds it has not moved them; nothing was closed"
    ), problem
    pending = problem["pending"]
    assert (pending["log_records"], pending["in_flight"]) == (3, 0)
    assert [(c["call_id"], c["where"], c["outcome"]) for c in pending["calls"]] == [
        (call_id, "log", "served") for call_id in served
    ]
    assert await _count(engine, BillingCloseRow) == 0
    assert await _count(engine, InvoiceRow) == 0

    await client.delete(WRITER_LOCK)
    async with world.client.post("/admin/v1/billing/2026-11/close?issue=true", headers=headers) as resp:
        closed = await resp.json(content_type=None)
        assert resp.status == 201, closed
    assert closed["pending"] is None
    (invoice,) = closed["invoices"]
    assert [(ln["kind"], ln["calls"]) for ln in invoice["lines"]] == [("usage", 3)]
    assert await _count(engine, CallRow) == 3


# -- pdg billing show PERIOD -------------------------------------------------------------


async def test_pdg_billing_show_lists_a_periods_invoices_as_a_table(
    books: Books,  # noqa: F811
    tmp_path: Path,
    pdg: PdgRunner,  # noqa: F811
) -> None:
    await closed_november(books)
    await note(books, "inv-2026-11-lic-b", "credit", 5, now=datetime(2026, 12, 3, 2, 0, tzinfo=UTC))
    config = books.config(tmp_path)
    shown = await pdg("billing", "show", "2026-11", "--config", str(config))
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    assert lines[0] == "period 2026-11 (closed): 2 invoice(s), 0.18 CNY in all", shown.out
    assert lines[1].split() == ["invoice", "licensee", "lines", "calls", "subtotal", "VAT", "total", "status"]
    assert lines[2].split() == ["inv-2026-11-lic-a", "lic-a", "2", "5", "0.04", "0.00", "0.04", "issued"]
    assert lines[3].split() == ["inv-2026-11-lic-b", "lic-b", "1", "5", "0.13", "0.01", "0.14", "issued"]
    one = await pdg("billing", "show", "2026-11", "--licensee", "lic-b", "--config", str(config))
    assert "1 invoice(s), 0.14 CNY in all" in one.out, one.out
    assert "inv-2026-11-lic-a" not in one.out
    # December has the note issued in it, and no invoices: it is not closed.
    december = await pdg("billing", "show", "2026-12", "--config", str(config))
    assert december.code == 0, december
    first, *rest = december.out.splitlines()
    assert first == "period 2026-12 has no invoices: it is not closed yet", december.out
    assert rest[0] == "notes issued in 2026-12:"
    assert "cn-2026-11-lic-b-1" in rest[1]
    as_json = await pdg("billing", "show", "2026-11", "--config", str(config), "--json")
    assert [inv["id"] for inv in as_json.json()] == ["inv-2026-11-lic-a", "inv-2026-11-lic-b"]
    nothing = await pdg("billing", "show", "2027-01", "--config", str(config))
    nothing.one_line_error("no invoices or notes for 2027-01: it is not closed")
