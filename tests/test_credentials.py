"""Credential checks under attack: an unknown id takes as long to refuse as a
known one with the wrong secret (no id oracle), and failures are throttled
per id and per address on every replica (429 ``rate-limited``), even for the
right secret once the limit is reached."""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from gateway.state import ADMIN_TOKENS, ENGINE
from licensing.models import AdminTokenRow
from licensing.schemas import AdminTokenIn
from tests.conftest import World

WorldFactory = Callable[..., Awaitable[World]]


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def token_request(world: World, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "client_credentials", "scope": "purpose:public-interest"}
    async with world.client.post("/oauth/token", data=form, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None) | {
            "retry_after": resp.headers.get("Retry-After")
        }


async def admin_request(world: World, token: str) -> tuple[int, dict[str, Any]]:
    async with world.client.get("/admin/v1/datasets", headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body if isinstance(body, dict) else {"list": body}


async def timed(request: Awaitable[tuple[int, dict[str, Any]]]) -> tuple[float, int]:
    started = time.perf_counter()
    status, _ = await request
    return time.perf_counter() - started, status


async def fresh_minute() -> None:
    """Start a test of the one-minute windows well inside a minute."""
    left = 60 - time.time() % 60
    if left < 20:
        await asyncio.sleep(left + 0.5)


async def test_an_unknown_id_takes_as_long_as_a_wrong_secret(world_factory: WorldFactory) -> None:
    """Medians within 20 %. A side channel shows in every round (an unknown id
    used to be refused 40 times faster); a machine busy with other work can
    skew one round, so up to three are measured and one must hold."""
    world = await world_factory()  # the tests' default: no throttling
    licensee = await world.licensee()
    app = await world.app_client(licensee["id"])
    admin_id = world.admin_token.split("_")[1]
    rounds = []
    for r in range(3):
        medians = await _credential_medians(world, app["client_id"], admin_id, r)
        rounds.append(medians)
        if all(
            0.8 <= medians[unknown] / medians[known] <= 1.25
            for unknown, known in (("unknown client", "known client"), ("unknown admin", "known admin"))
        ):
            return
    raise AssertionError(f"unknown and known ids differ by over 20 % in every round: {rounds}")


async def _credential_medians(world: World, client_id: str, admin_id: str, round_: int) -> dict[str, float]:
    attempts: dict[str, list[float]] = {
        "unknown client": [],
        "known client": [],
        "unknown admin": [],
        "known admin": [],
    }
    for i in range(12):  # interleaved, so a drifting machine drifts both ways
        n = f"{round_}x{i}"
        cases = {
            "unknown client": token_request(world, basic(f"app-nobody-{n}", "wrong")),
            "known client": token_request(world, basic(client_id, f"wrong-{n}")),
            "unknown admin": admin_request(world, f"pdga_nobody{n}_wrong"),
            "known admin": admin_request(world, f"pdga_{admin_id}_wrong{n}"),
        }
        for name, request in cases.items():
            seconds, status = await timed(request)
            assert status == 401, name
            if i >= 2:  # the first ones warm the hasher and the connections
                attempts[name].append(seconds)
    return {name: statistics.median(times) for name, times in attempts.items()}


async def test_failures_are_throttled_per_client_and_per_address(world_factory: WorldFactory) -> None:
    world = await world_factory(
        tokens__failures_per_client_per_minute=3, tokens__failures_per_address_per_minute=5
    )
    licensee = await world.licensee()
    await world.licence(licensee["id"], [(await world.dataset())["id"]])
    first = await world.app_client(licensee["id"])
    second = await world.app_client(licensee["id"])
    await fresh_minute()

    for _ in range(3):
        status, body = await token_request(world, basic(first["client_id"], "guess"))
        assert (status, body["code"]) == (401, "invalid-client"), body
    # The id has used up its failures: even the right secret is refused now.
    status, body = await token_request(world, basic(first["client_id"], first["client_secret"]))
    assert (status, body["code"]) == (429, "rate-limited"), body
    assert 1 <= int(body["retry_after"]) <= 61
    # Another client from the same address still gets its token.
    status, body = await token_request(world, basic(second["client_id"], second["client_secret"]))
    assert status == 200, body
    # Two more failures reach the address's limit: every client from it waits.
    for _ in range(2):
        status, body = await token_request(world, basic("app-nobody", "guess"))
        assert status == 401, body
    status, body = await token_request(world, basic(second["client_id"], second["client_secret"]))
    assert (status, body["code"]) == (429, "rate-limited"), body

    async with world.client.get("/metrics") as resp:
        text = await resp.text()
    assert 'pdg_credential_failures_total{endpoint="token"} 5.0' in text
    assert 'pdg_credential_throttled_total{endpoint="token"} 2.0' in text


async def test_admin_token_failures_are_throttled_on_every_replica(world_factory: WorldFactory) -> None:
    one = await world_factory(
        tokens__failures_per_client_per_minute=2, tokens__failures_per_address_per_minute=1000
    )
    two = await world_factory(
        tokens__failures_per_client_per_minute=2, tokens__failures_per_address_per_minute=1000
    )
    target = await one.app[ADMIN_TOKENS].create(AdminTokenIn(role="viewer"))
    token_id = target.token.split("_")[1]
    await fresh_minute()
    status, _ = await admin_request(one, target.token)
    assert status == 200
    # One failure on each replica: the id's two failures of this minute.
    for world in (one, two):
        status, body = await admin_request(world, f"pdga_{token_id}_guess")
        assert (status, body["code"]) == (401, "admin-token-required"), body
    for world in (two, one):
        status, body = await admin_request(world, target.token)
        assert (status, body["code"]) == (429, "rate-limited"), body
    # Other admin tokens are not held up.
    status, _ = await admin_request(two, two.admin_token)
    assert status == 200


async def test_an_app_secret_rotates_with_an_overlap(world_factory: WorldFactory) -> None:
    world = await world_factory()
    licensee = await world.licensee()
    await world.licence(licensee["id"], [(await world.dataset())["id"]])
    app = await world.app_client(licensee["id"])
    first = app["client_secret"]

    rotated = await world.admin_post(f"/apps/{app['id']}/rotate-secret", {"overlap_seconds": 600}, expect=200)
    second = rotated["client_secret"]
    assert second not in (None, first)
    assert rotated["previous_secret_until"] is not None
    for secret in (first, second):  # both, during the overlap
        status, body = await token_request(world, basic(app["client_id"], secret))
        assert status == 200, body
    # Another rotation without overlap: only the newest secret is accepted.
    rotated = await world.admin_post(f"/apps/{app['id']}/rotate-secret", {"overlap_seconds": 0}, expect=200)
    third = rotated["client_secret"]
    assert rotated["previous_secret_until"] is None
    for secret, expected in ((first, 401), (second, 401), (third, 200)):
        status, body = await token_request(world, basic(app["client_id"], secret))
        assert status == expected, body
    # A fetch never shows a secret again; a key-only app has none to rotate.
    async with world.client.get(f"/admin/v1/apps/{app['id']}", headers=world.admin) as resp:
        assert (await resp.json())["client_secret"] is None
    keyed = await world.app_client(
        licensee["id"],
        jwks={"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]},
    )
    body = await world.admin_post(f"/apps/{keyed['id']}/rotate-secret", {})
    assert body["status"] == 409, body


async def test_an_admin_token_expires(world_factory: WorldFactory) -> None:
    world = await world_factory()
    created = await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="viewer", expires_in_seconds=3600))
    status, _ = await admin_request(world, created.token)
    assert status == 200
    async with world.app[ENGINE].begin() as conn:
        await conn.execute(
            update(AdminTokenRow)
            .where(AdminTokenRow.id == created.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    status, body = await admin_request(world, created.token)
    assert (status, body["code"]) == (401, "admin-token-required"), body
    assert "expired" in body["detail"]
