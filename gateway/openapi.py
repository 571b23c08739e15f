"""The admin API's route table entries (:class:`Route`, declared in
``gateway.admin``) and its OpenAPI 3.1 document, generated from the route table
and the pydantic models that validate the payloads (JSON Schema 2020-12,
which OpenAPI 3.1 uses as is)."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway import __version__
from licensing.admin_tokens import AdminPrincipal

Handler = Callable[[web.Request, AdminPrincipal], Awaitable[web.Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    permission: str
    summary: str
    request_model: type[BaseModel] | None = None
    response_model: type[BaseModel] | None = None
    response_list: bool = False
    status: int = 200
    query: tuple[str, ...] = ()
    #: May answer 409 (a duplicate, or a transition the resource's state forbids).
    conflict: bool = False
    #: Media types of a file the route answers with (instead of a JSON model);
    #: its ``application/json`` form is described by ``response_model``.
    produces: tuple[str, ...] = ()
    #: Other success statuses with the same body (a repeat that finds the work done).
    also_status: tuple[int, ...] = ()


_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "code"],
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "the call id"},
        "code": {"type": "string", "description": "stable problem code (DESIGN §3)"},
        "field": {"type": "string", "description": "the request field at fault, for 400s"},
    },
}


#: Path and query parameters whose values have a form (any other is a string).
_PARAMETERS: dict[str, dict[str, Any]] = {
    "period": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$", "examples": ["2026-11"]},
    "from": {"type": "string", "format": "date-time"},
    "to": {"type": "string", "format": "date-time"},
    "limit": {"type": "integer", "minimum": 1},
    "from_month": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"},
    "to_month": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])$"},
    "as_of": {"type": "string", "format": "date"},
    "after": {"type": "integer", "minimum": 0},
}


def _parameter(name: str, where: str) -> dict[str, Any]:
    schema = _PARAMETERS.get(name, {"type": "string"})
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


@functools.cache
def _build(routes: tuple[Route, ...]) -> dict[str, Any]:
    models = {m for r in routes for m in (r.request_model, r.response_model) if m is not None}
    ordered = sorted(models, key=lambda m: m.__name__)
    keys: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation" if any(r.request_model is m for r in routes) else "serialization") for m in ordered
    ]
    mapping, defs = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["Problem"] = _PROBLEM
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = "/admin/v1" + route.path
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "tags": [route.path.split("/")[1]],
            "security": [{"adminToken": []}],
            "x-pdg-permission": route.permission,
            "responses": {
                "400": _problem("malformed request; `field` names the first bad field"),
                "401": {
                    **_problem("no or invalid admin token"),
                    "headers": {
                        "WWW-Authenticate": {
                            "description": 'the admin token challenge: Bearer realm="pdg-admin"',
                            "schema": {"type": "string"},
                        }
                    },
                },
                "403": _problem("the token's role may not do this"),
                "429": {
                    **_problem(
                        "too many failed admin token checks for this token id or from this address "
                        "this minute; retry after Retry-After seconds"
                    ),
                    "headers": {"Retry-After": {"schema": {"type": "string"}}},
                },
            },
        }
        parameters = [_parameter(name, "path") for name in re.findall(r"{(\w+)}", route.path)]
        parameters += [_parameter(q, "query") for q in route.query]
        if parameters:
            operation["parameters"] = parameters
        if route.request_model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": mapping[(route.request_model, "validation")]}},
            }
            operation["responses"]["413"] = _problem("the body is larger than the gateway accepts")
            operation["responses"]["415"] = _problem("the body is not sent as application/json")
        if route.response_model is not None:
            ref = (
                mapping[(route.response_model, "serialization")]
                if (route.response_model, "serialization") in mapping
                else mapping[(route.response_model, "validation")]
            )
            schema = {"type": "array", "items": ref} if route.response_list else ref
            for status in (route.status, *route.also_status):
                operation["responses"][str(status)] = {
                    "description": "OK" if status == 200 else "Created",
                    "content": {"application/json": {"schema": schema}},
                }
        if route.produces:
            # A JSON file is described by the response model; other files are opaque.
            json_file = operation["responses"].get(str(route.status), {}).get("content", {})
            operation["responses"][str(route.status)] = {
                "description": "OK",
                "content": {
                    media: json_file.get(media)
                    or {"schema": {"type": "string", "contentMediaType": media.split(";")[0]}}
                    for media in route.produces
                },
            }
        if "{id}" in route.path or route.produces:
            operation["responses"]["404"] = _problem("no such resource")
        if route.conflict:
            operation["responses"]["409"] = _problem(
                "conflicts with an existing resource, or with the resource's state"
            )
        # Any operation: the database (or, where it is read, Redis) out of reach.
        operation["responses"]["503"] = {
            **_problem("a store the answer needs cannot be reached; retry after Retry-After seconds"),
            "headers": {"Retry-After": {"schema": {"type": "string"}}},
        }
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pdg admin API",
            "version": __version__,
            "description": "Catalogue, licensees, licences, apps, call records and invoices of the "
            "Public Data Gateway. Ids are strings, times RFC 3339, money in fen. "
            "Errors are RFC 9457 problem JSON.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`pdg admin-token create --role ROLE`",
                }
            },
        },
    }


def build_openapi(routes: Sequence[Route]) -> dict[str, Any]:
    return _build(tuple(routes))
