"""Evidence over HTTP (DESIGN §3): ``GET /audit/v1/proof/{call_id}``, the
inclusion proof of one call against the signed checkpoint that covers it
(the format ``pdg audit prove`` writes and ``pdg audit check-proof`` checks).

For auditors (an admin token with ``audit:read``) and for the call's own
licensee (a licensee-scoped token); another licensee's call answers 404, as
an unknown one does. A call not yet under a checkpoint (they are cut every
``ledger.checkpoint_seconds``) answers 409 with ``Retry-After``. The proof
carries the checkpoint's public key for convenience; check it against a key
you trust, not that one. Once a signed checkpoint of the whole-log tree
covers the call, the proof also carries ``tree``: its leaf index, the tree
size, the RFC 9162 audit path and that checkpoint (a C2SP signed note).

The whole-log tree, for witnesses (public, no token: it holds hashes only):

- ``GET /audit/v1/checkpoint``: the newest C2SP checkpoint, a signed note
  (``text/plain; charset=utf-8``); 404 before the first is signed.
- ``GET /audit/v1/consistency?from=M&to=N``: the RFC 9162 consistency proof
  between the trees of ``M`` and ``N`` records (``1 <= M <= N <=`` the newest
  checkpoint's size), base64 hashes: ``{"from", "to", "proof"}``.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from core.errors import BadRequestError, ConflictError, ForbiddenError, NotFoundError
from gateway.admin import admin_principal
from gateway.state import ENGINE, SETTINGS
from ledger import audit
from licensing.admin_tokens import PERMISSIONS


async def call_proof(request: web.Request) -> web.Response:
    principal = await admin_principal(request)
    if principal.own_licensee is None and "audit:read" not in PERMISSIONS.get(principal.role, frozenset()):
        raise ForbiddenError(f"role {principal.role} may not read proofs (audit:read)")
    call_id = request.match_info["call_id"]
    engine = request.app[ENGINE]
    record = await audit.get_call(engine, call_id)
    if record is None or principal.own_licensee not in (None, record["licensee_id"]):
        raise NotFoundError(f"no call {call_id}")
    try:
        proof = await audit.prove(engine, call_id)
    except audit.AuditError as exc:
        retry = max(1, int(request.app[SETTINGS].ledger.checkpoint_seconds))
        raise ConflictError(exc.detail, headers={"Retry-After": str(retry)}) from exc
    proof["tree"] = await audit.inclusion(engine, int(record["seq"]))
    return web.Response(
        body=orjson.dumps(proof), content_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def log_checkpoint(request: web.Request) -> web.Response:
    latest = await audit.latest_checkpoint(request.app[ENGINE])
    if latest is None:
        raise NotFoundError("no checkpoint of the whole-log tree has been signed yet")
    return web.Response(
        text=latest["note"], content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-cache"}
    )


async def log_consistency(request: web.Request) -> web.Response:
    old = audit.parse_int(request.query.get("from", ""), "from", 1, 2**62)
    new = audit.parse_int(request.query.get("to", ""), "to", 1, 2**62)
    try:
        proof = await audit.consistency(request.app[ENGINE], old, new)
    except audit.AuditError as exc:
        raise BadRequestError(exc.detail) from exc
    body = {"from": old, "to": new, "proof": [audit.b64(p) for p in proof]}
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=3600"},
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/audit/v1/proof/{call_id}", call_proof)
    app.router.add_get("/audit/v1/checkpoint", log_checkpoint)
    app.router.add_get("/audit/v1/consistency", log_consistency)
