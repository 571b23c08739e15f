"""Hostile input against the admin API, driven by its own OpenAPI document.

schemathesis reads ``/admin/v1/openapi.json`` from the running gateway and, for
every operation, sends a bounded, derandomized set of generated requests:
schema-valid and schema-violating ones with a token whose role may do the
operation (on made-up ids, and on the ids of real resources: a dataset, a
licensee, a licence, an app, a call and an invoice of a closed period), and a
few with no token or a wrong one. Every answer must be no 5xx, carry a status
code, content type and headers the document lists for the operation, and a
body that matches the listed schema.

The generated requests run in a worker thread (schemathesis sends them with
``requests``) while the gateway keeps serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import given
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.state import ADMIN_TOKENS, CLOCK
from licensing.schemas import AdminTokenIn
from tests.conftest import World
from tests.test_hostile_data_plane import bounded
from tests.test_ledger import records_of
from tests.test_quota import StoppedClock

pytestmark = pytest.mark.timeout(600)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

#: The role whose token may call an operation with this ``x-pdg-permission``.
ROLE_FOR = {
    "read": "licence-admin",
    "catalogue:write": "licence-admin",
    "licensing:write": "licence-admin",
    "keys:write": "licence-admin",
    "billing:write": "finance",
    "billing:reconcile": "finance",
    "audit:read": "auditor",
}

#: Headers aiohttp's HTTP parser reads itself: a malformed one gets the HTTP
#: layer's own 400 (a problem, tests/test_path_escape.py) before the admin API
#: runs, so generated cases leave them out.
PARSER_OWNED = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}

#: Generated cases per operation and generation mode (bounded: the whole file
#: stays well under a minute per backend).
EXAMPLES = 8
SEEDED_EXAMPLES = 5
UNAUTHENTICATED_EXAMPLES = 2


async def admin_schema(world: World) -> Any:
    async with world.client.get("/admin/v1/openapi.json") as resp:
        assert resp.status == 200
        document = await resp.json()
    return schemathesis.openapi.from_dict(document)


async def seeded(world: World) -> tuple[dict[str, str], dict[str, str]]:
    """Real resources of every kind, and tokens: ``(ids by path, tokens by role)``.

    The gateway's clock stands in November 2026 for three calls, then moves to
    December so that November can be closed into an invoice."""
    clock = StoppedClock(datetime(2026, 11, 20, 4, 0, tzinfo=UTC))
    world.app[CLOCK].source = clock
    ds, lic, app, tok = await world.licensed(purpose="industrial")
    call_ids = []
    for _ in range(3):
        status, body, resp = await world.call(f"/data/{ds['id']}/records", tok)
        assert status == 200, body
        call_ids.append(resp.headers["X-Call-Id"])
    assert len(await records_of(world, 3)) == 3
    clock.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    finance = await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="finance"))
    auditor = await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="auditor"))
    tokens = {"licence-admin": world.admin_token, "finance": finance.token, "auditor": auditor.token}
    headers = {"Authorization": f"Bearer {finance.token}"}
    async with world.client.post("/admin/v1/billing/2026-11/close?issue=true", headers=headers) as resp:
        closed = await resp.json()
        assert resp.status == 201, closed
    async with world.client.get("/admin/v1/invoices", headers=headers) as resp:
        invoices = await resp.json()
    assert len(invoices) == 1, closed
    ids = {
        "/admin/v1/datasets/{id}": ds["id"],
        "/admin/v1/licensees/{id}": lic["licensee_id"],
        "/admin/v1/licences/{id}": lic["id"],
        "/admin/v1/apps/{id}": app["id"],
        "/admin/v1/calls/{id}": call_ids[0],
        "/admin/v1/invoices/{id}": invoices[0]["id"],
    }
    return ids, tokens


def real_path_parameters(path: str, ids: Mapping[str, str]) -> dict[str, str] | None:
    """The path parameters naming a real resource for this operation's path, if any."""
    for prefix, value in ids.items():
        if path.startswith(prefix):
            return {"id": value}
    if "{period}" in path:
        return {"period": "2026-11"}
    return None


async def run_operations(
    world: World,
    examples: int,
    modes: tuple[GenerationMode, ...],
    headers_for: Callable[[Any], list[dict[str, str]]],
    *,
    path_parameters: Mapping[str, str] | None = None,
    expect: Callable[[int], bool] = lambda status: True,
) -> tuple[Counter[str], Counter[int]]:
    """Generated cases for every operation: ``(calls by operation, answers by status)``.

    ``path_parameters`` (ids by path) fixes the path parameters of the
    operations that name a real resource, and skips the others."""
    schema = await admin_schema(world)
    base_url = str(world.client.make_url("")).rstrip("/")
    calls: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    session = requests.Session()

    def exercise(operation: Any, strategy: Any, headers: dict[str, str]) -> None:
        @bounded(examples)
        @given(case=strategy)
        def check(case: Case) -> None:
            calls[operation.label] += 1
            response = case.call(base_url=base_url, session=session, headers=headers)
            statuses[response.status_code] += 1
            assert expect(response.status_code), (case.path, response.status_code)
            case.validate_response(response, checks=CHECKS)

        check()

    def run() -> None:
        for result in schema.get_all_operations():
            operation = result.ok()
            fixed = None
            if path_parameters is not None:
                fixed = real_path_parameters(operation.path, path_parameters)
                if fixed is None:
                    continue
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed).filter(
                    lambda case: not PARSER_OWNED & {name.lower() for name in case.headers or {}}
                )
                for headers in headers_for(operation):
                    try:
                        exercise(operation, strategy, headers)
                    except (AssertionError, schemathesis.errors.FailureGroup) as exc:
                        failures.append(f"{operation.label} [{mode.value}]: {exc}")

    await asyncio.to_thread(run)
    assert not failures, "\n\n".join(failures)
    return calls, statuses


def operation_labels(schema: Any) -> set[str]:
    return {result.ok().label for result in schema.get_all_operations()}


async def test_every_admin_operation_answers_generated_requests_as_documented(world: World) -> None:
    ids, tokens = await seeded(world)

    def with_role(operation: Any) -> list[dict[str, str]]:
        role = ROLE_FOR[operation.definition.raw["x-pdg-permission"]]
        return [{"Authorization": f"Bearer {tokens[role]}"}]

    both = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    calls, statuses = await run_operations(world, EXAMPLES, both, with_role)
    labels = operation_labels(await admin_schema(world))
    assert set(calls) == labels
    assert min(calls.values()) > 0
    assert statuses[400] > 0

    real_calls, real_statuses = await run_operations(
        world, SEEDED_EXAMPLES, (GenerationMode.POSITIVE,), with_role, path_parameters=ids
    )
    assert {label for label in labels if "{" in label} == set(real_calls)
    assert min(real_calls.values()) > 0
    assert real_statuses[200] > 0


async def test_every_admin_operation_refuses_a_missing_or_wrong_token(world: World) -> None:
    def no_or_wrong_token(operation: Any) -> list[dict[str, str]]:
        return [{}, {"Authorization": "Bearer pdga_0000_wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}]

    calls, statuses = await run_operations(
        world,
        UNAUTHENTICATED_EXAMPLES,
        (GenerationMode.POSITIVE,),
        no_or_wrong_token,
        expect=lambda status: status == 401,
    )
    assert set(calls) == operation_labels(await admin_schema(world))
    assert min(calls.values()) > 0
    assert set(statuses) == {401}


async def test_ids_and_filters_no_database_can_hold_match_nothing(world: World) -> None:
    """NUL (which PostgreSQL refuses even as a query parameter) in an id or a
    query value: an ``{id}`` is not found, a filtered list is empty, another
    query value is a 400; never a 500 (found by the generated requests above)."""
    ids, tokens = await seeded(world)
    finance = {"Authorization": f"Bearer {tokens['finance']}"}
    for path in ("/calls/a%00", "/invoices/a%00", "/invoices/a%00/notes", "/licences/%00", "/apps/a%00"):
        status, body, _ = await world.call(f"/admin/v1{path}", headers=world.admin)
        assert (status, body["code"]) == (404, "not-found"), (path, body)
    for query in ("dataset=%00", "licensee=a%00", "request_id=%00", "licensee=%ED%A0%80"):
        for path in ("/calls", "/invoices", "/usage", "/licences", "/apps"):
            status, body, _ = await world.call(f"/admin/v1{path}?{query}", headers=world.admin)
            assert (status, body) == (200, []), (path, query, body)
    status, body, _ = await world.call("/admin/v1/billing/2026-11/export?licensee=%00", headers=finance)
    assert (status, body["code"], body["field"]) == (400, "bad-request", "licensee"), body
    status, body, _ = await world.call("/admin/v1/billing/2026-11/export", headers=finance)
    assert status == 200, body
    assert [invoice["id"] for invoice in body["invoices"]] == [ids["/admin/v1/invoices/{id}"]]
