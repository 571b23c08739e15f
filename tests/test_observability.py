"""The metrics an operator watches move with the calls that should move
them: each outcome of a data call, each quota pool's refusal, token issuance
and refusal, and the ledger's backlog and lag when no writer runs. Labels
stay bounded: a dataset the catalogue knows keeps its id even when refused,
anything else is ``unknown``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tests.conftest import World, free_port
from tests.test_operations_listen import samples

WorldFactory = Callable[..., Awaitable[World]]


async def _scrape(world: World) -> dict[str, float]:
    async with world.client.get("/metrics") as resp:
        assert resp.status == 200
        return samples(await resp.text())


def _moved(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _calls(dataset: str, purpose: str, outcome: str) -> str:
    return f'pdg_data_calls_total{{dataset="{dataset}",outcome="{outcome}",purpose="{purpose}"}}'


async def test_each_outcome_moves_its_metrics(world: World) -> None:
    free = await world.dataset(free_monthly_calls=1)
    burst = await world.dataset(burst={"per_second": 1, "capacity": 1})
    dead = await world.dataset(upstream_url=f"http://127.0.0.1:{free_port()}/svc")
    closed = await world.dataset(open_class="closed")
    licensee = await world.licensee()
    datasets = [free["id"], burst["id"], dead["id"]]
    await world.licence(licensee["id"], datasets, paid={"prepaid_calls": 1})
    app = await world.app_client(licensee["id"])
    scope = " ".join(f"dataset:{d}" for d in datasets)
    before = await _scrape(world)
    public = await world.token(app, f"purpose:public-interest {scope}")
    industrial = await world.token(app, f"purpose:industrial {scope}")
    status, _ = await world.token_response(app, "purpose:public-interest dataset:no-such-dataset")
    assert status == 400

    answers: list[tuple[str, int, Any]] = []

    async def call(dataset: str, token: str | None) -> None:
        status, body, _ = await world.call(f"/data/{dataset}/records", token)
        answers.append((dataset, status, body))

    await call(free["id"], public)  # served from the free allowance
    await call(free["id"], public)  # 429 quota-exhausted
    await call(free["id"], industrial)  # served from the one prepaid call
    await call(free["id"], industrial)  # 402 payment-required
    await call(burst["id"], public)
    await call(burst["id"], public)  # 429 rate-limited (one per second)
    await call(dead["id"], public)  # 503 upstream-unavailable (connection refused)
    await call(closed["id"], public)  # refused: a closed dataset, known to the catalogue
    await call(free["id"], None)  # 401 token-required
    await call("no-such-dataset", public)  # 404 unknown-dataset
    codes = [(status, body.get("code") if isinstance(body, dict) else None) for _, status, body in answers]
    assert codes[:7] == [
        (200, None),
        (429, "quota-exhausted"),
        (200, None),
        (402, "payment-required"),
        (200, None),
        (429, "rate-limited"),
        (503, "upstream-unavailable"),
    ], codes
    closed_code = codes[7][1]
    assert codes[7][0] == 403, codes
    assert codes[8:] == [(401, "token-required"), (404, "unknown-dataset")], codes

    after = await _scrape(world)

    def moved(name: str) -> float:
        return _moved(before, after, name)

    assert moved(_calls(free["id"], "public-interest", "2xx")) == 1
    assert moved(_calls(free["id"], "industrial", "2xx")) == 1
    assert moved(_calls(free["id"], "public-interest", "quota-exhausted")) == 1
    assert moved(_calls(free["id"], "industrial", "payment-required")) == 1
    assert moved(_calls(burst["id"], "public-interest", "rate-limited")) == 1
    assert moved(_calls(dead["id"], "public-interest", "upstream-unavailable")) == 1
    # A dataset the catalogue knows keeps its label when refused; before the
    # token is read the purpose is unknown; an unknown id is never a label.
    assert moved(_calls(closed["id"], "public-interest", str(closed_code))) == 1
    assert moved(_calls(free["id"], "unknown", "token-required")) == 1
    assert moved(_calls("unknown", "public-interest", "unknown-dataset")) == 1
    assert not any("no-such-dataset" in name for name in after)

    for code, count in {
        "quota-exhausted": 1,
        "payment-required": 1,
        "rate-limited": 1,
        "upstream-unavailable": 1,
        "token-required": 1,
        "unknown-dataset": 1,
        str(closed_code): 1,
    }.items():
        assert moved(f'pdg_data_refusals_total{{code="{code}"}}') == count, code
    for pool in ("free", "paid", "burst"):
        assert moved(f'pdg_quota_refusals_total{{pool="{pool}"}}') == 1, pool

    assert moved('pdg_tokens_issued_total{method="client_secret_basic"}') == 2
    assert sum(moved(name) for name in after if name.startswith("pdg_token_refusals_total{")) == 1

    served = sum(1 for _, status, _ in answers if status == 200)
    upstream_counts = sum(moved(name) for name in after if name.startswith("pdg_upstream_seconds_count{"))
    overhead_counts = sum(
        moved(name) for name in after if name.startswith("pdg_gateway_overhead_seconds_count{")
    )
    assert upstream_counts == overhead_counts == served


async def test_without_a_writer_the_backlog_and_its_lag_grow(world_factory: WorldFactory) -> None:
    """No ledger writer: every record stays in the log, so the backlog
    counts them and the writer lag is the oldest one's age."""
    world = await world_factory(ledger__run_writer=False)
    ds, _lic, _app, token = await world.licensed()
    first = await _scrape(world)
    assert first["pdg_ledger_log_backlog"] == 0
    assert first["pdg_ledger_writer_lag_seconds"] == 0
    for _ in range(3):
        status, body, _ = await world.call(f"/data/{ds['id']}/records", token)
        assert status == 200, body
    seen: dict[str, float] = {}
    for _ in range(60):  # the next heartbeats read the log
        await asyncio.sleep(0.1)
        seen = await _scrape(world)
        if seen["pdg_ledger_log_backlog"] >= 3 and seen["pdg_ledger_writer_lag_seconds"] > 0:
            break
    assert seen["pdg_ledger_log_backlog"] == 3, seen
    lag = seen["pdg_ledger_writer_lag_seconds"]
    assert 0 < lag < 60, lag
    await asyncio.sleep(1.5)
    later = await _scrape(world)
    assert later["pdg_ledger_writer_lag_seconds"] > lag, (lag, later["pdg_ledger_writer_lag_seconds"])
