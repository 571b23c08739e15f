"""``pdg audit verify|trace|export|prove|check-proof|personal-digest|witness|log-key|admin-log``:
the auditor's commands, over the same service layer as the admin API (``ledger.audit``).

``verify`` exits 0 when the ledger (or an export, ``--export``) re-derives,
and 1 with the first bad seq and its kind on stdout when it does not. Keys
are trusted only from files: the deployment's ledger key file (if this
machine has it) and ``--public-key`` files. ``--trust-stored-keys`` also
trusts the keys the database (or the export's manifest) carries: convenient,
but whoever could rewrite the ledger could have put a key there too.

Progress bars go to stderr, and only when it is a terminal, so ``--json``
on stdout stays clean.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from cli.resources import command_group, emit, progress_bar
from cli.witness import add_arguments as add_witness_arguments
from cli.witness import audit_log_key, audit_witness
from config.settings import Settings
from core.errors import BadRequestError, NotFoundError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec
    from sqlalchemy.ext.asyncio import AsyncEngine


Common = Callable[[argparse.ArgumentParser], None]

TRACE_COLUMNS = (
    "seq",
    "call_id",
    "time",
    "licensee_id",
    "dataset_id",
    "purpose",
    "status",
    "outcome",
    "charge_fen",
)


@contextlib.asynccontextmanager
async def _engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The deployment's database, read as it is (no migrations: an auditor
    may hold read-only rights)."""
    from sqlalchemy.engine import make_url

    from storage.db import create_engine

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not _exists(url.database):
        raise BadRequestError(f"no database at {url.database} (is --data-dir or --config right?)")
    engine = create_engine(settings.database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _exists(path: str) -> bool:
    return Path(path).exists()


def _read_proof(path: str) -> dict[str, Any]:
    try:
        proof = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise BadRequestError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(proof, dict):
        raise BadRequestError(f"{path}: not a pdg inclusion proof")
    return proof


def _file_keys(settings: Settings, args: argparse.Namespace) -> dict[str, ec.EllipticCurvePublicKey]:
    """Trusted keys: ``--public-key`` files and the deployment's ledger key file."""
    from ledger.audit import AuditError, read_public_keys

    given = [Path(p) for p in getattr(args, "public_key", None) or []]
    keys = read_public_keys(given)
    if settings.ledger_key_path.exists():
        try:
            keys.update(read_public_keys([settings.ledger_key_path]))
        except AuditError:
            if not given:
                raise
    return keys


# -- verify ------------------------------------------------------------------------


async def audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from billing import register
    from ledger import admin_log, audit

    witnessed: str | None = None
    admin: admin_log.AdminLogReport | None = None
    documents: register.RegisterReport | None = None
    if args.witness and args.export:
        raise BadRequestError("--witness checks the ledger in the database, not an export")
    keys = _file_keys(settings, args)
    with progress_bar("verifying") as progress:
        if args.export:
            manifest = Path(args.export)
            if args.trust_stored_keys:
                keys = {**audit.manifest_keys(audit.read_manifest(manifest)), **keys}
            report = audit.verify_export(manifest, keys, progress=progress)
        else:
            async with _engine(settings) as engine:
                if args.trust_stored_keys:
                    keys = {**await audit.stored_keys(engine), **keys}
                report = await audit.verify(engine, keys, progress=progress, since=args.since)
                witnessed = await _witnessed(engine, args.witness) if args.witness else None
                admin = await admin_log.verify(engine)
                documents = await register.verify(engine, keys)
    data = report.as_dict()
    problem = report.problem
    if problem is not None and problem.kind == "checkpoint" and "unknown key id" in problem.reason:
        data["problem"]["reason"] += " (give its public key with --public-key, or --trust-stored-keys)"
    text = _verify_text(data)
    if admin is not None:
        data["admin_log"] = admin.as_dict()
        text += (
            f"\nadmin log OK: {admin.entries:,} entries chained"
            if admin.ok
            else f"\nadmin log verification FAILED at entry {admin.problem_seq}: {admin.reason}"
        )
    if documents is not None:
        data["billing_register"] = {
            "ok": documents.ok,
            "entries": documents.entries,
            "problems": documents.problems,
        }
        if documents.ok:
            text += f"\nbilling register OK: {documents.entries:,} issued documents chained and signed"
        else:
            text += "\nbilling register verification FAILED:" + "".join(
                f"\n  {p['cause']} {p['number'] or '-'} ({p['document_id'] or '-'}): {p['detail']}"
                for p in documents.problems
            )
    if args.witness and not args.export:
        data["witness"] = {"ok": witnessed is None, "problem": witnessed}
        text += f"\nwitness check {'FAILED: ' + witnessed if witnessed else 'OK'}"
    emit(args, data, text)
    documents_ok = documents is None or documents.ok
    return 0 if report.ok and witnessed is None and (admin is None or admin.ok) and documents_ok else 1


async def _witnessed(engine: AsyncEngine, path: str) -> str | None:
    """The ledger against the checkpoint a witness keeps (``--witness``)."""
    from cli.witness import _read_state
    from ledger import audit

    state = _read_state(Path(path))
    if state is None:
        raise BadRequestError(f"no witness state at {path}")
    return await audit.check_witnessed(engine, state)


def _verify_text(data: dict[str, Any]) -> str:
    what = "export" if data["source"] != "database" else "ledger"
    span = f"seq {data['first_seq']}..{data['last_seq']}"
    if data["problem"] is not None:
        p = data["problem"]
        return (
            f"{what} verification FAILED at seq {p['seq']}: {p['kind']}\n"
            f"  {p['reason']}\n"
            f"  {data['records']:,} records re-derived before it ({span}, {data['algorithm']})"
        )
    tail = data["unsigned_tail"]
    speed = f", {data['records_per_second']:,} records/s" if data["records_per_second"] else ""
    lines = [
        f"{what} OK: {data['records']:,} records ({span}) re-derived with {data['algorithm']}, "
        f"{data['checkpoints']:,} signed checkpoints checked ({data['seconds']} s{speed})"
    ]
    if tail:
        lines.append(f"  the last {tail:,} records are chained but not yet under a signed checkpoint")
    return "\n".join(lines)


# -- trace -------------------------------------------------------------------------


async def audit_trace(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import audit

    filters = {
        "request_id": args.request_id,
        "licensee": args.licensee,
        "dataset": args.dataset,
        "from": args.since,
        "to": args.until,
        "limit": args.limit,
        "after": args.after,
    }
    given = {k: str(v) for k, v in filters.items() if v is not None}
    if args.call_id is not None:
        if given:
            raise BadRequestError(
                "give a CALL_ID or search options (--request-id, --licensee, ...), not both"
            )
        async with _engine(settings) as engine:
            record = await audit.get_call(engine, args.call_id)
        if record is None:
            raise NotFoundError(f"no call {args.call_id}")
        emit(args, record)
        return 0
    query = audit.CallQuery.from_params(given)
    async with _engine(settings) as engine:
        page = await audit.find_calls(engine, query)
    if getattr(args, "json", False):
        emit(args, {"calls": page.calls, "next_after": page.next_after})
        return 0
    if not page.calls:
        emit(args, {}, "no calls match")
        return 0
    _table(page.calls)
    if page.next_after is not None:
        emit(args, {}, f"more: add --after {page.next_after}")
    return 0


def _table(calls: list[dict[str, Any]]) -> None:
    """Calls as a table, never cut short: call ids and times are what an
    auditor copies from it (a pipe gets 160 columns, not rich's 80)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console = Console(soft_wrap=True, width=160)
    table = Table(*TRACE_COLUMNS)
    for call in calls:
        table.add_row(*("" if call[c] is None else str(call[c]) for c in TRACE_COLUMNS))
    console.print(table)


# -- archive -----------------------------------------------------------------------


async def audit_archive(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import audit

    async with _engine(settings) as engine:
        done = await audit.archive(engine, args.period, Path(args.out), _file_keys(settings, args))
    text = (
        f"archived {done['period']}: seq {done['first_seq']}..{done['last_seq']} "
        f"({done['records']:,} records, {done['checkpoints']} signed checkpoints) to {args.out}\n"
        f"  manifest sha256 {done['manifest_sha256']}; it verifies with: "
        f"pdg audit verify --export {done['manifest']}\n"
        f"  table {done['detached_table']} is detached: drop it once the archive is stored where it is kept"
    )
    emit(args, done, text)
    return 0


# -- export ------------------------------------------------------------------------


async def audit_export(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import audit

    since = audit.parse_time(args.since, "from") if args.since else None
    until = audit.parse_time(args.until, "to") if args.until else None
    if (args.from_seq is not None or args.to_seq is not None) and (since or until):
        raise BadRequestError(
            "give a seq range (--from-seq/--to-seq) or a time range (--from/--to), not both"
        )
    out = Path(args.out)
    with progress_bar("exporting") as progress:
        async with _engine(settings) as engine:
            manifest = await audit.export(
                engine,
                out,
                fmt=args.format,
                from_seq=args.from_seq,
                to_seq=args.to_seq,
                since=since,
                until=until,
                public_keys=_file_keys(settings, args),
                progress=progress,
            )
    data = {
        **manifest,
        "manifest_path": str(out / audit.MANIFEST),
        "data_path": str(out / manifest["data_file"]),
    }
    text = (
        f"exported seq {manifest['first_seq']}..{manifest['last_seq']} ({manifest['records']:,} records, "
        f"{len(manifest['checkpoints'])} signed checkpoints) to {out}\n"
        f"  data: {manifest['data_file']} (sha256 {manifest['data_sha256']})\n"
        f"  check it with: pdg audit verify --export {out / audit.MANIFEST}"
    )
    emit(args, data, text)
    return 0


# -- proofs ------------------------------------------------------------------------


async def audit_prove(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import audit

    async with _engine(settings) as engine:
        proof = await audit.prove(engine, args.call_id, _file_keys(settings, args))
    body = orjson.dumps(proof, option=orjson.OPT_INDENT_2) + b"\n"
    if args.out is None:
        sys.stdout.write(body.decode())
        return 0
    audit.atomic_write(Path(args.out), body)
    cp = proof["checkpoint"]
    summary = {"call_id": proof["call_id"], "seq": proof["seq"], "checkpoint": cp, "out": args.out}
    emit(
        args,
        summary,
        f"proof of call {proof['call_id']} (seq {proof['seq']}) against checkpoint "
        f"{cp['first_seq']}..{cp['last_seq']} written to {args.out}",
    )
    return 0


async def audit_check_proof(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import audit

    proof = _read_proof(args.file)
    keys = _file_keys(settings, args)
    wanted = (
        (proof.get("checkpoint") or {}).get("key_id") if isinstance(proof.get("checkpoint"), dict) else None
    )
    if wanted in keys:
        key = keys[wanted]
    elif args.public_key:
        key = next(iter(audit.read_public_keys([Path(args.public_key[-1])]).values()))
    elif args.trust_embedded_key:
        key = audit.proof_key(proof)
    else:
        raise BadRequestError(
            "no trusted key for this proof: give the ledger's public key with --public-key "
            "(or --trust-embedded-key to use the key inside the proof)"
        )
    result = audit.check_proof(proof, key)
    emit(args, result.as_dict(), f"proof {'OK' if result.ok else 'FAILED'}: {result.reason}")
    return 0 if result.ok else 1


async def audit_admin_log(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import admin_log

    async with _engine(settings) as engine:
        entries = await admin_log.read(engine, after=args.after, limit=args.limit)
    lines = [f"{e['seq']:>6}  {e['at']}  {e['actor']}  {e['action']}  {e['target']}" for e in entries] or [
        "no entries"
    ]
    emit(args, entries, "\n".join(lines))
    return 0


async def audit_personal_digest(args: argparse.Namespace, settings: Settings) -> int:
    from licensing.personal import PersonalDigest, read_key

    digest = PersonalDigest(read_key(settings.personal_key_path)).of(args.value)
    emit(
        args,
        {"digest": digest, "record_segment": f"{{personal:{digest}}}"},
        f"{{personal:{digest}}}",
    )
    return 0


# -- the command group -----------------------------------------------------------------


def _seq(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("sequence numbers start at 1")
    return number


def _after(value: str) -> int:
    number = _whole(value)
    if number < 0:
        raise argparse.ArgumentTypeError("SEQ is 0 or more")
    return number


def _limit(value: str) -> int:
    number = _whole(value)
    if not 1 <= number <= 1000:
        raise argparse.ArgumentTypeError("between 1 and 1000")
    return number


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def add_commands(sub: Any, common: Common) -> None:
    command = command_group(sub, "audit", "verify, trace, export and prove the call record", common)

    def key_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--public-key",
            action="append",
            metavar="PEM",
            help="trust this ledger public key (repeatable); "
            "the deployment's ledger key file is always trusted",
        )

    p = command(
        "verify",
        "re-derive the whole call record (or an export) and check every signed checkpoint; "
        "exit 1 with the first bad seq",
        audit_verify,
    )
    key_options(p)
    p.add_argument(
        "--trust-stored-keys",
        action="store_true",
        help="also trust the keys stored in the database (or carried in the export)",
    )
    p.add_argument("--export", metavar="MANIFEST", help="verify an export offline, from its manifest.json")
    p.add_argument(
        "--since",
        type=_seq,
        metavar="SEQ",
        help="start after the signed checkpoint that ends at SEQ (trusted once its signature verifies)",
    )
    p.add_argument(
        "--witness",
        metavar="STATE",
        help="also fail if the ledger is behind or beside the checkpoint a witness keeps in STATE",
    )

    p = command(
        "witness",
        "poll a gateway's signed checkpoint, check it extends the last one seen, cosign and keep it; "
        "exit 3 on a rollback or fork",
        audit_witness,
    )
    add_witness_arguments(p)
    command("log-key", "print the vkey witnesses trust the log's checkpoints with", audit_log_key)

    p = command(
        "admin-log",
        "the admin audit log: who changed what, when, before and after (pdg audit verify checks its chain)",
        audit_admin_log,
    )
    p.add_argument("--after", type=_after, default=0, metavar="SEQ", help="entries after this one")
    p.add_argument("--limit", type=_limit, default=100, help="at most this many (default 100, at most 1000)")

    p = command(
        "archive",
        "export a closed partition of the call record (PostgreSQL) with its manifest, verify the "
        "export, then detach the partition",
        audit_archive,
    )
    key_options(p)
    p.add_argument("period", metavar="PERIOD", help="YYYY-MM")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not hold an export)")

    p = command("trace", "find call records: by call id, request id, or licensee/dataset/time", audit_trace)
    p.add_argument("call_id", nargs="?", metavar="CALL_ID")
    p.add_argument("--request-id")
    p.add_argument("--licensee", help="licensee id")
    p.add_argument("--dataset", help="dataset id")
    p.add_argument("--from", dest="since", metavar="TIME", help="RFC 3339, inclusive")
    p.add_argument("--to", dest="until", metavar="TIME", help="RFC 3339, exclusive")
    p.add_argument("--limit", type=int, help="at most this many (default 100, at most 1000)")
    p.add_argument(
        "--after", type=int, metavar="SEQ", help="continue after this seq (from the previous page)"
    )

    p = command(
        "export",
        "write call records (JSON Lines or CSV) and a manifest "
        "that 'pdg audit verify --export' checks offline",
        audit_export,
    )
    key_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not hold an export)")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--from-seq", type=_seq, metavar="SEQ")
    p.add_argument("--to-seq", type=_seq, metavar="SEQ")
    p.add_argument("--from", dest="since", metavar="TIME", help="RFC 3339, inclusive")
    p.add_argument("--to", dest="until", metavar="TIME", help="RFC 3339, exclusive")

    p = command("prove", "an inclusion proof of one call against its signed checkpoint", audit_prove)
    key_options(p)
    p.add_argument("call_id", metavar="CALL_ID")
    p.add_argument("--out", metavar="FILE", help="write the proof here (default: stdout)")

    p = command(
        "personal-digest",
        "the digest the call record keeps of a personal path segment (needs the personal-data key), "
        "to find the calls about one value",
        audit_personal_digest,
    )
    p.add_argument("value", metavar="VALUE", help="the segment's value, decoded (e.g. an ID number)")

    p = command("check-proof", "check an inclusion proof (exit 1 if it does not hold)", audit_check_proof)
    key_options(p)
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--trust-embedded-key",
        action="store_true",
        help="use the public key inside the proof (only if you have checked it some other way)",
    )
