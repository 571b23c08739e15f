"""The fixtures themselves: a licensed call goes through on every backend."""

from __future__ import annotations

from tests.conftest import World


async def test_licensed_call_is_served(world: World) -> None:
    ds, _licence, _app, token = await world.licensed()
    status, body, resp = await world.call(f"/data/{ds['id']}/hello?x=1", token)
    assert status == 200, body
    assert body["raw_path"] == "/svc/hello?x=1"
    assert resp.headers["X-Call-Id"]
