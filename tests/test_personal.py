"""Personal data in paths: a dataset marks segments ``{personal}``; the call
record keeps the operation's template and a keyed digest, never the value,
whether the call is served, refused by the licence or by the operation rules.
The upstream still gets the real path; the chain still verifies."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gateway.state import ENGINE, SETTINGS
from ledger.models import CallRow
from tests.conftest import World
from tests.test_cli import apdg, environment
from tests.test_ledger import records_of, verify_rows

ID_NUMBER = "11010119900307123X"
PLATE = "京A12345"


def digest(world: World, value: str) -> str:
    """The digest computed here, from the key file, as an auditor would."""
    key = world.app[SETTINGS].personal_key_path.read_bytes()
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


async def rows(world: World) -> list[dict[str, Any]]:
    async with world.app[ENGINE].connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(CallRow).order_by(CallRow.seq))]


async def test_personal_segments_are_kept_only_as_keyed_digests(world: World) -> None:
    ds, _lic, _app, token = await world.licensed(
        dataset_fields={"paths": ["persons/{personal}", "persons/{personal}/vehicles/{personal}", "open/**"]}
    )
    base = f"/data/{ds['id']}"
    plate = "%E4%BA%ACA12345"  # 京A12345, percent-encoded as sent
    person, car = f"{{personal:{digest(world, ID_NUMBER)}}}", f"{{personal:{digest(world, PLATE)}}}"
    unmatched = f"{{unmatched:{digest(world, 'persons/' + ID_NUMBER + '/photo')}}}"
    calls = {
        f"{base}/persons/{ID_NUMBER}": (200, f"{base}/persons/{person}"),
        f"{base}/persons/{ID_NUMBER}/vehicles/{plate}?at=now": (
            200,
            f"{base}/persons/{person}/vehicles/{car}",
        ),
        f"{base}/persons/{ID_NUMBER}/photo": (404, f"{base}/{unmatched}"),
        f"{base}/open/a/b": (200, f"{base}/open/a/b"),
    }
    for path, (status, _) in calls.items():
        got, body, _ = await world.call(path, token)
        assert got == status, (path, body)
    # The upstream got the real paths.
    assert any(ID_NUMBER in seen["raw_path"] for seen in world.upstream.seen)

    # Another licensee's app, refused by the licence: masked all the same.
    other = await world.licensee()
    await world.licence(other["id"], [(await world.dataset())["id"]])
    stranger = await world.app_client(other["id"])
    stranger_token = await world.token(stranger, "purpose:public-interest")
    got, body, _ = await world.call(f"{base}/persons/{ID_NUMBER}", stranger_token)
    assert got == 403, body

    recorded = await records_of(world, len(calls) + 1)
    paths = [r["path"] for r in recorded]
    assert paths[: len(calls)] == [expected for _, expected in calls.values()]
    assert paths[-1] == f"{base}/persons/{person}"
    for row in await rows(world):
        text = repr(row)
        assert ID_NUMBER not in text
        assert PLATE not in text
        assert plate not in text
    problem, _ = await verify_rows(world)
    assert problem is None

    key_file = world.app[SETTINGS].personal_key_path
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32


async def test_patterns_with_personal_segments_are_validated(world: World) -> None:
    for bad in (["persons/{personal"], ["persons/{name}"], ["{personal}x"]):
        body = await world.admin_post("/datasets", {"id": "bad-ds", "paths": bad})
        assert body["status"] == 400, (bad, body)
    ds = await world.dataset(paths=["{personal}"])
    assert ds["paths"] == ["{personal}"]


async def test_an_auditor_finds_the_calls_about_one_value(world: World, tmp_path: Path) -> None:
    """``pdg audit personal-digest VALUE`` on the deployment's key gives the
    segment the records hold; without the key it says so in one line."""
    ds, _lic, _app, token = await world.licensed(dataset_fields={"paths": ["persons/{personal}"]})
    got, body, _ = await world.call(f"/data/{ds['id']}/persons/{ID_NUMBER}", token)
    assert got == 200, body
    (recorded,) = await records_of(world, 1)
    env = environment(world.app[SETTINGS].data_dir)
    run = await apdg("audit", "personal-digest", ID_NUMBER, "--json", env=env, cwd=tmp_path)
    assert run.code == 0, run.err
    segment = json.loads(run.out)["record_segment"]
    assert recorded["path"].endswith("/" + segment)
    run = await apdg(
        "audit", "personal-digest", ID_NUMBER, env=environment(tmp_path / "elsewhere"), cwd=tmp_path
    )
    assert run.code != 0
    assert run.err.count("\n") == 1
    assert "personal-data key" in run.err
