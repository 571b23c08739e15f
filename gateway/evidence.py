"""Evidence over HTTP (DESIGN §3): ``GET /audit/v1/proof/{call_id}``, the
inclusion proof of one call against the signed checkpoint that covers it
(the format ``pdg audit prove`` writes and ``pdg audit check-proof`` checks).

For auditors (an admin token with ``audit:read``) and for the call's own
licensee (a licensee-scoped token); another licensee's call answers 404, as
an unknown one does. A call not yet under a checkpoint (they are cut every
``ledger.checkpoint_seconds``) answers 409 with ``Retry-After``. The proof
carries the checkpoint's public key for convenience; check it against a key
you trust, not that one.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from core.errors import ConflictError, ForbiddenError, NotFoundError
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
    return web.Response(
        body=orjson.dumps(proof), content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/audit/v1/proof/{call_id}", call_proof)
