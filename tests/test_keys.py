"""Token-signing key rotation on two replicas sharing one database: the new
key signs at once on the replica that rotates and within a refresh on the
other; tokens of both keys stay good on both while the old one is in its
grace; then it leaves the JWKS and verifies nothing more. Private keys are
encrypted at rest under the passphrase, and a wrong one stops the start."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update

from gateway.state import ENGINE, SESSIONS, TOKENS
from licensing.keys import KeyStore, KeyStoreError
from licensing.models import SigningKeyRow
from tests.conftest import World
from tests.test_cli import apdg, environment
from tests.test_data_plane import eventually

WorldFactory = Callable[..., Awaitable[World]]


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def jwks_kids(world: World) -> set[str]:
    async with world.client.get("/.well-known/jwks.json") as resp:
        return {key["kid"] for key in (await resp.json())["keys"]}


async def test_rotation_with_tokens_of_both_keys_in_flight_on_two_replicas(
    world_factory: WorldFactory,
) -> None:
    one = await world_factory(server__catalogue_refresh_seconds=0.2)
    two = await world_factory(server__catalogue_refresh_seconds=0.2)
    assert one.app[TOKENS].signing_key.kid == two.app[TOKENS].signing_key.kid  # one key for all
    ds, _lic, app, old_token = await one.licensed()
    scope = f"purpose:public-interest dataset:{ds['id']}"
    old_kid = kid_of(old_token)

    rotated = await one.admin_post("/keys/rotate", {"algorithm": "EdDSA"}, expect=200)
    new_kid = rotated["kid"]
    assert new_kid != old_kid
    assert rotated["active"] is True
    assert rotated["alg"] == "EdDSA"
    # The replica that rotated signs with the new key at once ...
    from_one = await one.token(app, scope)
    assert kid_of(from_one) == new_kid
    # ... the other within its refresh.

    async def switched() -> bool:
        return two.app[TOKENS].signing_key.kid == new_kid

    await eventually(switched, within=3.0)
    from_two = await two.token(app, scope)
    assert kid_of(from_two) == new_kid

    path = f"/data/{ds['id']}/records"
    for world in (one, two):
        assert {old_kid, new_kid} <= await jwks_kids(world)
        for token in (old_token, from_one, from_two):
            status, body, _ = await world.call(path, token)
            assert status == 200, body

    listing = {k["kid"]: k for k in await admin_get(one, "/keys")}
    assert listing[new_kid]["active"] is True
    assert listing[old_kid]["active"] is False
    retired = datetime.fromisoformat(listing[old_kid]["retired_at"])
    leaves = datetime.fromisoformat(listing[old_kid]["leaves_jwks_at"])
    ttl = one.settings.tokens.access_token_ttl_seconds + one.settings.tokens.leeway_seconds
    assert leaves - retired >= timedelta(seconds=ttl)

    # Past its grace (moved back here), the old key leaves the JWKS and a
    # token it signs, never seen before, is refused on both replicas.
    async with one.app[ENGINE].connect() as conn:
        pem = (
            await conn.execute(select(SigningKeyRow.private_pem).where(SigningKeyRow.kid == old_kid))
        ).scalar()
    old_key = serialization.load_pem_private_key(pem.encode(), password=None)
    claims = jwt.decode(old_token, options={"verify_signature": False})
    now = int(time.time())

    def signed_by_old_key(jti: str) -> str:
        fresh = {**claims, "jti": jti, "iat": now, "nbf": now, "exp": now + 60}
        return jwt.encode(fresh, old_key, algorithm="ES256", headers={"typ": "at+jwt", "kid": old_kid})

    # Within its grace, a token the old key signs now is still good.
    for world in (one, two):
        status, body, _ = await world.call(path, signed_by_old_key(f"tok-in-grace-{id(world)}"))
        assert status == 200, body
    async with one.app[ENGINE].begin() as conn:
        await conn.execute(
            update(SigningKeyRow)
            .where(SigningKeyRow.kid == old_kid)
            .values(retired_at=datetime.now(UTC) - timedelta(seconds=ttl + 3600))
        )
    forged = signed_by_old_key("tok-after-grace")
    for world in (one, two):

        async def gone(world: World = world) -> bool:
            return old_kid not in await jwks_kids(world)

        await eventually(gone, within=3.0)
        status, body, _ = await world.call(path, forged)
        assert (status, body["code"]) == (401, "invalid-token"), body


async def admin_get(world: World, path: str) -> Any:
    async with world.client.get(f"/admin/v1{path}", headers=world.admin) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_private_keys_are_encrypted_at_rest(world_factory: WorldFactory, tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    world = await world_factory(tokens__key_passphrase_file=str(passphrase))
    await world.admin_post("/keys/rotate", {}, expect=200)
    async with world.app[ENGINE].connect() as conn:
        pems = (await conn.execute(select(SigningKeyRow.private_pem))).scalars().all()
    stored = [pem for pem in pems if pem]
    assert len(stored) == 2
    assert all(pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----") for pem in stored)
    # The gateway signs and verifies with them.
    ds, _lic, _app, token = await world.licensed()
    status, body, _ = await world.call(f"/data/{ds['id']}/records", token)
    assert status == 200, body
    # Without the passphrase, or with a wrong one, the keys cannot be used.
    sessions = world.app[SESSIONS]
    for wrong in (None, b"wrong"):
        store = KeyStore(sessions, passphrase=wrong, ttl_seconds=300, leeway_seconds=10)
        with pytest.raises(KeyStoreError):
            await store.active()


async def test_the_cli_lists_and_rotates_and_key_files_do_not_rotate(
    world_factory: WorldFactory, tmp_path: Path
) -> None:
    world = await world_factory()
    env = environment(world.settings.data_dir, PDG_DATABASE_URL=world.settings.database_url)
    before = world.app[TOKENS].signing_key.kid
    run = await apdg("keys", "rotate", "--json", env=env, cwd=tmp_path)
    assert run.code == 0, run.err
    new = run.json()["kid"]

    async def switched() -> bool:
        return world.app[TOKENS].signing_key.kid == new

    await eventually(switched, within=3.0)
    run = await apdg("keys", "list", "--json", env=env, cwd=tmp_path)
    listed = {k["kid"]: k["active"] for k in run.json()}
    assert listed == {before: False, new: True}

    filed = await world_factory(tokens__signing_key_file=str(tmp_path / "own.pem"))
    async with filed.client.post("/admin/v1/keys/rotate", json={}, headers=filed.admin) as resp:
        assert resp.status == 409
    run = await apdg(
        "keys", "rotate", env={**env, "PDG_SIGNING_KEY_FILE": str(tmp_path / "own.pem")}, cwd=tmp_path
    )
    assert run.code != 0
    assert "key files" in run.err
