"""Auditors in the console, ``/console/audit/``: verify the ledger, trace a
call, download its inclusion proof, and download an export of records.

The same service layer as ``pdg audit`` and the admin API
(``ledger.audit``, ``ledger.admin_log``, ``billing.register``): verifying
trusts the deployment's ledger key file (and the keys stored in the
database only when asked, as ``--trust-stored-keys``); the proof is the
document ``GET /audit/v1/proof/{call_id}`` gives; the export is the one
``pdg audit export`` writes (records and manifest, zipped), which ``pdg
audit verify --export`` checks offline. Verifying, proofs and exports need
the ``audit:read`` permission of the admin API's role table (the
``auditor`` role); tracing one call is a read, as ``GET
/admin/v1/calls/{id}`` is.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import zipfile
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import quote

import orjson
from aiohttp import web
from sqlalchemy import Table, select

from billing import register
from billing.models import InvoiceCallRow, InvoiceRow
from console.finance import download, may
from console.i18n import translator
from console.web import LANG, PREFIX, render
from core.errors import ConflictError, NotFoundError, ValidationFailedError
from gateway.state import ENGINE, SETTINGS
from ledger import admin_log
from ledger import audit as ledger_audit
from ledger.models import CheckpointRow, LedgerStateRow
from licensing.admin_tokens import PERMISSIONS
from metering.periods import zone

_BILLED = cast(Table, InvoiceCallRow.__table__)
_INVOICES = cast(Table, InvoiceRow.__table__)
_CHECKPOINTS = cast(Table, CheckpointRow.__table__)
_STATE = cast(Table, LedgerStateRow.__table__)

BASE: Final = f"{PREFIX}/audit"
#: The record fields a trace shows, in this order (then every other one).
TRACE_FIELDS: Final = (
    "call_id",
    "request_id",
    "time",
    "licensee_id",
    "licence_id",
    "app_id",
    "dataset_id",
    "purpose",
    "method",
    "path",
    "status",
    "outcome",
    "problem",
    "records",
    "pool",
    "period",
    "charge_fen",
    "terms_version",
)


def _file_keys(request: web.Request) -> dict[str, Any]:
    """Trusted keys: the deployment's ledger key file, when this machine has it."""
    path = request.config_dict[SETTINGS].ledger_key_path
    return ledger_audit.read_public_keys([path]) if path.exists() else {}


async def index(request: web.Request) -> web.StreamResponse:
    may(request, "audit:read")
    t = translator(request[LANG])
    return render(request, "audit_index.html", title=t("audit.title"))


async def verify(request: web.Request) -> web.StreamResponse:
    """What ``pdg audit verify`` checks in the database: the ledger's chain
    and checkpoints, the admin audit log, and the billing register."""
    may(request, "audit:read")
    form = await request.post()
    engine = request.config_dict[ENGINE]
    keys = _file_keys(request)
    trust_stored = form.get("trust_stored_keys") == "yes"
    if trust_stored:
        keys = {**await ledger_audit.stored_keys(engine), **keys}
    report = (await ledger_audit.verify(engine, keys)).as_dict()
    problem = report["problem"]
    if problem is not None and problem["kind"] == "checkpoint" and "unknown key id" in problem["reason"]:
        problem["unknown_key"] = True
    admin = await admin_log.verify(engine)
    documents = await register.verify(engine, keys)
    t = translator(request[LANG])
    return render(
        request,
        "audit_verify.html",
        report=report,
        admin=admin.as_dict(),
        documents={"ok": documents.ok, "entries": documents.entries, "problems": documents.problems},
        trust_stored=trust_stored,
        ok=report["ok"] and admin.ok and documents.ok,
        title=t("audit.verify"),
    )


async def find_call(request: web.Request) -> web.StreamResponse:
    """The trace form (``call_id``), to the call's page."""
    may(request, "read")
    wanted = request.query.get("call_id", "").strip()
    if not wanted or len(wanted) > 100:
        raise ValidationFailedError("call_id", "the call id (X-Call-Id of its response)")
    raise web.HTTPSeeOther(f"{BASE}/calls/{quote(wanted, safe='')}")


async def _record(request: web.Request) -> dict[str, Any]:
    call_id = request.match_info["id"]
    record = await ledger_audit.get_call(request.config_dict[ENGINE], call_id)
    if record is None:
        raise NotFoundError(f"no call {call_id}")
    return record


async def call_page(request: web.Request) -> web.StreamResponse:
    """One call: its record, its place in the chain, the signed checkpoint
    over it, and the invoice that billed it."""
    user = may(request, "read")
    record = await _record(request)
    seq = int(record["seq"])
    async with request.config_dict[ENGINE].connect() as conn:
        checkpoint = (
            await conn.execute(
                select(_CHECKPOINTS).where(_CHECKPOINTS.c.first_seq <= seq, _CHECKPOINTS.c.last_seq >= seq)
            )
        ).first()
        last = await conn.scalar(select(_STATE.c.next_seq))
        billed = (
            await conn.execute(
                select(_BILLED.c.invoice_id, _INVOICES.c.number)
                .join(_INVOICES, _INVOICES.c.id == _BILLED.c.invoice_id, isouter=True)
                .where(_BILLED.c.seq == seq)
            )
        ).first()
    t = translator(request[LANG])
    shown = [name for name in TRACE_FIELDS if name in record]
    return render(
        request,
        "audit_call.html",
        r=record,
        fields=shown + [n for n in record if n not in shown and n not in ("seq", "hash")],
        ledger_size=int(last) - 1 if last is not None else None,
        checkpoint=None if checkpoint is None else dict(checkpoint._mapping),
        invoice=None if billed is None else {"id": billed.invoice_id, "number": billed.number},
        may_prove="audit:read" in PERMISSIONS.get(user.role, frozenset()),
        title=f"{t('audit.call')} {record['call_id']}",
    )


async def call_proof(request: web.Request) -> web.StreamResponse:
    """The call's inclusion proof, the document ``GET /audit/v1/proof/{call_id}``
    gives (with ``tree`` once a whole-log checkpoint covers it); 409 while
    no signed checkpoint covers the call yet."""
    may(request, "audit:read")
    record = await _record(request)
    engine = request.config_dict[ENGINE]
    try:
        proof = await ledger_audit.prove(engine, record["call_id"])
    except ledger_audit.AuditError as exc:
        retry = max(1, int(request.config_dict[SETTINGS].ledger.checkpoint_seconds))
        raise ConflictError(exc.detail, headers={"Retry-After": str(retry)}) from exc
    proof["tree"] = await ledger_audit.inclusion(engine, int(record["seq"]))
    return download(
        orjson.dumps(proof, option=orjson.OPT_INDENT_2) + b"\n",
        "application/json",
        f"proof-{record['call_id']}.json",
    )


def _day(value: str, field: str, tz_name: str) -> datetime | None:
    """A ``YYYY-MM-DD`` day's start in the billing time zone (``None`` if blank)."""
    text = value.strip()
    if not text:
        return None
    try:
        return datetime.combine(date.fromisoformat(text), time(), zone(tz_name))
    except ValueError as exc:
        raise ValidationFailedError(field, "a day, YYYY-MM-DD") from exc


def _seq(value: str, field: str) -> int | None:
    text = value.strip()
    return ledger_audit.parse_int(text, field, 1, 2**62) if text else None


def _zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return buffer.getvalue()


async def export(request: web.Request) -> web.StreamResponse:
    """Records and their manifest as ``pdg audit export`` writes them, zipped:
    a seq range or a range of days (``from`` inclusive, ``to`` exclusive),
    widened to checkpoint boundaries; ``format`` jsonl (default) or csv."""
    may(request, "audit:read")
    query = request.query
    fmt = query.get("format", "jsonl")
    if fmt not in ("jsonl", "csv"):
        raise ValidationFailedError("format", "jsonl or csv")
    tz_name = request.config_dict[SETTINGS].billing.time_zone
    since, until = _day(query.get("from", ""), "from", tz_name), _day(query.get("to", ""), "to", tz_name)
    from_seq, to_seq = _seq(query.get("from_seq", ""), "from_seq"), _seq(query.get("to_seq", ""), "to_seq")
    if (from_seq is not None or to_seq is not None) and (since or until):
        raise ValidationFailedError("from", "give a seq range or a range of days, not both")
    with tempfile.TemporaryDirectory(prefix="pdg-audit-export-") as folder:
        out = Path(folder) / "export"
        manifest = await ledger_audit.export(
            request.config_dict[ENGINE],
            out,
            fmt=fmt,
            from_seq=from_seq,
            to_seq=to_seq,
            since=since,
            until=until,
            public_keys=_file_keys(request),
        )
        body = await asyncio.to_thread(_zipped, out)
    name = f"pdg-audit-export-{manifest['first_seq']}-{manifest['last_seq']}.zip"
    return download(body, "application/zip", name)


def add_routes(routes: web.UrlDispatcher) -> None:
    """The auditor's pages, under the console's ``/audit/``."""
    routes.add_get("/audit/", index)
    routes.add_post("/audit/verify", verify)
    routes.add_get("/audit/calls", find_call)
    routes.add_get("/audit/calls/{id}", call_page)
    routes.add_get("/audit/calls/{id}/proof", call_proof)
    routes.add_get("/audit/export", export)
