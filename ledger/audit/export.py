"""Exports: a contiguous run of records plus a manifest, and re-deriving
one offline (:func:`verify_export`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Integer, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ledger.audit.common import (
    _CALLS,
    _CHECKPOINTS,
    _KEYS,
    _STATE,
    AuditError,
    Progress,
    PublicKeys,
    VerifyReport,
    _checkpoints,
    _count_checked,
    _first,
    _record_from_public,
    _snapshot,
    checkpoint_from_json,
    public_json,
)
from ledger.audit.keys import load_public_key
from ledger.chain import GENESIS, Problem, Verifier, rfc3339, strict_int
from ledger.record import FIELDS
from ledger.segment import CHUNK, no_gc
from ledger.store import public_pem

EXPORT_FORMAT: Final = "pdg.audit-export.v1"
MANIFEST: Final = "manifest.json"

_COLUMNS: Final = (*FIELDS, "hash")
_INT_FIELDS: Final = frozenset(c.name for c in _CALLS.c if isinstance(c.type, Integer))
_NULLABLE: Final = frozenset(c.name for c in _CALLS.c if c.nullable)
_PUBLIC_COLUMNS: Final = (*_COLUMNS, "charge_fen")


class _Sink:
    """The data file being written, and its running SHA-256."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.digest = hashlib.sha256()
        self.count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("wb")
        if fmt == "csv":
            self._write(self._csv_line(_PUBLIC_COLUMNS))

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self.digest.update(data)

    @staticmethod
    def _csv_line(values: Sequence[Any]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue().encode()

    def add(self, rows: Sequence[Mapping[Any, Any]]) -> None:
        out = bytearray()
        for row in rows:
            data = public_json(row)
            if self.fmt == "csv":
                out += self._csv_line(["" if data[c] is None else data[c] for c in _PUBLIC_COLUMNS])
            else:
                out += orjson.dumps(data) + b"\n"
        self._write(bytes(out))
        self.count += len(rows)

    def close(self) -> None:
        self._fh.close()


async def _range(
    conn: AsyncConnection,
    last: int,
    from_seq: int | None,
    to_seq: int | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[int, int]:
    start, end = from_seq or 1, to_seq or last
    if since is not None:
        found = await conn.scalar(select(func.min(_CALLS.c.seq)).where(_CALLS.c.time >= since))
        start = max(start, found if found is not None else last + 1)
    if until is not None:
        found = await conn.scalar(select(func.max(_CALLS.c.seq)).where(_CALLS.c.time < until))
        end = min(end, found if found is not None else 0)
    if last == 0:
        raise AuditError("the ledger holds no records")
    if not 1 <= start <= end <= last:
        raise AuditError(f"no records in that range (the ledger holds seq 1..{last})")
    return start, end


async def export(
    engine: AsyncEngine,
    out_dir: Path,
    *,
    fmt: str = "jsonl",
    from_seq: int | None = None,
    to_seq: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    public_keys: PublicKeys | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write records and a manifest to ``out_dir``; return the manifest.

    The range widens to checkpoint boundaries: back to the start of the
    interval holding its first record (or seq 1), on to the end of the
    interval holding its last (when one is signed yet).
    """
    if fmt not in ("jsonl", "csv"):
        raise AuditError(f"unknown export format {fmt!r}; use jsonl or csv")
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        raise AuditError(f"{out_dir} already holds an export ({MANIFEST}); choose an empty folder")
    async with _snapshot(engine) as conn:
        state = (await conn.execute(select(_STATE))).first()
        last = state.next_seq - 1 if state is not None else 0
        algorithm = state.algorithm if state is not None else "sha256"
        start, end = await _range(conn, last, from_seq, to_seq, since, until)
        cp_rows = (await conn.execute(select(_CHECKPOINTS).order_by(_CHECKPOINTS.c.first_seq))).all()
        cps, unreadable = _checkpoints(cp_rows, algorithm)
        if unreadable is not None:
            raise AuditError(f"{unreadable.reason}: run 'pdg audit verify'")
        holding = [cp for cp in cps if cp.first_seq <= start]
        if holding:
            start = holding[-1].first_seq if holding[-1].last_seq >= start else holding[-1].last_seq + 1
        anchor = next((cp for cp in cps if cp.last_seq == start - 1), None)
        closing = next((cp for cp in cps if cp.first_seq <= end <= cp.last_seq), None)
        end = closing.last_seq if closing is not None else end
        if start == 1:
            prev_hash = GENESIS
        elif anchor is not None:
            prev_hash = anchor.chain_head
        else:
            prev = await conn.scalar(select(_CALLS.c.hash).where(_CALLS.c.seq == start - 1))
            prev_hash = bytes.fromhex(prev or "")
        inside = [cp for cp in cps if start <= cp.first_seq and cp.last_seq <= end]
        keys: dict[str, str] = {}
        stored = {r.key_id: r.public_pem for r in (await conn.execute(select(_KEYS))).all()}
        for cp in [*([anchor] if anchor else []), *inside]:
            if cp.key_id in (public_keys or {}):
                keys[cp.key_id] = public_pem((public_keys or {})[cp.key_id])
            elif cp.key_id in stored:
                keys[cp.key_id] = stored[cp.key_id]
        data_name = f"calls-{start}-{end}.{fmt}"
        sink = _Sink(out_dir / data_name, fmt)
        try:
            after = start - 1
            while after < end:
                rows = (
                    await conn.execute(
                        select(_CALLS)
                        .where(_CALLS.c.seq > after, _CALLS.c.seq <= end)
                        .order_by(_CALLS.c.seq)
                        .limit(CHUNK)
                    )
                ).all()
                if not rows:
                    break
                sink.add([r._mapping for r in rows])
                after = rows[-1].seq
                if progress is not None:
                    progress(sink.count, end - start + 1)
        finally:
            sink.close()
    manifest = {
        "format": EXPORT_FORMAT,
        "created_at": rfc3339(datetime.now(UTC)),
        "algorithm": algorithm,
        "first_seq": start,
        "last_seq": end,
        "records": sink.count,
        "prev_hash": prev_hash.hex(),
        "anchor_checkpoint": anchor.as_json() if anchor is not None else None,
        "checkpoints": [cp.as_json() for cp in inside],
        "public_keys": keys,
        "data_file": data_name,
        "data_format": fmt,
        "data_sha256": sink.digest.hexdigest(),
        "requested": {
            "from_seq": from_seq,
            "to_seq": to_seq,
            "from": rfc3339(since) if since else None,
            "to": rfc3339(until) if until else None,
        },
    }
    manifest_path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    return manifest


# -- verifying an export, offline --------------------------------------------------


def _csv_value(name: str, value: str) -> Any:
    if value == "" and name in _NULLABLE:
        return None
    if name in _INT_FIELDS:
        return int(value)
    return value


def _read_records(path: Path, fmt: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line number, public record)`` per record, or ``(line number, error)``."""
    if fmt == "jsonl":
        with path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield number, str(exc)
                    continue
                yield number, data if isinstance(data, dict) else "not a JSON object"
        return
    # CSV values may span lines (a path with a newline in it is quoted).
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                yield reader.line_num, str(exc)
                return
            if header is None:
                header = values
                continue
            try:
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} values for {len(header)} columns")
                yield reader.line_num, {k: _csv_value(k, v) for k, v in zip(header, values, strict=True)}
            except ValueError as exc:
                yield reader.line_num, str(exc)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise AuditError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise AuditError(f"{path}: not a pdg audit export manifest ({EXPORT_FORMAT})")
    return manifest


def manifest_keys(manifest: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    keys = {}
    for kid, pem in (manifest.get("public_keys") or {}).items():
        keys[str(kid)] = load_public_key(str(pem).encode(), f"manifest key {kid}")
    return keys


def verify_export(
    manifest_path: Path, public_keys: PublicKeys, *, progress: Progress | None = None
) -> VerifyReport:
    """Re-derive an export from its files: every record, every checkpoint, the
    anchor that vouches for its start, the data file's digest."""
    started = time.perf_counter()
    manifest = read_manifest(manifest_path)
    try:
        algorithm = str(manifest["algorithm"])
        first, last = strict_int(manifest["first_seq"]), strict_int(manifest["last_seq"])
        prev_hash = bytes.fromhex(manifest["prev_hash"])
        data_path = manifest_path.parent / Path(str(manifest["data_file"])).name
        fmt = str(manifest["data_format"])
        expected_digest = str(manifest["data_sha256"])
        cps = [checkpoint_from_json(c, "manifest") for c in manifest["checkpoints"]]
        anchor_data = manifest.get("anchor_checkpoint")
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditError(f"{manifest_path}: incomplete manifest ({exc})") from exc
    if fmt not in ("jsonl", "csv"):
        raise AuditError(f"{manifest_path}: unknown data format {fmt!r}")
    if not data_path.is_file():
        raise AuditError(f"the data file {data_path} is missing")
    early: Problem | None = None
    if first == 1:
        if prev_hash != GENESIS:
            early = Problem(1, "altered", "an export from seq 1 must start from the genesis hash")
    elif anchor_data is None:
        early = Problem(first, "checkpoint", f"no signed checkpoint vouches for the chain before seq {first}")
    else:
        anchor = checkpoint_from_json(anchor_data, "manifest anchor")
        key = public_keys.get(anchor.key_id)
        if anchor.last_seq != first - 1 or anchor.chain_head != prev_hash:
            early = Problem(first, "checkpoint", f"the anchor checkpoint does not end at seq {first - 1}")
        elif key is None:
            early = Problem(first, "checkpoint", f"anchor checkpoint: unknown key id {anchor.key_id!r}")
        elif not anchor.verify(key):
            early = Problem(first, "checkpoint", "anchor checkpoint: bad signature")
    try:
        verifier = Verifier(
            algorithm, checkpoints=cps, public_keys=public_keys, first_seq=first, prev_hash=prev_hash
        )
    except ValueError as exc:
        raise AuditError(f"{manifest_path}: {exc}") from exc
    problem: Problem | None = None
    count = 0
    with no_gc():
        for number, item in _read_records(data_path, fmt):
            seq = verifier.last_seq + 1
            if isinstance(item, str):
                problem = Problem(seq, "altered", f"line {number} of {data_path.name} cannot be read: {item}")
                break
            try:
                record = _record_from_public(item)
                stored = bytes.fromhex(str(item.get("hash")))
            except (KeyError, TypeError, ValueError) as exc:
                problem = Problem(seq, "altered", f"line {number}: {exc}")
                break
            count += 1
            if (problem := verifier.feed(record, stored)) is not None:
                break
            if progress is not None and count % CHUNK == 0:
                progress(count, last - first + 1)
    if problem is None:
        problem = verifier.finish()
    if problem is None and verifier.last_seq < last:
        problem = Problem(verifier.last_seq + 1, "missing", f"the data ends at seq {verifier.last_seq}")
    if problem is None and verifier.last_seq > last:
        problem = Problem(last + 1, "inserted", f"the data goes on past the manifest's last seq {last}")
    if problem is None and _sha256_of(data_path) != expected_digest:
        problem = Problem(first, "altered", "the data file's SHA-256 does not match the manifest")
    problem = _first(problem, early)
    signed = max((cp.last_seq for cp in cps if cp.last_seq <= last), default=first - 1)
    return VerifyReport(
        ok=problem is None,
        source=str(manifest_path),
        algorithm=algorithm,
        records=verifier.last_seq - first + 1,
        checkpoints=_count_checked(cps, verifier.last_seq, problem),
        first_seq=first,
        last_seq=last,
        unsigned_tail=max(0, last - signed),
        problem=problem,
        seconds=time.perf_counter() - started,
    )
