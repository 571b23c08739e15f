"""Strict admin input (issue 16, fault 7): times as numbers or digits taken as
Unix time, a licence naming a dataset that does not exist, an app with an
incomplete public key, JSON sent as text/plain, ``PATCH {"name": null}``
answered 200 while changing nothing. Each is refused with a problem naming
the field, and nothing is written; the OpenAPI document says so."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import World
from tests.test_admin_api import request, snapshot

pytestmark = pytest.mark.usefixtures("backend")


def _b64(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def _ec_jwk() -> dict[str, str]:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x, 32), "y": _b64(numbers.y, 32), "kid": "k1"}


async def _licence_payload(world: World) -> dict[str, Any]:
    ds = await world.dataset()
    licensee = await world.licensee()
    return {
        "licensee_id": licensee["id"],
        "datasets": [ds["id"]],
        "max_classification": 2,
        "purposes": ["public-interest"],
        "valid_from": "2026-01-01T00:00:00Z",
        "valid_until": "2027-01-01T00:00:00+08:00",
        "security_officer": "Officer Li",
    }


@pytest.mark.parametrize(
    "value", [0, 1700000000, 1.7e9, "0", "1700000000", "2026-01-01", "2026-01-01T00:00:00", "yesterday", True]
)
async def test_times_are_rfc3339_strings_only(world: World, value: Any) -> None:
    payload = await _licence_payload(world)
    before = await snapshot(world)
    status, body, _ = await request(world, "POST", "/licences", {**payload, "valid_from": value})
    assert (status, body["code"], body["field"]) == (400, "bad-request", "valid_from"), body
    assert await snapshot(world) == before
    status, body, _ = await request(world, "POST", "/licences", payload)
    assert status == 201, body


async def test_references_must_exist(world: World) -> None:
    payload = await _licence_payload(world)
    before = await snapshot(world)
    for datasets in (["no-such-dataset"], [payload["datasets"][0], "ghost"], ["no-such-provider/*"]):
        status, body, _ = await request(world, "POST", "/licences", {**payload, "datasets": datasets})
        assert (status, body["code"], body["field"]) == (400, "bad-request", "datasets"), body
    assert await snapshot(world) == before
    status, licence, _ = await request(
        world, "POST", "/licences", {**payload, "datasets": ["test-provider/*"]}
    )
    assert status == 201, licence
    status, body, _ = await request(world, "PATCH", f"/licences/{licence['id']}", {"datasets": ["ghost"]})
    assert (status, body["field"]) == (400, "datasets"), body
    status, body, _ = await request(world, "GET", f"/licences/{licence['id']}")
    assert body["datasets"] == ["test-provider/*"]


async def test_app_keys_are_whole_public_keys(world: World) -> None:
    licensee = await world.licensee()
    good = _ec_jwk()
    before = await snapshot(world)
    for broken in (
        {k: v for k, v in good.items() if k != "y"},  # a point without its y
        {**good, "crv": "P-999"},
        {**good, "x": "not-base64-at-all!"},
        {"kty": "RSA", "e": "AQAB"},  # no modulus
        {"kty": "OKP", "crv": "Ed25519"},
    ):
        payload = {"licensee_id": licensee["id"], "name": "app", "jwks": {"keys": [broken]}}
        status, body, _ = await request(world, "POST", "/apps", payload)
        assert (status, body["code"], body["field"]) == (400, "bad-request", "jwks"), (broken, body)
    assert await snapshot(world) == before
    payload = {"licensee_id": licensee["id"], "name": "app", "jwks": {"keys": [good]}}
    status, body, _ = await request(world, "POST", "/apps", payload)
    assert status == 201, body


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_bodies_must_be_sent_as_json(world: World, content_type: str | None) -> None:
    licensee = {"name": "Plain Co", "credit_code": "91350100M000100Y43", "contact": "a@example.com"}
    before = await snapshot(world)
    headers = {**world.admin, **({"Content-Type": content_type} if content_type else {})}
    raw = b'{"name": "Plain Co", "credit_code": "91350100M000100Y43", "contact": "a@example.com"}'
    async with world.client.post("/admin/v1/licensees", data=raw, headers=headers) as resp:
        body = await resp.json(content_type=None)
        assert (resp.status, body["code"]) == (415, "unsupported-media-type"), body
        assert resp.headers["Content-Type"] == "application/problem+json"
    assert await snapshot(world) == before
    status, body, _ = await request(world, "POST", "/licensees", licensee)
    assert status == 201, body


async def test_null_in_a_patch_clears_or_is_refused(world: World) -> None:
    ds = await world.dataset(max_response_bytes=1000, timeout_seconds=5.0)
    for name in ("name", "provider", "upstream_url", "price", "burst", "methods", "description"):
        status, body, _ = await request(world, "PATCH", f"/datasets/{ds['id']}", {name: None})
        assert (status, body["code"]) == (400, "bad-request"), (name, body)
        assert name in body["detail"], body
    status, body, _ = await request(world, "GET", f"/datasets/{ds['id']}")
    assert (body["name"], body["max_response_bytes"]) == (ds["name"], 1000)
    status, body, _ = await request(
        world, "PATCH", f"/datasets/{ds['id']}", {"max_response_bytes": None, "timeout_seconds": None}
    )
    assert status == 200, body
    assert (body["max_response_bytes"], body["timeout_seconds"]) == (None, None)
    payload = await _licence_payload(world)
    status, licence, _ = await request(world, "POST", "/licences", {**payload, "free_monthly_calls": 5})
    assert status == 201, licence
    status, body, _ = await request(world, "PATCH", f"/licences/{licence['id']}", {"security_officer": None})
    assert status == 400, body
    status, body, _ = await request(
        world, "PATCH", f"/licences/{licence['id']}", {"free_monthly_calls": None}
    )
    assert (status, body["free_monthly_calls"]) == (200, None), body


async def test_the_openapi_document_states_these_rules(world: World) -> None:
    status, document, _ = await request(world, "GET", "/openapi.json")
    assert status == 200
    schemas = document["components"]["schemas"]
    patch = schemas["DatasetPatch"]["properties"]
    assert "null" not in str(patch["name"]), patch["name"]
    assert "null" in str(patch["max_response_bytes"]), patch["max_response_bytes"]
    licence_in = schemas["LicenceIn"]["properties"]["valid_from"]
    assert licence_in.get("format") == "date-time", licence_in
    create = document["paths"]["/admin/v1/licences"]["post"]["responses"]
    assert {"400", "415", "503"} <= set(create), create
