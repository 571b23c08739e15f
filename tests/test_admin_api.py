"""The admin API (DESIGN §3 "Admin API resources", "Admin tokens", §7 bad input),
driven through the running gateway on every backend.

Every refused write is followed by a look at the list endpoints: nothing
half-written. A fuzz of random JSON payloads against every POST endpoint
asserts the gateway never answers 5xx.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.state import ADMIN_TOKENS
from licensing.credit_code import with_check_character
from licensing.schemas import AdminTokenIn
from tests.conftest import World, credit_code

Json = Any


async def request(
    world: World,
    method: str,
    path: str,
    payload: Json = None,
    *,
    raw: bytes | None = None,
    token: str | bool | None = True,
) -> tuple[int, Json, dict[str, str]]:
    """One admin API request: ``token=True`` is the fixture's licence-admin token,
    a string is that token, ``None``/``False`` sends no Authorization header."""
    headers: dict[str, str] = {}
    if token is True:
        headers.update(world.admin)
    elif isinstance(token, str):
        headers["Authorization"] = f"Bearer {token}"
    body: bytes | None = raw
    if body is None and payload is not None:
        body = json.dumps(payload).encode()
    if method in ("POST", "PATCH", "PUT"):
        # The admin API takes application/json only (415 otherwise).
        headers["Content-Type"] = "application/json"
    async with world.client.request(method, f"/admin/v1{path}", data=body, headers=headers) as resp:
        text = await resp.read()
        data = json.loads(text) if text else None
        return resp.status, data, dict(resp.headers)


async def snapshot(world: World) -> dict[str, list[Json]]:
    """Everything the list endpoints show (the state a refused write must not change)."""
    state = {}
    for resource in ("datasets", "licensees", "licences", "apps"):
        status, body, _ = await request(world, "GET", f"/{resource}")
        assert status == 200, body
        state[resource] = body
    return state


def assert_problem(status: int, body: Json, expected: int, code: str, field: str | None = None) -> None:
    assert status == expected, body
    assert body["status"] == expected
    assert body["code"] == code
    assert body["type"].endswith(code)
    assert body["title"]
    assert body["detail"]
    assert body["instance"]
    if field is not None:
        assert body.get("field") == field, body


#: A public key set (RFC 7517 example key) for ``private_key_jwt`` apps.
JWKS = {
    "keys": [
        {
            "kty": "EC",
            "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
            "kid": "k1",
        }
    ]
}


def dataset_payload(world: World, dataset_id: str, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": dataset_id,
        "name": "Enterprise registry",
        "provider": "market-regulation",
        "upstream_url": world.upstream.url,
        "classification": 2,
        "open_class": "conditional",
        "free_monthly_calls": 500,
        "price": {
            "per_call_fen": "2.5",
            "per_record_fen": "0.0125",
            "tiers": [{"up_to": 1000, "per_call_fen": "3"}, {"up_to": None, "per_call_fen": "1.5"}],
        },
        "revenue_split": {"provider": "0.3333", "operator": "0.3333", "public_fund": "0.3334"},
        "burst": {"per_second": 50, "capacity": 20},
        "max_records_per_call": 1000,
    }
    payload.update(fields)
    return payload


def licence_payload(licensee_id: str, datasets: list[str], **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "licensee_id": licensee_id,
        "datasets": datasets,
        "max_classification": 2,
        "purposes": ["public-interest", "industrial"],
        "valid_from": "2024-01-01T00:00:00+08:00",
        "valid_until": "2099-01-01T00:00:00Z",
        "security_officer": "Officer Li",
        "paid": {"credit_limit_fen": 100000},
    }
    payload.update(fields)
    return payload


# -- resources ------------------------------------------------------------------


async def test_dataset_create_get_list_and_patch(world: World) -> None:
    status, created, headers = await request(
        world, "POST", "/datasets", dataset_payload(world, "ent-registry")
    )
    assert status == 201, created
    assert headers["Location"] == "/admin/v1/datasets/ent-registry"
    assert created["id"] == "ent-registry"
    assert created["name"] == "Enterprise registry"
    assert created["provider"] == "market-regulation"
    assert created["upstream_url"] == world.upstream.url
    assert created["classification"] == 2
    assert created["open_class"] == "conditional"
    assert created["free_monthly_calls"] == 500
    # Prices are decimal strings with up to 4 places of a fen, kept exactly.
    assert created["price"] == {
        "per_call_fen": "2.5",
        "per_record_fen": "0.0125",
        "tiers": [{"up_to": 1000, "per_call_fen": "3"}, {"up_to": None, "per_call_fen": "1.5"}],
    }
    assert created["revenue_split"] == {"provider": "0.3333", "operator": "0.3333", "public_fund": "0.3334"}
    assert created["burst"] == {"per_second": 50, "capacity": 20}
    # Operations default to reading; records priced come with their bound.
    assert (created["methods"], created["paths"]) == (["GET", "HEAD"], [])
    assert (created["max_records_per_call"], created["max_response_bytes"]) == (1000, None)
    for stamp in ("created_at", "updated_at"):
        assert created[stamp].endswith(("Z", "+00:00"))

    status, got, _ = await request(world, "GET", "/datasets/ent-registry")
    assert status == 200
    assert got == created
    status, listed, _ = await request(world, "GET", "/datasets")
    assert status == 200
    assert [d["id"] for d in listed] == ["ent-registry"]
    assert listed[0] == created

    # Defaults: no price, default burst; trailing zeros are normalised.
    minimal = {
        k: v
        for k, v in dataset_payload(world, "weather").items()
        if k not in ("price", "burst", "free_monthly_calls")
    }
    status, weather, _ = await request(world, "POST", "/datasets", minimal)
    assert status == 201, weather
    assert weather["price"] == {"per_call_fen": "0", "per_record_fen": "0", "tiers": []}
    assert weather["free_monthly_calls"] == 0
    assert weather["burst"]["capacity"] >= 1

    # PATCH changes only what it names.
    patch = {
        "classification": 3,
        "price": {"per_call_fen": "1.2500", "per_record_fen": "0.0001"},
        "revenue_split": {"provider": "1", "operator": "0", "public_fund": "0"},
        "name": "  Registry v2  ",
    }
    status, patched, _ = await request(world, "PATCH", "/datasets/ent-registry", patch)
    assert status == 200, patched
    assert patched["classification"] == 3
    assert patched["price"] == {"per_call_fen": "1.25", "per_record_fen": "0.0001", "tiers": []}
    assert patched["revenue_split"] == {"provider": "1", "operator": "0", "public_fund": "0"}
    assert patched["name"] == "Registry v2"
    assert patched["open_class"] == "conditional"
    # Records stay priced, so their bound may not go.
    status, problem, _ = await request(
        world, "PATCH", "/datasets/ent-registry", {"max_records_per_call": None}
    )
    assert (status, problem["field"]) == (400, "max_records_per_call"), problem
    status, unbounded, _ = await request(
        world,
        "POST",
        "/datasets",
        dataset_payload(world, "unbounded", max_records_per_call=None),
    )
    assert (status, unbounded["field"]) == (400, "max_records_per_call"), unbounded
    assert patched["burst"] == created["burst"]
    assert patched["created_at"] == created["created_at"]
    status, got, _ = await request(world, "GET", "/datasets/ent-registry")
    assert got == patched

    # A refused PATCH changes nothing.
    before = await snapshot(world)
    for bad, field in (
        ({"classification": 5}, "classification"),
        ({"open_class": "secret"}, "open_class"),
        ({"price": {"per_call_fen": "0.00001"}}, "price.per_call_fen"),
        ({"revenue_split": {"provider": "0.5", "operator": "0.5", "public_fund": "0.5"}}, "revenue_split"),
        ({"id": "renamed"}, "id"),
        ({"upstream_url": "ftp://example.com/x"}, "upstream_url"),
    ):
        status, body, _ = await request(world, "PATCH", "/datasets/ent-registry", bad)
        assert_problem(status, body, 400, "bad-request", field)
    assert await snapshot(world) == before

    status, body, _ = await request(world, "PATCH", "/datasets/nope", {"classification": 1})
    assert_problem(status, body, 404, "not-found")
    status, body, _ = await request(world, "GET", "/datasets/nope")
    assert_problem(status, body, 404, "not-found")
    # An id no dataset can have (NUL, very long) is simply not found.
    for weird in ("%00", "a" * 300, "%F0%9F%92%A9"):
        status, body, _ = await request(world, "GET", f"/datasets/{weird}")
        assert_problem(status, body, 404, "not-found")
    status, body, _ = await request(world, "POST", "/datasets", dataset_payload(world, "ent-registry"))
    assert_problem(status, body, 409, "conflict")
    assert await snapshot(world) == before


async def test_licensee_credit_codes(world: World) -> None:
    code = with_check_character("91420100MA4K8B7J2")
    status, created, headers = await request(
        world,
        "POST",
        "/licensees",
        {
            "id": "wuhan-smart",
            "name": "武汉智慧城市",
            "credit_code": code.lower(),
            "contact": "ops@example.com",
        },
    )
    assert status == 201, created
    assert headers["Location"] == "/admin/v1/licensees/wuhan-smart"
    assert created["id"] == "wuhan-smart"
    assert created["name"] == "武汉智慧城市"
    assert created["credit_code"] == code  # normalised to upper case
    assert created["contact"] == "ops@example.com"
    status, got, _ = await request(world, "GET", "/licensees/wuhan-smart")
    assert (status, got) == (200, created)

    # Without an id, one is made.
    status, other, _ = await request(
        world, "POST", "/licensees", {"name": "Other", "credit_code": credit_code()}
    )
    assert status == 201, other
    assert other["id"]
    assert other["contact"] == ""
    status, listed, _ = await request(world, "GET", "/licensees")
    assert sorted(x["id"] for x in listed) == sorted(["wuhan-smart", other["id"]])

    before = await snapshot(world)
    wrong_check = code[:17] + ("0" if code[17] != "0" else "1")
    for bad in (
        wrong_check,  # GB 32100-2015 check character does not match
        code[:17],  # too short
        code + "1",  # too long
        code[:16] + "I" + code[17],  # I is not in the alphabet
        "",
        12345678901234567,
        None,
    ):
        status, body, _ = await request(world, "POST", "/licensees", {"name": "Bad", "credit_code": bad})
        assert_problem(status, body, 400, "bad-request", "credit_code")
    status, body, _ = await request(world, "POST", "/licensees", {"name": "No code"})
    assert_problem(status, body, 400, "bad-request", "credit_code")
    status, body, _ = await request(world, "POST", "/licensees", {"credit_code": credit_code()})
    assert_problem(status, body, 400, "bad-request", "name")
    # Duplicates: the same credit code (in any case), the same id.
    status, body, _ = await request(world, "POST", "/licensees", {"name": "Dup", "credit_code": code})
    assert_problem(status, body, 409, "conflict")
    status, body, _ = await request(
        world, "POST", "/licensees", {"id": "wuhan-smart", "name": "Dup", "credit_code": credit_code()}
    )
    assert_problem(status, body, 409, "conflict")
    status, body, _ = await request(world, "GET", "/licensees/nobody")
    assert_problem(status, body, 404, "not-found")
    assert await snapshot(world) == before


async def test_licence_create_and_status_transitions(world: World) -> None:
    ds = await world.dataset()
    holder = await world.licensee()
    payload = licence_payload(
        holder["id"],
        [ds["id"], "test-provider/*", ds["id"]],
        id="lic-1",
        conditions="no resale",
        free_monthly_calls=42,
    )
    status, lic, headers = await request(world, "POST", "/licences", payload)
    assert status == 201, lic
    assert headers["Location"] == "/admin/v1/licences/lic-1"
    assert lic["id"] == "lic-1"
    assert lic["licensee_id"] == holder["id"]
    assert lic["datasets"] == [ds["id"], "test-provider/*"]  # repeats dropped
    assert lic["max_classification"] == 2
    assert lic["purposes"] == ["public-interest", "industrial"]
    assert lic["valid_from"].startswith("2023-12-31T16:00:00")  # kept as the same instant, in UTC
    assert lic["valid_until"].startswith("2099-01-01T00:00:00")
    assert lic["status"] == "active"
    assert lic["security_officer"] == "Officer Li"
    assert lic["conditions"] == "no resale"
    assert lic["free_monthly_calls"] == 42
    assert lic["paid"] == {"credit_limit_fen": 100000, "prepaid_calls": None}
    status, got, _ = await request(world, "GET", "/licences/lic-1")
    assert (status, got) == (200, lic)

    # Prepaid calls, no paid plan at all, and a window that has passed.
    status, prepaid, _ = await request(
        world, "POST", "/licences", licence_payload(holder["id"], [ds["id"]], paid={"prepaid_calls": 10})
    )
    assert status == 201, prepaid
    assert prepaid["paid"] == {"credit_limit_fen": None, "prepaid_calls": 10}
    free_only = licence_payload(holder["id"], [ds["id"]], purposes=["public-interest"])
    del free_only["paid"]
    status, free, _ = await request(world, "POST", "/licences", free_only)
    assert status == 201, free
    assert free["paid"] is None
    old = licence_payload(
        holder["id"], [ds["id"]], valid_from="2020-01-01T00:00:00Z", valid_until="2021-01-01T00:00:00Z"
    )
    status, expired, _ = await request(world, "POST", "/licences", old)
    assert status == 201, expired
    assert expired["status"] == "expired"

    other = await world.licensee()
    await world.licence(other["id"], [ds["id"]])
    status, listed, _ = await request(world, "GET", f"/licences?licensee={holder['id']}")
    assert status == 200
    assert sorted(x["id"] for x in listed) == sorted(["lic-1", prepaid["id"], free["id"], expired["id"]])
    status, listed, _ = await request(world, "GET", "/licences")
    assert len(listed) == 5
    status, listed, _ = await request(world, "GET", "/licences?licensee=nobody")
    assert (status, listed) == (200, [])

    # active -> suspended -> active -> revoked; revoked is final.
    async def act(action: str) -> tuple[int, Json]:
        status, body, _ = await request(world, "POST", f"/licences/lic-1/{action}")
        return status, body

    status, body = await act("suspend")
    assert (status, body["status"]) == (200, "suspended"), body
    status, body = await act("suspend")  # idempotent
    assert (status, body["status"]) == (200, "suspended"), body
    status, body = await act("resume")
    assert (status, body["status"]) == (200, "active"), body
    status, body = await act("revoke")
    assert (status, body["status"]) == (200, "revoked"), body
    before = await snapshot(world)
    for action in ("resume", "suspend"):
        status, body = await act(action)
        assert_problem(status, body, 409, "conflict")
    status, body = await act("revoke")
    assert (status, body["status"]) == (200, "revoked"), body
    assert await snapshot(world) == before
    status, got, _ = await request(world, "GET", "/licences/lic-1")
    assert got["status"] == "revoked"
    for action in ("suspend", "resume", "revoke"):
        status, body, _ = await request(world, "POST", f"/licences/nope/{action}")
        assert_problem(status, body, 404, "not-found")

    # Duplicate id; unknown licensee.
    status, body, _ = await request(
        world, "POST", "/licences", licence_payload(holder["id"], [ds["id"]], id="lic-1")
    )
    assert_problem(status, body, 409, "conflict")
    status, body, _ = await request(world, "POST", "/licences", licence_payload("nobody", [ds["id"]]))
    assert_problem(status, body, 400, "bad-request", "licensee_id")
    assert await snapshot(world) == before


async def test_app_secret_is_shown_once_and_apps_can_be_disabled(world: World) -> None:
    ds = await world.dataset()
    holder = await world.licensee()
    await world.licence(holder["id"], [ds["id"]])
    status, app, headers = await request(
        world, "POST", "/apps", {"licensee_id": holder["id"], "name": "dashboard"}
    )
    assert status == 201, app
    assert headers["Location"] == f"/admin/v1/apps/{app['id']}"
    assert app["client_id"] == app["id"]
    assert app["licensee_id"] == holder["id"]
    assert app["name"] == "dashboard"
    assert app["auth_method"] == "client_secret"
    assert app["enabled"] is True
    secret = app["client_secret"]
    assert isinstance(secret, str)
    assert len(secret) >= 32

    status, got, _ = await request(world, "GET", f"/apps/{app['id']}")
    assert status == 200
    assert got.get("client_secret") is None
    status, listed, _ = await request(world, "GET", "/apps")
    assert [a["id"] for a in listed] == [app["id"]]
    assert all(a.get("client_secret") is None for a in listed)
    assert secret not in json.dumps(listed)

    # The secret that was shown once works at the token endpoint.
    scope = f"purpose:public-interest dataset:{ds['id']}"
    status, body = await world.token_response(app, scope)
    assert status == 200, body

    status, off, _ = await request(world, "POST", f"/apps/{app['id']}/disable")
    assert (status, off["enabled"]) == (200, False), off
    assert off.get("client_secret") is None
    status, body = await world.token_response(app, scope)
    assert status in (400, 401, 403), body
    status, on, _ = await request(world, "POST", f"/apps/{app['id']}/enable")
    assert (status, on["enabled"]) == (200, True), on
    status, body = await world.token_response(app, scope)
    assert status == 200, body

    # A private_key_jwt app: public keys in, no secret out.
    jwks = JWKS
    status, jwt_app, _ = await request(
        world, "POST", "/apps", {"id": "signer", "licensee_id": holder["id"], "name": "signer", "jwks": jwks}
    )
    assert status == 201, jwt_app
    assert jwt_app["auth_method"] == "private_key_jwt"
    assert jwt_app.get("client_secret") is None

    before = await snapshot(world)
    for bad, field in (
        ({"licensee_id": "nobody", "name": "x"}, "licensee_id"),
        ({"licensee_id": holder["id"]}, "name"),
        ({"name": "x"}, "licensee_id"),
        ({"licensee_id": holder["id"], "name": "x", "jwks": {"keys": []}}, "jwks"),
        (
            {
                "licensee_id": holder["id"],
                "name": "x",
                "jwks": {"keys": [{**jwks["keys"][0], "d": "secret"}]},
            },
            "jwks",
        ),
        ({"licensee_id": holder["id"], "name": "x", "client_secret": "mine"}, "client_secret"),
    ):
        status, body, _ = await request(world, "POST", "/apps", bad)
        assert_problem(status, body, 400, "bad-request", field)
    status, body, _ = await request(
        world, "POST", "/apps", {"id": "signer", "licensee_id": holder["id"], "name": "x"}
    )
    assert_problem(status, body, 409, "conflict")
    for action in ("disable", "enable"):
        status, body, _ = await request(world, "POST", f"/apps/nope/{action}")
        assert_problem(status, body, 404, "not-found")
    assert await snapshot(world) == before


# -- bad input --------------------------------------------------------------------


async def test_malformed_payloads_name_the_field_and_write_nothing(world: World) -> None:
    ds = await world.dataset()
    holder = await world.licensee()
    good_licence = licence_payload(holder["id"], [ds["id"]])

    def without(payload: dict[str, Any], name: str) -> dict[str, Any]:
        return {k: v for k, v in payload.items() if k != name}

    def dataset(**fields: Any) -> dict[str, Any]:
        return dataset_payload(world, "fresh", **fields)

    split = {"provider": "0.5", "operator": "0.3", "public_fund": "0.2"}
    cases: list[tuple[str, Json, str]] = [
        # datasets
        ("/datasets", without(dataset(), "classification"), "classification"),
        ("/datasets", dataset(classification=0), "classification"),
        ("/datasets", dataset(classification=5), "classification"),
        ("/datasets", dataset(classification="2"), "classification"),
        ("/datasets", dataset(classification=True), "classification"),
        ("/datasets", dataset(classification=2.5), "classification"),
        ("/datasets", dataset(open_class="secret"), "open_class"),
        ("/datasets", dataset(id="Has Spaces"), "id"),
        ("/datasets", dataset(id=""), "id"),
        ("/datasets", dataset(id="x" * 65), "id"),
        ("/datasets", without(dataset(), "id"), "id"),
        ("/datasets", dataset(name=""), "name"),
        ("/datasets", dataset(name="x" * 201), "name"),
        ("/datasets", dataset(name="nul\x00name"), "name"),
        ("/datasets", dataset(provider="Bad/Provider"), "provider"),
        ("/datasets", dataset(upstream_url="not a url"), "upstream_url"),
        ("/datasets", dataset(upstream_url="file:///etc/passwd"), "upstream_url"),
        ("/datasets", dataset(upstream_url="http://example.com/" + "a" * 1200), "upstream_url"),
        ("/datasets", dataset(upstream_url="http://example.com/svc?key=1"), "upstream_url"),
        ("/datasets", dataset(upstream_url="http://example.com/svc#top"), "upstream_url"),
        ("/datasets", dataset(upstream_url="http://user:pw@example.com/svc"), "upstream_url"),
        ("/datasets", dataset(free_monthly_calls=-1), "free_monthly_calls"),
        ("/datasets", dataset(free_monthly_calls=10**30), "free_monthly_calls"),
        ("/datasets", dataset(price={"per_call_fen": "0.00001"}), "price.per_call_fen"),
        ("/datasets", dataset(price={"per_call_fen": 2.5}), "price.per_call_fen"),
        ("/datasets", dataset(price={"per_call_fen": "-1"}), "price.per_call_fen"),
        ("/datasets", dataset(price={"per_call_fen": "NaN"}), "price.per_call_fen"),
        ("/datasets", dataset(price={"per_call_fen": "1e3"}), "price.per_call_fen"),
        ("/datasets", dataset(price={"per_call_fen": "\uff11\uff12"}), "price.per_call_fen"),  # fullwidth
        ("/datasets", dataset(price={"per_record_fen": "abc"}), "price.per_record_fen"),
        ("/datasets", dataset(price={"per_call_fen": "1" * 20}), "price.per_call_fen"),
        ("/datasets", dataset(price={"tiers": [{"up_to": 0, "per_call_fen": "1"}]}), "price.tiers.0.up_to"),
        (
            "/datasets",
            dataset(price={"tiers": [{"up_to": 10, "per_call_fen": "x"}]}),
            "price.tiers.0.per_call_fen",
        ),
        (
            "/datasets",
            dataset(price={"tiers": [{"up_to": 10, "per_call_fen": "1"}, {"up_to": 5, "per_call_fen": "1"}]}),
            "price.tiers",
        ),
        (
            "/datasets",
            dataset(
                price={"tiers": [{"up_to": None, "per_call_fen": "1"}, {"up_to": 5, "per_call_fen": "1"}]}
            ),
            "price.tiers",
        ),
        ("/datasets", dataset(price="free"), "price"),
        ("/datasets", without(dataset(), "revenue_split"), "revenue_split"),
        ("/datasets", dataset(revenue_split={**split, "public_fund": "0.3"}), "revenue_split"),
        ("/datasets", dataset(revenue_split={**split, "public_fund": "0.1999"}), "revenue_split"),
        ("/datasets", dataset(revenue_split={**split, "provider": "0.50001"}), "revenue_split.provider"),
        ("/datasets", dataset(revenue_split={**split, "provider": "-0.5"}), "revenue_split.provider"),
        ("/datasets", dataset(revenue_split={**split, "provider": 0.5}), "revenue_split.provider"),
        ("/datasets", dataset(revenue_split=without(split, "operator")), "revenue_split.operator"),
        ("/datasets", dataset(revenue_split={**split, "tax": "0"}), "revenue_split.tax"),
        ("/datasets", dataset(burst={"per_second": 0, "capacity": 1}), "burst.per_second"),
        ("/datasets", dataset(burst={"per_second": 1, "capacity": 0}), "burst.capacity"),
        ("/datasets", dataset(burst={"per_second": 1, "capacity": 1.5}), "burst.capacity"),
        ("/datasets", dataset(timeout_seconds=0), "timeout_seconds"),
        ("/datasets", dataset(timeout_seconds=1e9), "timeout_seconds"),
        ("/datasets", dataset(colour="blue"), "colour"),
        ("/datasets", dataset(created_at="2020-01-01T00:00:00Z"), "created_at"),
        # licensees
        ("/licensees", {"name": "x", "credit_code": "91420100MA4K8B7J2X"}, "credit_code"),
        ("/licensees", {"name": "x", "credit_code": credit_code(), "id": "UPPER"}, "id"),
        ("/licensees", {"name": "x", "credit_code": credit_code(), "contact": "c" * 201}, "contact"),
        ("/licensees", {"name": ["x"], "credit_code": credit_code()}, "name"),
        # licences
        ("/licences", without(good_licence, "licensee_id"), "licensee_id"),
        ("/licences", {**good_licence, "licensee_id": "nobody"}, "licensee_id"),
        ("/licences", {**good_licence, "licensee_id": "a\x00b"}, "licensee_id"),
        ("/licences", {**good_licence, "datasets": []}, "datasets"),
        ("/licences", {**good_licence, "datasets": "ds"}, "datasets"),
        ("/licences", {**good_licence, "datasets": ["Bad Id"]}, "datasets.0"),
        ("/licences", {**good_licence, "datasets": ["provider/**"]}, "datasets.0"),
        ("/licences", {**good_licence, "max_classification": 9}, "max_classification"),
        ("/licences", {**good_licence, "purposes": []}, "purposes"),
        ("/licences", {**good_licence, "purposes": ["commercial"]}, "purposes.0"),
        ("/licences", {**good_licence, "purposes": ["industrial", "industrial"]}, "purposes"),
        ("/licences", without(good_licence, "valid_from"), "valid_from"),
        ("/licences", {**good_licence, "valid_from": "yesterday"}, "valid_from"),
        ("/licences", {**good_licence, "valid_from": "2024-01-01T00:00:00"}, "valid_from"),  # no zone
        ("/licences", {**good_licence, "valid_from": "0001-01-01T00:00:00+05:00"}, "valid_from"),
        ("/licences", {**good_licence, "valid_until": "2023-01-01T00:00:00Z"}, "valid_until"),
        ("/licences", {**good_licence, "valid_until": good_licence["valid_from"]}, "valid_until"),
        ("/licences", {**good_licence, "valid_until": "9999-12-31T23:59:59-05:00"}, "valid_until"),
        ("/licences", {**good_licence, "valid_until": 1700000000}, "valid_until"),
        ("/licences", without(good_licence, "security_officer"), "security_officer"),
        ("/licences", {**good_licence, "security_officer": ""}, "security_officer"),
        ("/licences", {**good_licence, "free_monthly_calls": -5}, "free_monthly_calls"),
        ("/licences", {**good_licence, "paid": {}}, "paid"),
        ("/licences", {**good_licence, "paid": {"credit_limit_fen": 1, "prepaid_calls": 1}}, "paid"),
        ("/licences", {**good_licence, "paid": {"prepaid_calls": -1}}, "paid.prepaid_calls"),
        ("/licences", {**good_licence, "paid": {"credit_limit_fen": "100"}}, "paid.credit_limit_fen"),
        ("/licences", {**good_licence, "status": "active"}, "status"),
        # apps
        ("/apps", {"licensee_id": holder["id"], "name": ""}, "name"),
        ("/apps", {"licensee_id": holder["id"], "name": "x", "id": "a b"}, "id"),
        ("/apps", {"licensee_id": holder["id"], "name": "x", "jwks": "keys"}, "jwks"),
        (
            "/apps",
            {"licensee_id": holder["id"], "name": "x", "jwks": {"keys": [{"kty": "oct", "k": "x"}]}},
            "jwks",
        ),
    ]
    before = await snapshot(world)
    for path, payload, field in cases:
        status, body, _ = await request(world, "POST", path, payload)
        assert status == 400, (path, payload, body)
        assert body["code"] == "bad-request", body
        assert body.get("field") == field, (path, payload, body)
        assert body["detail"], body
    assert await snapshot(world) == before


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_bodies_that_are_not_json_objects(world: World, method: str) -> None:
    ds = await world.dataset()
    before = await snapshot(world)
    paths = (
        ["/datasets", "/licensees", "/licences", "/apps"] if method == "POST" else [f"/datasets/{ds['id']}"]
    )
    bodies = [
        b"",
        b"{",
        b"{'id': 1}",
        b"not json",
        b"\xff\xfe\x00\x01",
        b"[]",
        b"[{}]",
        b"null",
        b"42",
        b'"a string"',
        b"true",
        b"{" * 5000,
        b"[" * 100000 + b"]" * 100000,
        b'{"id": "x", "id": ',
        b'{"name": "\\ud800"}',
    ]
    for path in paths:
        for raw in bodies:
            status, body, _ = await request(world, method, path, raw=raw)
            assert_problem(status, body, 400, "bad-request", "body")
    assert await snapshot(world) == before


#: Values that have broken gateways before: NUL, lone surrogates, wrong types,
#: huge or out-of-range values that only some databases refuse.
HOSTILE: list[Json] = [
    None,
    True,
    0,
    -1,
    2**63,
    10**30,
    1.5,
    1e308,
    "",
    " ",
    "0",
    "-1",
    "1e400",
    "NaN",
    "\x00",
    "a\x00b",
    "\ud800",
    "\u202e\u0301",
    "a" * 5000,
    "provider/*",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-05:00",
    "2020-01-01T00:00:00",
    "http://example.com/" + "a" * 1500,
    "http://[::1]:99999/",
    "http://例子.测试/" + "数" * 300,
    [],
    ["\x00"],
    {},
    {"\x00": 1},
    {"keys": [{"kty": "EC", "x": "\x00"}]},
]


#: The few that matter inside nested objects and lists.
HOSTILE_NESTED: list[Json] = [None, True, 2**63, 1.5, "", "-1", "1e400", "a\x00b", "a" * 5000, [], {}]


def _mutations(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """``payload`` with each field (and each field of a nested object)
    replaced by each hostile value, and with each field dropped."""
    out: list[dict[str, Any]] = []
    for key, value in payload.items():
        out.append({k: v for k, v in payload.items() if k != key})
        out.extend({**payload, key: bad} for bad in HOSTILE)
        if isinstance(value, dict):
            for inner in value:
                out.extend({**payload, key: {**value, inner: bad}} for bad in HOSTILE_NESTED)
        if isinstance(value, list) and value:
            out.extend({**payload, key: [bad]} for bad in HOSTILE_NESTED)
    return out


def _fresh(payload: Json, base: dict[str, Any], n: int) -> Json:
    """A new id and credit code where ``payload`` still has the base's, so a
    mutation is not refused as a duplicate before its bad value is stored."""
    if not isinstance(payload, dict):
        return payload
    payload = dict(payload)
    if "id" in base and payload.get("id") == base["id"]:
        payload["id"] = f"{base['id']}-{n}"
    if "credit_code" in base and payload.get("credit_code") == base["credit_code"]:
        payload["credit_code"] = credit_code(100_000 + n)
    return payload


async def test_hostile_field_values_never_cause_a_server_error(world: World) -> None:
    """Table-driven: every field of every write endpoint, each hostile value."""
    ds = await world.dataset()
    holder = await world.licensee()
    bases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/datasets", dataset_payload(world, "hostile")),
        (
            "PATCH",
            f"/datasets/{ds['id']}",
            {k: v for k, v in dataset_payload(world, "x").items() if k != "id"},
        ),
        (
            "POST",
            "/licensees",
            {"id": "hostile", "name": "H", "credit_code": credit_code(11), "contact": "x"},
        ),
        ("POST", "/licences", licence_payload(holder["id"], [ds["id"]], id="hostile", free_monthly_calls=1)),
        # With public keys: no Argon2 hash of a new secret on every success.
        ("POST", "/apps", {"id": "hostile", "licensee_id": holder["id"], "name": "h", "jwks": JWKS}),
    ]
    count = 0
    for method, path, base in bases:
        for payload in _mutations(base):
            payload = _fresh(payload, base, count)
            status, body, _ = await request(world, method, path, payload)
            count += 1
            assert status < 500, (method, path, payload, body)
            assert status in (200, 201, 400, 409), (method, path, payload, body)
    assert count > 800
    for path in ("/datasets/%00", "/licences/%00/suspend", "/apps/%00/disable", "/licences?licensee=%00"):
        status, body, _ = await request(world, "POST" if path.count("/") == 3 else "GET", path)
        assert status in (200, 404), (path, body)


async def test_random_payloads_never_cause_a_server_error(world: World) -> None:
    """Hypothesis drives random JSON (and mutations of valid payloads) at every
    write endpoint; the answer is always 201, 400 or 409, never 5xx."""
    ds = await world.dataset()
    holder = await world.licensee()
    valid: dict[str, dict[str, Any]] = {
        "/datasets": dataset_payload(world, "fuzz"),
        "/licensees": {"id": "fuzz", "name": "Fuzz Co", "credit_code": credit_code(7), "contact": "x"},
        "/licences": licence_payload(holder["id"], [ds["id"]], id="fuzz"),
        "/apps": {"id": "fuzz", "licensee_id": holder["id"], "name": "fuzz", "jwks": JWKS},
        f"/datasets/{ds['id']}": {"name": "patched", "price": {"per_call_fen": "1"}},
    }
    hostile = st.sampled_from(HOSTILE)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30)
        | st.text(st.characters(codec="utf-8", max_codepoint=0x7F), max_size=8)
        | hostile
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )

    @st.composite
    def payloads(draw: st.DrawFn) -> tuple[str, Json]:
        path = draw(st.sampled_from(sorted(valid)))
        base = dict(valid[path])
        how = draw(st.sampled_from(["random", "replace", "drop", "add", "nested"]))
        if how == "random":
            return path, draw(values)
        key = draw(st.sampled_from(sorted(base)))
        if how == "replace":
            base[key] = draw(values)
        elif how == "drop":
            base.pop(key)
        elif how == "add":
            base[draw(st.text(max_size=12))] = draw(values)
        elif isinstance(base[key], dict):
            inner = dict(base[key])
            inner[draw(st.sampled_from([*sorted(inner), "extra"]))] = draw(values)
            base[key] = inner
        else:
            base[key] = [draw(values)]
        return path, base

    loop = asyncio.get_running_loop()
    seen: dict[int, int] = {}
    seen_payloads: list[Json] = []

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads())
    def check(case: tuple[str, Json]) -> None:
        path, payload = case
        method = "PATCH" if path.count("/") == 2 else "POST"
        payload = _fresh(payload, valid[path], len(seen_payloads))
        seen_payloads.append(payload)
        future = asyncio.run_coroutine_threadsafe(request(world, method, path, payload), loop)
        status, body, _ = future.result(timeout=60)
        seen[status] = seen.get(status, 0) + 1
        expected = {200} if method == "PATCH" else {201}
        assert status in {*expected, 400, 409}, (method, path, payload, status, body)
        if status >= 400:
            assert body["code"] in ("bad-request", "conflict"), body

    # Hypothesis runs in a worker thread; the gateway keeps serving on this loop.
    await asyncio.to_thread(check)
    assert seen.get(400, 0) > 0
    status, _, _ = await request(world, "GET", "/datasets")
    assert status == 200


# -- roles and tokens ----------------------------------------------------------------


async def test_admin_tokens_are_required_and_checked(world: World) -> None:
    for token in (None, False):
        status, body, headers = await request(world, "GET", "/datasets", token=token)
        assert_problem(status, body, 401, "admin-token-required")
        assert headers["WWW-Authenticate"].startswith("Bearer")
    for garbage in ("garbage", "pdga_x_y", "pdga_nosuchid_secret", world.admin_token + "x", "pdga__"):
        status, body, headers = await request(world, "GET", "/datasets", token=garbage)
        assert_problem(status, body, 401, "admin-token-required")
        assert "invalid_token" in headers["WWW-Authenticate"]
    async with world.client.get(
        "/admin/v1/datasets", headers={"Authorization": f"Basic {world.admin_token}"}
    ) as resp:
        assert resp.status == 401
    # Writes are refused the same way, and write nothing.
    before = await snapshot(world)
    status, body, _ = await request(world, "POST", "/datasets", dataset_payload(world, "x"), token=None)
    assert_problem(status, body, 401, "admin-token-required")
    assert await snapshot(world) == before

    # A revoked token stops working at once, even after it was just used.
    tokens = world.app[ADMIN_TOKENS]
    made = await tokens.create(AdminTokenIn(role="licence-admin"))
    status, _, _ = await request(world, "GET", "/datasets", token=made.token)
    assert status == 200
    assert await tokens.revoke(made.id)
    status, body, _ = await request(world, "GET", "/datasets", token=made.token)
    assert_problem(status, body, 401, "admin-token-required")


@pytest.mark.parametrize("role", ["viewer", "finance", "auditor"])
async def test_read_only_roles_may_read_but_not_write(world: World, role: str) -> None:
    ds = await world.dataset()
    holder = await world.licensee()
    lic = await world.licence(holder["id"], [ds["id"]])
    app = await world.app_client(holder["id"])
    token = (await world.app[ADMIN_TOKENS].create(AdminTokenIn.model_validate({"role": role}))).token

    for path in (
        "/datasets",
        f"/datasets/{ds['id']}",
        "/licensees",
        f"/licensees/{holder['id']}",
        "/licences",
        f"/licences/{lic['id']}",
        "/apps",
        f"/apps/{app['id']}",
    ):
        status, body, _ = await request(world, "GET", path, token=token)
        assert status == 200, (path, body)
    status, listed, _ = await request(world, "GET", "/apps", token=token)
    assert all(a.get("client_secret") is None for a in listed)

    before = await snapshot(world)
    writes: list[tuple[str, str, Json]] = [
        ("POST", "/datasets", dataset_payload(world, "new-ds")),
        ("PATCH", f"/datasets/{ds['id']}", {"name": "changed"}),
        ("POST", "/licensees", {"name": "x", "credit_code": credit_code()}),
        ("POST", "/licences", licence_payload(holder["id"], [ds["id"]])),
        ("POST", f"/licences/{lic['id']}/suspend", None),
        ("POST", f"/licences/{lic['id']}/resume", None),
        ("POST", f"/licences/{lic['id']}/revoke", None),
        ("POST", "/apps", {"licensee_id": holder["id"], "name": "x"}),
        ("POST", f"/apps/{app['id']}/disable", None),
        ("POST", f"/apps/{app['id']}/enable", None),
    ]
    for method, path, payload in writes:
        status, body, _ = await request(world, method, path, payload, token=token)
        assert_problem(status, body, 403, "forbidden")
    assert await snapshot(world) == before


async def test_licensee_scoped_token_sees_only_its_own(world: World) -> None:
    ds = await world.dataset()
    mine, theirs = await world.licensee(), await world.licensee()
    my_lic = await world.licence(mine["id"], [ds["id"]])
    their_lic = await world.licence(theirs["id"], [ds["id"]])
    my_app = await world.app_client(mine["id"])
    their_app = await world.app_client(theirs["id"])
    tokens = world.app[ADMIN_TOKENS]
    token = (await tokens.create(AdminTokenIn(role="licensee", licensee_id=mine["id"]))).token

    status, listed, _ = await request(world, "GET", "/licensees", token=token)
    assert (status, [x["id"] for x in listed]) == (200, [mine["id"]])
    status, listed, _ = await request(world, "GET", "/licences", token=token)
    assert (status, [x["id"] for x in listed]) == (200, [my_lic["id"]])
    status, listed, _ = await request(world, "GET", "/apps", token=token)
    assert (status, [x["id"] for x in listed]) == (200, [my_app["id"]])
    for resource in ("licences", "apps"):
        status, listed, _ = await request(world, "GET", f"/{resource}?licensee={theirs['id']}", token=token)
        assert (status, listed) == (200, [])
        status, listed, _ = await request(world, "GET", f"/{resource}?licensee={mine['id']}", token=token)
        assert status == 200
        assert len(listed) == 1

    for path in (f"/licensees/{mine['id']}", f"/licences/{my_lic['id']}", f"/apps/{my_app['id']}"):
        status, body, _ = await request(world, "GET", path, token=token)
        assert status == 200, (path, body)
    # Another licensee's resources do not exist, as far as this token can tell.
    for path in (f"/licensees/{theirs['id']}", f"/licences/{their_lic['id']}", f"/apps/{their_app['id']}"):
        status, body, _ = await request(world, "GET", path, token=token)
        assert_problem(status, body, 404, "not-found")
        assert theirs["name"] not in json.dumps(body)

    before = await snapshot(world)
    for method, path, payload in (
        ("POST", "/apps", {"licensee_id": mine["id"], "name": "mine"}),
        ("POST", f"/apps/{my_app['id']}/disable", None),
        ("POST", f"/licences/{my_lic['id']}/suspend", None),
        ("POST", "/licences", licence_payload(mine["id"], [ds["id"]])),
        ("POST", "/licensees", {"name": "x", "credit_code": credit_code()}),
        ("PATCH", f"/datasets/{ds['id']}", {"name": "x"}),
        ("POST", "/datasets", dataset_payload(world, "x")),
    ):
        status, body, _ = await request(world, method, path, payload, token=token)
        assert_problem(status, body, 403, "forbidden")
    assert await snapshot(world) == before

    # A licensee role needs its licensee (and only it takes one).
    from core.errors import ValidationFailedError
    from licensing.schemas import parse

    for bad in ({"role": "licensee"}, {"role": "viewer", "licensee_id": mine["id"]}):
        with pytest.raises(ValidationFailedError) as caught:
            parse(AdminTokenIn, bad)
        assert caught.value.field == "licensee_id"


# -- OpenAPI ---------------------------------------------------------------------------


def _refs(node: Json) -> list[str]:
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                found.append(item["$ref"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _resolve(doc: Json, ref: str) -> Json:
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), ref
        assert part in node, ref
        node = node[part]
    return node


def _properties(doc: Json, schema: Json) -> set[str]:
    if "$ref" in schema:
        schema = _resolve(doc, schema["$ref"])
    return set(schema.get("properties", {}))


async def test_openapi_document_describes_every_admin_route(world: World) -> None:
    async with world.client.get("/admin/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"]
    assert doc["info"]["version"]

    try:
        from openapi_spec_validator import validate
    except ImportError:  # not in the test extra yet: the structural checks below still run
        validate = None
    if validate is not None:
        validate(doc)

    # Every admin route the gateway serves is in the document, with its method.
    served: set[tuple[str, str]] = set()
    for route in world.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/admin/v1/") and path != "/admin/v1/openapi.json" and route.method != "HEAD":
            served.add((path, route.method.lower()))
    documented = {
        (path, method) for path, item in doc["paths"].items() for method in item if method != "parameters"
    }
    assert served
    assert served == documented

    operation_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"], (path, method)
            assert "401" in op["responses"]
            if "{id}" in path:
                params = [p for p in op["parameters"] if p["in"] == "path"]
                assert [p["name"] for p in params] == ["id"]
                assert params[0]["required"] is True

    # Every $ref resolves.
    refs = _refs(doc)
    assert refs
    for ref in refs:
        _resolve(doc, ref)

    def request_fields(path: str, method: str) -> set[str]:
        schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        return _properties(doc, schema)

    def response_fields(path: str, method: str, status: str) -> set[str]:
        schema = doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        if schema.get("type") == "array":
            schema = schema["items"]
        return _properties(doc, schema)

    dataset_fields = {
        "id", "name", "provider", "upstream_url", "classification", "open_class",
        "free_monthly_calls", "price", "revenue_split", "burst",
    }  # fmt: skip
    assert dataset_fields <= request_fields("/admin/v1/datasets", "post")
    assert dataset_fields - {"id"} <= request_fields("/admin/v1/datasets/{id}", "patch")
    assert dataset_fields <= response_fields("/admin/v1/datasets", "get", "200")
    assert dataset_fields <= response_fields("/admin/v1/datasets/{id}", "get", "200")
    schemas = doc["components"]["schemas"]
    price = next(v for k, v in schemas.items() if k.startswith("Price"))
    assert {"per_call_fen", "per_record_fen", "tiers"} <= set(price["properties"])
    tier = next(v for k, v in schemas.items() if k.startswith("Tier"))
    assert {"up_to", "per_call_fen"} <= set(tier["properties"])
    split = next(v for k, v in schemas.items() if k.startswith("RevenueSplit"))
    assert set(split["properties"]) == {"provider", "operator", "public_fund"}
    burst = next(v for k, v in schemas.items() if k.startswith("Burst"))
    assert {"per_second", "capacity"} <= set(burst["properties"])

    assert {"id", "name", "credit_code", "contact"} <= request_fields("/admin/v1/licensees", "post")
    licence_fields = {
        "id", "licensee_id", "datasets", "max_classification", "purposes", "valid_from",
        "valid_until", "security_officer", "free_monthly_calls", "paid",
    }  # fmt: skip
    assert licence_fields <= request_fields("/admin/v1/licences", "post")
    assert licence_fields | {"status"} <= response_fields("/admin/v1/licences/{id}", "get", "200")
    paid = next(v for k, v in schemas.items() if k.startswith("Paid"))
    assert {"credit_limit_fen", "prepaid_calls"} <= set(paid["properties"])
    assert {"id", "licensee_id", "name", "jwks"} <= request_fields("/admin/v1/apps", "post")
    assert {"id", "client_id", "licensee_id", "name", "client_secret"} <= response_fields(
        "/admin/v1/apps", "post", "201"
    )
    for action in ("suspend", "resume", "revoke"):
        assert f"/admin/v1/licences/{{id}}/{action}" in doc["paths"]
    for action in ("suspend", "resume"):  # revoked is final: 409
        assert "409" in doc["paths"][f"/admin/v1/licences/{{id}}/{action}"]["post"]["responses"]
    for path in ("/admin/v1/datasets", "/admin/v1/licensees", "/admin/v1/licences", "/admin/v1/apps"):
        assert "409" in doc["paths"][path]["post"]["responses"]
        assert "WWW-Authenticate" in doc["paths"][path]["post"]["responses"]["401"]["headers"]
    problem = schemas["Problem"]
    assert {"type", "title", "status", "detail", "instance", "code", "field"} <= set(problem["properties"])
