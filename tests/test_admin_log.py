"""The admin audit log: every administrative change through the admin API,
the CLI and the billing service is an entry (who, when, what, before,
after), never with a secret; the chain is checked by ``pdg audit verify``,
which names the first edited, deleted or re-hashed entry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from billing.invoices import close_period
from core.actor import acting_as
from gateway.state import ADMIN_TOKENS, ENGINE
from ledger import admin_log
from licensing.schemas import AdminTokenIn
from tests.conftest import World
from tests.test_audit import PdgRunner, pdg  # noqa: F401  (the fixture)
from tests.test_billing import AFTER_NOV, NOV, VAT, Books, books, november  # noqa: F401
from tests.test_billing_notes import note

WorldFactory = Callable[..., Awaitable[World]]


async def entries(world: World, token: str, **query: Any) -> tuple[int, Any]:
    async with world.client.get(
        "/admin/v1/admin-log", params=query, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return resp.status, await resp.json()


def config_of(world: World, tmp_path: Path) -> Path:
    """A config file naming the world's data folder and database, for ``pdg``."""
    settings = world.settings
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{settings.data_dir}"\n[storage]\ndatabase_url = "{settings.database_url}"\n',
        encoding="utf-8",
    )
    return config


async def unprotect(engine: Any) -> None:
    """What someone with schema rights could do: drop the append-only guard."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("ALTER TABLE admin_log DISABLE TRIGGER USER"))
        else:
            for action in ("update", "delete"):
                await conn.execute(text(f"DROP TRIGGER IF EXISTS admin_log_no_{action}"))


async def test_every_admin_change_is_logged_with_before_and_after_and_no_secret(
    world: World,
    pdg: PdgRunner,  # noqa: F811
    tmp_path: Path,
) -> None:
    ds = await world.dataset(price={"per_call_fen": "2.5", "per_record_fen": "0"})
    async with world.client.patch(
        f"/admin/v1/datasets/{ds['id']}",
        json={"price": {"per_call_fen": "3", "per_record_fen": "0"}},
        headers=world.admin,
    ) as resp:
        assert resp.status == 200, await resp.text()
    licensee = await world.licensee()
    licence = await world.licence(licensee["id"], [ds["id"]])
    for action in ("suspend", "resume", "revoke"):
        await world.admin_post(f"/licences/{licence['id']}/{action}", expect=200)
    app = await world.app_client(licensee["id"])
    rotated = await world.admin_post(f"/apps/{app['client_id']}/rotate-secret", {}, expect=200)
    await world.admin_post(f"/apps/{app['client_id']}/disable", expect=200)
    key = await world.admin_post("/keys/rotate", {}, expect=200)

    tokens = world.app[ADMIN_TOKENS]
    auditor = (await tokens.create(AdminTokenIn(role="auditor"))).token
    status, log = await entries(world, auditor, limit=1000)
    assert status == 200, log
    admin_id = world.admin_token.split("_")[1]
    mine = [e for e in log if e["actor"] == f"admin-token:{admin_id} (licence-admin)"]
    assert [e["action"] for e in mine] == [
        "dataset.create",
        "dataset.update",
        "licensee.create",
        "licence.issue",
        "licence.suspend",
        "licence.resume",
        "licence.revoke",
        "app.create",
        "app.rotate-secret",
        "app.disable",
        "key.rotate",
    ]
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    by_action = {e["action"]: e for e in mine}
    update = by_action["dataset.update"]
    assert update["target"] == ds["id"]
    assert update["before"]["price"]["per_call_fen"] == "2.5"
    assert update["after"]["price"]["per_call_fen"] == "3"
    assert by_action["dataset.create"]["before"] is None
    assert (
        by_action["licence.suspend"]["before"]["status"],
        by_action["licence.suspend"]["after"]["status"],
    ) == (
        "active",
        "suspended",
    )
    assert by_action["app.disable"]["after"]["enabled"] is False
    assert by_action["key.rotate"]["target"] == key["kid"]
    # The tokens made for the test (by the system, not a person) are there too.
    assert {e["action"] for e in log if e["actor"] == "system"} >= {"admin-token.create"}
    # No secret, in any form, anywhere in the log.
    raw = json.dumps(log)
    for secret in (app["client_secret"], rotated["client_secret"]):
        assert secret not in raw
    for token in (world.admin_token, auditor):  # pdga_<id>_<secret>: the id may show, never the secret
        assert token.split("_", 2)[2] not in raw
    assert "secret_hash" not in raw
    assert "argon2" not in raw

    # Paging, and who may read it.
    status, page = await entries(world, auditor, after=3, limit=2)
    assert [e["seq"] for e in page] == [4, 5]
    status, refused = await entries(world, world.admin_token)
    assert (status, refused["code"]) == (403, "forbidden")

    # The CLI's changes name the person at the terminal; verify checks the chain.
    config = config_of(world, tmp_path)
    run = await pdg("keys", "rotate", "--config", str(config))
    assert run.code == 0, run
    run = await pdg("audit", "admin-log", "--config", str(config), "--after", str(len(log)), "--json")
    assert run.code == 0, run
    (last,) = run.json()
    assert last["action"] == "key.rotate"
    assert last["actor"].startswith("cli:")
    run = await pdg("audit", "verify", "--config", str(config), "--json")
    assert run.code == 0, run
    assert run.json()["admin_log"] == {
        "ok": True,
        "entries": len(log) + 1,
        "problem_seq": None,
        "reason": None,
    }


async def test_tampering_with_the_admin_log_is_found_at_its_entry(
    world: World,
    pdg: PdgRunner,  # noqa: F811
    tmp_path: Path,
) -> None:
    for _ in range(3):
        await world.dataset()
    engine = world.app[ENGINE]
    config = config_of(world, tmp_path)
    report = await admin_log.verify(engine)
    assert report.ok
    total = report.entries
    assert total >= 4
    await unprotect(engine)
    async with engine.connect() as conn:
        rows = {
            r.seq: (r.body, r.hash) for r in await conn.execute(text("SELECT seq, body, hash FROM admin_log"))
        }

    async def restore() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM admin_log"))
            for seq, (body, digest) in sorted(rows.items()):
                await conn.execute(
                    text("INSERT INTO admin_log (seq, body, hash) VALUES (:s, :b, :h)"),
                    {"s": seq, "b": body, "h": digest},
                )

    async def sql(statement: str, **params: Any) -> None:
        async with engine.begin() as conn:
            await conn.execute(text(statement), params)

    target = total - 1
    body = json.loads(rows[target][0])
    edited = json.dumps(
        {**body, "actor": "someone-else"}, separators=(",", ":"), sort_keys=True, ensure_ascii=False
    )
    previous = bytes.fromhex(rows[target - 1][1])
    cases = {
        # The body edited, its hash left: the hash does not match.
        "edited": (
            "UPDATE admin_log SET body = :b WHERE seq = :s",
            {"b": edited, "s": target},
            target,
        ),
        # The body edited and re-hashed: the next entry no longer follows.
        "re-hashed": (
            "UPDATE admin_log SET body = :b, hash = :h WHERE seq = :s",
            {"b": edited, "h": admin_log.entry_hash(previous, edited.encode()).hex(), "s": target},
            target + 1,
        ),
        "deleted": ("DELETE FROM admin_log WHERE seq = :s", {"s": 2}, 2),
        "renumbered": ("UPDATE admin_log SET seq = 100 WHERE seq = :s", {"s": target}, target),
    }
    for name, (statement, params, at) in cases.items():
        await sql(statement, **params)
        report = await admin_log.verify(engine)
        assert (report.ok, report.problem_seq) == (False, at), (name, report)
        run = await pdg("audit", "verify", "--config", str(config))
        assert run.code == 1, (name, run)
        assert f"admin log verification FAILED at entry {at}" in run.out, (name, run.out)
        await restore()
        assert (await admin_log.verify(engine)).ok, name


async def test_a_period_issued_and_a_note_issued_are_logged(books: Books) -> None:  # noqa: F811
    await november(books)
    with acting_as("cli:finance@books"):
        await close_period(books.engine, NOV, vat_rate=VAT, issuer=books.issues, now=AFTER_NOV)
        issued = await note(books, "inv-2026-11-lic-b", "credit", 5)
    everything = await admin_log.read(books.engine)
    log = [e for e in everything if e["actor"] == "cli:finance@books"]
    assert [(e["action"], e["actor"]) for e in log] == [
        ("billing.issue", "cli:finance@books"),
        ("note.credit", "cli:finance@books"),
    ]
    closed = log[0]["after"]
    assert closed["period"] == "2026-11"
    assert closed["invoices"] == ["inv-2026-11-lic-a", "inv-2026-11-lic-b"]
    assert log[1]["target"] == issued["id"]
    assert log[1]["after"]["amount_fen"] == 5
    assert (await admin_log.verify(books.engine)).entries == len(everything)
    # The entry hashes chain from 32 zero bytes.
    first = everything[0]
    body = json.dumps(
        {k: v for k, v in first.items() if k != "hash"},
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
    )
    assert first["hash"] == hashlib.sha256(b"\x03" + bytes(32) + body.encode()).hexdigest()
