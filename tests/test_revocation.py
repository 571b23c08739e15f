"""RFC 7009 revocation and RFC 7662 introspection: a client revokes a token
of its own licensee and every replica refuses it; introspection tells a
resource server whether a token is active, and nothing about another
licensee's tokens."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.state import CATALOGUE
from tests.conftest import World
from tests.test_data_plane import check_problem, eventually

WorldFactory = Callable[..., Awaitable[World]]


def basic(app: dict[str, Any]) -> dict[str, str]:
    raw = f"{app['client_id']}:{app['client_secret']}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def post(world: World, path: str, form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
    async with world.client.post(path, data=form, headers=headers) as resp:
        raw = await resp.read()
        return resp.status, (await resp.json(content_type=None)) if raw else None


async def test_a_revoked_token_is_refused_on_every_replica(world_factory: WorldFactory) -> None:
    one = await world_factory()
    two = await world_factory()
    ds, _lic, app, token = await one.licensed()
    await two.app[CATALOGUE].reload()
    path = f"/data/{ds['id']}/records"
    for world in (one, two):  # verified, and cached, on both
        status, body, _ = await world.call(path, token)
        assert status == 200, body

    # Another licensee's client cannot revoke it (200 all the same, RFC 7009 §2.2).
    stranger_ee = await one.licensee()
    stranger = await one.app_client(stranger_ee["id"])
    status, _ = await post(one, "/oauth/revoke", {"token": token}, basic(stranger))
    assert status == 200
    status, body, _ = await one.call(path, token)
    assert status == 200, body
    # Nor anyone without client authentication.
    status, body = await post(one, "/oauth/revoke", {"token": token}, {})
    assert status == 401, body

    status, body = await post(
        one, "/oauth/revoke", {"token": token, "token_type_hint": "access_token"}, basic(app)
    )
    assert (status, body) == (200, None)
    status, body, resp = await one.call(path, token)
    check_problem(status, body, resp, 401, "invalid-token")
    assert "revoked" in body["detail"]

    async def refused_on_two() -> bool:
        status, _, _ = await two.call(path, token)
        return status == 401

    await eventually(refused_on_two, within=3.0)
    # A new token for the same client works.
    fresh = await one.token(app, f"purpose:public-interest dataset:{ds['id']}")
    status, body, _ = await two.call(path, fresh)
    assert status == 200, body
    # Revoking garbage is fine too.
    status, _ = await post(one, "/oauth/revoke", {"token": "not-a-token"}, basic(app))
    assert status == 200


async def test_introspection_tells_a_resource_server_what_it_may_know(world: World) -> None:
    ds, lic, app, token = await world.licensed()
    resource = await world.app_client(lic["licensee_id"])  # a resource server of the same licensee
    status, body = await post(world, "/oauth/introspect", {"token": token}, basic(resource))
    assert status == 200, body
    assert body["active"] is True
    assert body["client_id"] == app["client_id"]
    assert body["token_type"] == "Bearer"
    assert body["licence"] == lic["id"]
    assert body["scope"] == f"purpose:public-interest dataset:{ds['id']}"
    assert isinstance(body["exp"], int)

    stranger_ee = await world.licensee()
    stranger = await world.app_client(stranger_ee["id"])
    for form, client in (
        ({"token": token}, stranger),  # another licensee's token
        ({"token": "garbage"}, resource),
        ({"token": token[:-4] + "AAAA"}, resource),  # a forged signature
    ):
        status, body = await post(world, "/oauth/introspect", form, basic(client))
        assert (status, body) == (200, {"active": False}), form
    status, body = await post(world, "/oauth/introspect", {}, basic(resource))
    assert (status, body["error"]) == (400, "invalid_request"), body
    status, body = await post(world, "/oauth/introspect", {"token": token}, {})
    assert status == 401, body

    await post(world, "/oauth/revoke", {"token": token}, basic(app))
    status, body = await post(world, "/oauth/introspect", {"token": token}, basic(resource))
    assert (status, body) == (200, {"active": False})

    async with world.client.get("/.well-known/oauth-authorization-server") as resp:
        metadata = await resp.json()
    assert metadata["revocation_endpoint"].endswith("/oauth/revoke")
    assert metadata["introspection_endpoint"].endswith("/oauth/introspect")
