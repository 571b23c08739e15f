"""``GET /audit/v1/proof/{call_id}``: an auditor, or the call's own licensee,
gets the inclusion proof of a call, which checks against the ledger's key;
anyone else gets nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.state import ADMIN_TOKENS
from ledger import audit
from licensing.keys import load_or_create_signing_key
from licensing.schemas import AdminTokenIn
from tests.conftest import World

WorldFactory = Callable[..., Awaitable[World]]


async def get_proof(world: World, call_id: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with world.client.get(f"/audit/v1/proof/{call_id}", headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_a_call_is_proven_to_its_auditor_and_its_licensee_only(world_factory: WorldFactory) -> None:
    world = await world_factory(ledger__checkpoint_seconds=0.2)
    ds, lic, _app, token = await world.licensed()
    status, body, resp = await world.call(f"/data/{ds['id']}/records", token)
    assert status == 200, body
    call_id = resp.headers["X-Call-Id"]

    tokens = world.app[ADMIN_TOKENS]
    auditor = (await tokens.create(AdminTokenIn(role="auditor"))).token
    own = (await tokens.create(AdminTokenIn(role="licensee", licensee_id=lic["licensee_id"]))).token
    other_licensee = await world.licensee()
    other = (await tokens.create(AdminTokenIn(role="licensee", licensee_id=other_licensee["id"]))).token
    viewer = (await tokens.create(AdminTokenIn(role="viewer"))).token

    for _ in range(100):  # until the record is written and under a checkpoint
        status, proof = await get_proof(world, call_id, auditor)
        if status != 409:
            break
        assert proof["code"] == "conflict", proof
        await asyncio.sleep(0.1)
    assert status == 200, proof
    assert proof["call_id"] == call_id
    key = load_or_create_signing_key(world.settings.ledger_key_path, "ES256")
    check = audit.check_proof(proof, key.private_key.public_key())
    assert check.ok, check.reason
    # The record it proves is the call's, and a changed one does not check.
    tampered = {**proof, "record": {**proof["record"], "status": 500}}
    assert not audit.check_proof(tampered, key.private_key.public_key()).ok

    status, mine = await get_proof(world, call_id, own)
    assert status == 200, mine
    assert mine["record"] == proof["record"]
    for token_, expected, code in (
        (other, 404, "not-found"),
        (viewer, 403, "forbidden"),
        (None, 401, "admin-token-required"),
    ):
        status, body = await get_proof(world, call_id, token_)
        assert (status, body["code"]) == (expected, code), body
    status, body = await get_proof(world, "01234567-89ab-7def-8123-456789abcdef", auditor)
    assert status == 404, body
