"""``pdg audit`` and the call-record admin API (DESIGN §5), on both backends.

A ledger of 2,500 records is built with the real writer (``LedgerStore``,
checkpoints every 1,000): records 1..2000 are under two signed checkpoints,
2001..2500 are the unsigned tail. Tampering is done the way an attacker with
schema rights would: drop the append-only triggers, then edit SQL. Each kind
of tampering must be reported at the exact seq, with the right kind, by the
service and by the CLI (exit 1); the table is restored between cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Table, delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from cli import main as cli
from config.settings import Settings
from core.errors import NotFoundError, ValidationFailedError
from gateway.state import ADMIN_TOKENS, ENGINE
from ledger import audit
from ledger.chain import Chain, Checkpoint, Verifier, canonical, sm3_available
from ledger.models import CallRow, CheckpointRow, LedgerStateRow
from ledger.record import FIELDS
from ledger.store import LedgerStore
from licensing.keys import SigningKey, load_or_create_signing_key
from licensing.schemas import AdminTokenIn
from storage import migrate
from storage.db import create_engine
from tests.conftest import Backend, World, make_settings

N = 2500
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
CALLS = cast(Table, CallRow.__table__)
CHECKPOINTS = cast(Table, CheckpointRow.__table__)


def when(i: int) -> datetime:
    return T0 + timedelta(milliseconds=10 * i, microseconds=i % 7)


def make_record(i: int) -> dict[str, Any]:
    refused = i % 11 == 0
    return {
        "call_id": f"00000000-0000-4000-8000-{i:012d}",
        "request_id": f"req-{i}",
        "time": when(i),
        "started_at": when(i) - timedelta(milliseconds=3),
        "app_id": "app-1",
        "licensee_id": f"lic-{i % 3}",
        "licence_id": f"licence-{i % 3}",
        "dataset_id": ("ds-weather", "ds-registry")[i % 2],
        "purpose": "industrial" if i % 5 == 0 else "public-interest",
        "method": "GET",
        # Now and then a path that CSV must quote (a comma, a quote, a newline).
        "path": f'weather/{i},"x"\nmore' if i % 97 == 0 else f"weather/{i}",
        "query_digest": None if i % 2 else "ab" * 32,
        "status": 429 if refused else 200,
        "upstream_status": None if refused else 200,
        "outcome": "refused" if refused else "served",
        "problem": "quota-exhausted" if refused else None,
        "records": i % 7,
        "bytes": 100 + i,
        "latency_us": 1000 + i,
        "pool": None if refused else "free",
        "period": "2026-03",
        "charge_e4": 25000 if i % 5 == 0 else 0,
        "client_address": "203.0.113.9",
        "token_id": f"tok-{i}",
        "response_digest": None if refused else "cd" * 32,
        # Some records from before terms had versions (no terms_version in
        # their hashed bytes), most naming theirs.
        "terms_version": None if i % 3 == 0 else 1 + i % 2,
        # Records from before pools, or refused before forwarding, name no target.
        "upstream_target": None if refused or i % 4 == 0 else ("default", "b")[i % 2],
    }


def call_id(i: int) -> str:
    return str(make_record(i)["call_id"])


@dataclass
class Ledger:
    engine: AsyncEngine
    settings: Settings
    config: Path
    key: SigningKey
    backend: Backend
    tmp: Path

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @property
    def keys(self) -> dict[str, Any]:
        return audit.read_public_keys([self.settings.ledger_key_path])

    async def sql(self, *statements: Any) -> None:
        async with self.engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement) if isinstance(statement, str) else statement)

    async def row(self, seq: int) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(CALLS).where(CALLS.c.seq == seq))).one()
        return dict(row._mapping)


@pytest.fixture
async def ledger(backend: Backend, tmp_path: Path) -> AsyncIterator[Ledger]:
    settings = make_settings(tmp_path, backend)
    engine = create_engine(backend.database_url)
    try:
        await migrate.upgrade(engine)
        key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
        store = LedgerStore(engine, key, checkpoint_records=1000, checkpoint_seconds=3600)
        for start in range(1, N + 1, 500):
            await store.append([make_record(i) for i in range(start, start + 500)], f"{start}-0")
        config = tmp_path / "pdg.toml"
        config.write_text(
            f'data_dir = "{settings.data_dir}"\n[storage]\ndatabase_url = "{backend.database_url}"\n',
            encoding="utf-8",
        )
        yield Ledger(engine, settings, config, key, backend, tmp_path)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def one_line_error(self, mentions: str = "") -> str:
        assert self.code == 1, self
        lines = self.err.splitlines()
        assert len(lines) == 1, self
        assert lines[0].startswith("pdg: error: "), self
        assert mentions in lines[0], self
        return lines[0]


PdgRunner = Callable[..., Awaitable[Run]]


@pytest.fixture
def pdg(capsys: pytest.CaptureFixture[str]) -> PdgRunner:
    """``pdg`` in-process (in a thread: it runs its own event loop)."""

    async def run(*args: str) -> Run:
        capsys.readouterr()
        try:
            code = await asyncio.to_thread(cli.main, list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


# -- tampering ----------------------------------------------------------------------


async def drop_guards(ledger: Ledger) -> None:
    """What an attacker with schema rights does first."""
    if ledger.postgres:
        await ledger.sql(
            "DROP TRIGGER calls_append_only ON calls",
            "DROP TRIGGER ledger_checkpoints_append_only ON ledger_checkpoints",
        )
    else:
        await ledger.sql(
            "DROP TRIGGER calls_no_update",
            "DROP TRIGGER calls_no_delete",
            "DROP TRIGGER ledger_checkpoints_no_update",
            "DROP TRIGGER ledger_checkpoints_no_delete",
        )


def changed(value: Any, column: str) -> Any:
    if isinstance(value, datetime):
        return value + timedelta(microseconds=1)
    if isinstance(value, int):
        return value + 1
    if value is None:
        return 1 if column in ("upstream_status", "terms_version") else "x"
    if column == "hash":
        return ("0" if value[0] != "0" else "1") + value[1:]
    return value[:-1] + ("x" if value[-1] != "x" else "y")


async def forged_tail(ledger: Ledger) -> None:
    """A record 2501 chained onto the real 2500, as a forger who knows the construction would."""
    last = await ledger.row(N)
    forged = make_record(N + 1) | {"seq": N + 1}
    entry = Chain().link(bytes.fromhex(last["hash"]), canonical(forged))
    await ledger.sql(insert(CALLS).values(**forged, hash=entry.hex()))


async def swap(ledger: Ledger, a: int, b: int) -> None:
    await ledger.sql(
        update(CALLS).where(CALLS.c.seq == a).values(seq=-1),
        update(CALLS).where(CALLS.c.seq == b).values(seq=a),
        update(CALLS).where(CALLS.c.seq == -1).values(seq=b),
    )


async def expect(
    ledger: Ledger, pdg: PdgRunner, seq: int, kind: str, *, cli_too: bool = True, parallel: bool = False
) -> None:
    report = await audit.verify(ledger.engine, ledger.keys)
    assert report.problem is not None, f"expected {kind} at {seq}, verified ok"
    assert (report.problem.seq, report.problem.kind) == (seq, kind), report.problem
    assert not report.ok
    if parallel and ledger.postgres:
        split = await audit.verify(ledger.engine, ledger.keys, parallel_min=1, segments=3)
        assert split.problem == report.problem
    if cli_too:
        run = await pdg("audit", "verify", "--config", str(ledger.config), "--json")
        assert run.code == 1, run
        assert run.json()["problem"]["seq"] == seq
        assert run.json()["problem"]["kind"] == kind
        plain = await pdg("audit", "verify", "--config", str(ledger.config))
        assert plain.code == 1
        assert f"FAILED at seq {seq}: {kind}" in plain.out


def _tiling(n: int, every: int) -> list[Any]:
    cp = Checkpoint(1, 1, bytes(32), bytes(32), datetime(2026, 1, 1, tzinfo=UTC), "sha256", "k", b"")
    return [
        dataclasses.replace(cp, first_seq=s, last_seq=min(s + every - 1, n)) for s in range(1, n + 1, every)
    ]


@pytest.mark.parametrize("processes", [2, 4])
def test_a_parallel_verify_cuts_pieces_that_shrink_towards_the_end(processes: int) -> None:
    from ledger.audit.parallel import PIECE_MIN_RECORDS, _split_points

    n = 1_000_000
    cps = _tiling(n, 1000)
    cuts = _split_points(cps, n, processes)
    ends = [0, *(cut.last_seq for cut in cuts), n]
    sizes = [b - a for a, b in itertools.pairwise(ends)]
    assert all(cut in cps for cut in cuts)
    assert ends == sorted(set(ends))
    # A quarter of the ledger per process first, then a quarter of what is left,
    # each to the next checkpoint, down to the smallest piece.
    assert n // (4 * processes) <= sizes[0] < n // (4 * processes) + 1000
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)
    smallest = min(PIECE_MIN_RECORDS, n // (32 * processes))
    assert smallest <= min(sizes[:-1]) < smallest + 1000
    assert sizes[-1] <= smallest + 1000
    # Checkpoints that do not tile the ledger: no cuts (one pass says why).
    assert _split_points([cps[0], *cps[2:]], n, processes) == []
    # A small ledger is still cut, finer.
    small = _split_points(_tiling(2500, 1000), 2500, processes)
    assert [cut.last_seq for cut in small] == [1000, 2000]


@pytest.mark.parametrize("backend", ["servers"], indirect=True)
async def test_the_postgres_scan_streams_from_the_primary_key(ledger: Ledger) -> None:
    """Verify reads the whole ledger in seq order; a plan that sorts it (what the
    planner picks for a table it has no statistics for) spills the ledger to disk.
    Here the planner is pushed hard towards a sequential scan and a sort (random
    reads made 1,000 times dearer); the scan's settings must still get the index."""
    from ledger import segment

    async with ledger.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        async with driver.transaction():
            await driver.execute("SET LOCAL random_page_cost = 1000")
            plain = "\n".join(r[0] for r in await driver.fetch("EXPLAIN " + segment._SCAN, 1, segment.NO_END))
            await driver.execute(segment._SETTINGS)
            plan = "\n".join(r[0] for r in await driver.fetch("EXPLAIN " + segment._SCAN, 1, segment.NO_END))
    # On PostgreSQL ``calls`` is partitioned: the scan reads each partition's
    # primary key, merged in seq order (a Merge Append), and sorts nothing.
    assert "Index Scan" not in plain  # the push works: without the settings, no index
    scans = [line for line in plan.splitlines() if "Scan" in line]
    assert scans, plan
    assert all("Index Scan using" in line and "pkey" in line for line in scans), plan
    assert not [line for line in plan.splitlines() if line.strip().lstrip("-> ").startswith("Sort ")], plan

    # The settings end with the scan: what runs after it in the same transaction
    # (the tail checks, the diagnosis of an altered record) is planned freely.
    async with ledger.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        async with driver.transaction(isolation="repeatable_read", readonly=True):
            scanned = await segment.scan_postgres(driver, Verifier(), 1, segment.NO_END, lambda rows: True)
            assert scanned.last_seq >= 1
            after = [await driver.fetchval(f"SHOW {name}") for name in ("enable_sort", "enable_seqscan")]
    assert after == ["on", "on"]


async def test_untouched_ledger_verifies(
    ledger: Ledger, pdg: PdgRunner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    report = await audit.verify(ledger.engine, ledger.keys)
    assert report.ok, report
    assert (report.records, report.checkpoints, report.unsigned_tail) == (N, 2, 500)
    if ledger.postgres:  # several processes, one snapshot: the same verdict
        for segments in (2, 3):
            split = await audit.verify(ledger.engine, ledger.keys, parallel_min=1, segments=segments)
            assert (split.ok, split.records, split.checkpoints) == (True, N, 2)
        # A child that cannot do its part, or takes its pieces and dies, leaves
        # them to this process.
        for child in ("raise SystemExit('cannot start')", "import sys; sys.stdin.readline(); sys.exit(3)"):
            monkeypatch.setattr(audit.parallel, "_CHILD", child)
            with caplog.at_level("WARNING", logger="ledger.audit"):
                split = await audit.verify(ledger.engine, ledger.keys, parallel_min=1, segments=2)
            assert (split.ok, split.records, split.checkpoints) == (True, N, 2)
            assert "a verifying child failed" in caplog.text
            caplog.clear()
        monkeypatch.undo()

    run = await pdg("audit", "verify", "--config", str(ledger.config), "--json")
    assert run.code == 0, run
    assert run.err == ""
    assert run.json()["ok"] is True
    assert run.json()["records"] == N
    plain = await pdg("audit", "verify", "--config", str(ledger.config))
    assert plain.code == 0, plain
    assert "ledger OK: 2,500 records" in plain.out, plain

    # Keys in the database are not trusted by default, nor a key it does not know.
    bare = await audit.verify(ledger.engine, {})
    assert bare.problem is not None
    assert (bare.problem.seq, bare.problem.kind) == (1, "checkpoint")
    assert (await audit.verify(ledger.engine, await audit.stored_keys(ledger.engine))).ok
    ledger.settings.ledger_key_path.rename(ledger.tmp / "moved.pem")
    run = await pdg("audit", "verify", "--config", str(ledger.config), "--json")
    assert run.code == 1
    assert run.json()["problem"]["kind"] == "checkpoint"
    assert "--trust-stored-keys" in run.json()["problem"]["reason"]
    for extra in (("--trust-stored-keys",), ("--public-key", str(ledger.tmp / "moved.pem"))):
        run = await pdg("audit", "verify", "--config", str(ledger.config), *extra)
        assert run.code == 0, run


async def test_tampering_is_found_at_its_seq(ledger: Ledger, pdg: PdgRunner) -> None:
    await drop_guards(ledger)
    await ledger.sql(
        "CREATE TABLE calls_backup AS SELECT * FROM calls",
        "CREATE TABLE checkpoints_backup AS SELECT * FROM ledger_checkpoints",
    )

    async def restore() -> None:
        await ledger.sql(
            "DELETE FROM calls",
            "INSERT INTO calls SELECT * FROM calls_backup",
            "DELETE FROM ledger_checkpoints",
            "INSERT INTO ledger_checkpoints SELECT * FROM checkpoints_backup",
        )
        assert (await audit.verify(ledger.engine, ledger.keys)).ok

    # Any column of a record in the middle (seq 1500, under checkpoint 1001..2000).
    original = await ledger.row(1500)
    for column in (*FIELDS, "hash"):
        new = 10**9 if column == "seq" else changed(original[column], column)
        await ledger.sql(update(CALLS).where(CALLS.c.seq == 1500).values({column: new}))
        # A renumbered record leaves its place empty: missing, not altered.
        kind = "missing" if column == "seq" else "altered"
        await expect(ledger, pdg, 1500, kind, cli_too=column in ("seq", "charge_e4", "time"))
        await restore()
    # A terms version taken away (null is how records from before versions hash).
    await ledger.sql(update(CALLS).where(CALLS.c.seq == 1501).values(terms_version=None))
    await expect(ledger, pdg, 1501, "altered", cli_too=False)
    await restore()
    # ... and in the unsigned tail, where only the chain and the writer's state guard it.
    await ledger.sql(update(CALLS).where(CALLS.c.seq == 2300).values(licensee_id="lic-9"))
    await expect(ledger, pdg, 2300, "altered", cli_too=False)
    await restore()

    await ledger.sql("DELETE FROM calls WHERE seq = 1500")
    await expect(ledger, pdg, 1500, "missing", parallel=True)
    await restore()
    await ledger.sql("DELETE FROM calls WHERE seq = 500")
    await expect(ledger, pdg, 500, "missing", cli_too=False, parallel=True)
    await restore()

    await ledger.sql(delete(CALLS).where(CALLS.c.seq == N))  # the tail: no checkpoint covers it yet
    await expect(ledger, pdg, N, "missing", parallel=True)
    await restore()
    await ledger.sql("DELETE FROM calls WHERE seq = 2000")  # the last record under a checkpoint
    await expect(ledger, pdg, 2000, "missing", cli_too=False)
    await restore()

    await forged_tail(ledger)
    await expect(ledger, pdg, N + 1, "inserted")
    await restore()

    await swap(ledger, 1200, 1700)
    await expect(ledger, pdg, 1200, "reordered")
    await restore()
    await swap(ledger, 1500, 1501)
    await expect(ledger, pdg, 1500, "reordered", cli_too=False)
    await restore()
    await swap(ledger, 1999, 2001)  # across the last checkpoint's end
    await expect(ledger, pdg, 1999, "reordered", cli_too=False)
    await restore()

    for column, value in (
        ("merkle_root", "00" * 32),
        ("chain_head", "11" * 32),
        ("signature", "3006020101020101"),
    ):
        await ledger.sql(update(CHECKPOINTS).where(CHECKPOINTS.c.first_seq == 1001).values({column: value}))
        await expect(
            ledger, pdg, 1001, "checkpoint", cli_too=column == "merkle_root", parallel=column == "signature"
        )
        await restore()
    await ledger.sql("DELETE FROM ledger_checkpoints WHERE first_seq = 1")
    await expect(ledger, pdg, 1, "checkpoint", cli_too=False)
    await restore()

    # Last: a second record numbered 1500, which needs the primary key gone.
    if ledger.postgres:
        await ledger.sql("ALTER TABLE calls DROP CONSTRAINT pk_calls")
    else:
        await ledger.sql(
            "CREATE TABLE calls_loose AS SELECT * FROM calls",
            "DROP TABLE calls",
            "ALTER TABLE calls_loose RENAME TO calls",
        )
    prev = await ledger.row(1499)
    forged = make_record(1500) | {"seq": 1500, "call_id": "forged-1500"}
    entry = Chain().link(bytes.fromhex(prev["hash"]), canonical(forged))
    await ledger.sql(insert(CALLS).values(**forged, hash=entry.hex()))
    await expect(ledger, pdg, 1500, "inserted")


# -- export and offline verification -----------------------------------------------------


def rewrite_line(path: Path, seq: int, change: Callable[[str], str | None]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        if f"00000000-0000-4000-8000-{seq:012d}" in line:
            new = change(line)
            lines[i : i + 1] = [] if new is None else [new]
            break
    else:
        raise AssertionError(f"no line for seq {seq}")
    path.write_text("".join(lines), encoding="utf-8")


async def test_export_verifies_offline_and_finds_edits(ledger: Ledger, pdg: PdgRunner) -> None:
    keys = ledger.keys
    out = ledger.tmp / "export-all"
    run = await pdg("audit", "export", "--config", str(ledger.config), "--out", str(out), "--json")
    assert run.code == 0, run
    manifest = run.json()
    assert (manifest["first_seq"], manifest["last_seq"], manifest["records"]) == (1, N, N)
    assert [c["first_seq"] for c in manifest["checkpoints"]] == [1, 1001]
    assert manifest["prev_hash"] == "00" * 32
    assert list(manifest["public_keys"]) == [ledger.key.kid]
    report = audit.verify_export(out / "manifest.json", keys)
    assert report.ok, report
    assert (report.records, report.checkpoints, report.unsigned_tail) == (N, 2, 500)
    run = await pdg("audit", "verify", "--config", str(ledger.config), "--export", str(out / "manifest.json"))
    assert run.code == 0, run
    assert "export OK" in run.out, run
    with pytest.raises(audit.AuditError, match="already holds an export"):
        await audit.export(ledger.engine, out)

    # A range widens to checkpoint boundaries, and is anchored by the checkpoint before it.
    part = await audit.export(ledger.engine, ledger.tmp / "part", from_seq=1200, to_seq=1300)
    assert (part["first_seq"], part["last_seq"], part["records"]) == (1001, 2000, 1000)
    assert part["anchor_checkpoint"]["last_seq"] == 1000
    assert audit.verify_export(ledger.tmp / "part" / "manifest.json", keys).ok
    # Without a trusted key the signatures prove nothing; the manifest's own keys only on request.
    untrusted = audit.verify_export(ledger.tmp / "part" / "manifest.json", {})
    assert untrusted.problem is not None
    assert untrusted.problem.kind == "checkpoint"
    carried = audit.manifest_keys(audit.read_manifest(ledger.tmp / "part" / "manifest.json"))
    assert audit.verify_export(ledger.tmp / "part" / "manifest.json", carried).ok

    # By time, as CSV; the unsigned tail exports too (chained, not yet signed).
    by_time = await audit.export(
        ledger.engine, ledger.tmp / "by-time", fmt="csv", since=when(2100), until=when(2200)
    )
    assert (by_time["first_seq"], by_time["last_seq"], by_time["checkpoints"]) == (2001, 2100 - 1 + 100, [])
    report = audit.verify_export(ledger.tmp / "by-time" / "manifest.json", keys)
    assert report.ok, report
    assert report.unsigned_tail == 199, report
    run = await pdg(
        "audit", "export", "--config", str(ledger.config), "--out", str(ledger.tmp / "tail"),
        "--format", "csv", "--from", "2026-03-01T08:00:21Z",
    )  # fmt: skip
    assert run.code == 0, run
    assert audit.verify_export(ledger.tmp / "tail" / "manifest.json", keys).ok

    # Edits to the exported data are found at their seq.
    data = out / manifest["data_file"]
    pristine = data.read_text(encoding="utf-8")
    rewrite_line(data, 1500, lambda line: line.replace('"records":2', '"records":3'))
    report = audit.verify_export(out / "manifest.json", keys)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (1500, "altered")
    run = await pdg("audit", "verify", "--config", str(ledger.config), "--export", str(out / "manifest.json"))
    assert run.code == 1, run
    assert "FAILED at seq 1500: altered" in run.out, run
    data.write_text(pristine, encoding="utf-8")
    rewrite_line(data, 1500, lambda line: None)
    report = audit.verify_export(out / "manifest.json", keys)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (1500, "missing")
    data.write_text(pristine, encoding="utf-8")
    rewrite_line(data, 701, lambda line: line.replace('"charge_fen":"0.0000"', '"charge_fen":"9.0000"'))
    report = audit.verify_export(out / "manifest.json", keys)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (701, "altered")
    data.write_text(pristine, encoding="utf-8")
    assert audit.verify_export(out / "manifest.json", keys).ok

    csv_data = ledger.tmp / "by-time" / by_time["data_file"]
    rewrite_line(csv_data, 2150, lambda line: line.replace(",lic-2,", ",lic-1,"))
    report = audit.verify_export(ledger.tmp / "by-time" / "manifest.json", keys)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (2150, "altered")

    run = await pdg(
        "audit",
        "export",
        "--config",
        str(ledger.config),
        "--out",
        str(ledger.tmp / "x"),
        "--from-seq",
        "9999",
    )
    run.one_line_error("no records in that range")
    run = await pdg(
        "audit",
        "export",
        "--config",
        str(ledger.config),
        "--out",
        str(ledger.tmp / "y"),
        "--from",
        "yesterday",
    )
    run.one_line_error("from:")


# -- inclusion proofs ---------------------------------------------------------------------


async def test_prove_and_check_proof(ledger: Ledger, pdg: PdgRunner) -> None:
    public = ledger.key.private_key.public_key()
    assert audit.key_id(public) == ledger.key.kid  # type: ignore[arg-type]
    proof = await audit.prove(ledger.engine, call_id(1500))
    assert (proof["seq"], proof["leaf_index"], proof["tree_size"]) == (1500, 499, 1000)
    assert proof["checkpoint"]["first_seq"] == 1001
    assert proof["public_key"]["key_id"] == ledger.key.kid
    assert audit.check_proof(proof, public).ok  # type: ignore[arg-type]
    # The key inside the proof is the stored one; a third party compares it with theirs.
    assert audit.key_id(audit.proof_key(proof)) == ledger.key.kid

    def tampered(**changes: Any) -> dict[str, Any]:
        copy = json.loads(json.dumps(proof))
        for dotted, value in changes.items():
            node = copy
            *path, last = dotted.split("__")
            for part in path:
                node = node[part]
            node[last] = value
        return cast(dict[str, Any], copy)

    other_key = load_or_create_signing_key(ledger.tmp / "other.pem", "ES256").private_key.public_key()
    for bad, key in (
        (tampered(record__charge_e4=0 if proof["record"]["charge_e4"] else 1), public),
        (tampered(record__seq=1501), public),
        (tampered(leaf_data=proof["leaf_data"].replace('"records":', '"records":1')), public),
        (tampered(audit_path=[*proof["audit_path"][:-1], "00" * 32]), public),
        (tampered(leaf_index=498), public),
        (tampered(checkpoint__merkle_root="00" * 32, merkle_root="00" * 32), public),
        (proof, other_key),
        (tampered(format="something-else"), public),
        (tampered(checkpoint="not a checkpoint"), public),
    ):
        result = audit.check_proof(bad, key)  # type: ignore[arg-type]
        assert not result.ok, bad

    with pytest.raises(audit.AuditError, match="not under a signed checkpoint"):
        await audit.prove(ledger.engine, call_id(2300))
    with pytest.raises(NotFoundError):
        await audit.prove(ledger.engine, "no-such-call")

    out = ledger.tmp / "proof.json"
    run = await pdg("audit", "prove", call_id(42), "--config", str(ledger.config), "--out", str(out))
    assert run.code == 0, run
    assert "seq 42" in run.out, run
    run = await pdg("audit", "check-proof", str(out), "--config", str(ledger.config), "--json")
    assert run.code == 0, run
    assert run.json()["ok"] is True, run
    printed = await pdg("audit", "prove", call_id(42), "--config", str(ledger.config))
    assert json.loads(printed.out)["seq"] == 42
    broken = json.loads(out.read_text(encoding="utf-8"))
    broken["record"]["status"] = 500
    out.write_text(json.dumps(broken), encoding="utf-8")
    run = await pdg("audit", "check-proof", str(out), "--config", str(ledger.config))
    assert run.code == 1, run
    assert "proof FAILED" in run.out, run
    run = await pdg("audit", "prove", call_id(2300), "--config", str(ledger.config))
    run.one_line_error("not under a signed checkpoint")


# -- trace ----------------------------------------------------------------------------------


async def test_trace(ledger: Ledger, pdg: PdgRunner) -> None:
    record = await audit.get_call(ledger.engine, call_id(1234))
    assert record is not None
    assert record["seq"] == 1234
    assert record["time"] == "2026-03-01T08:00:12.340002Z"
    assert record["charge_fen"] == "0.0000"
    assert await audit.get_call(ledger.engine, "nope") is None

    page = await audit.find_calls(ledger.engine, audit.CallQuery(request_id="req-1500"))
    assert [c["seq"] for c in page.calls] == [1500]
    assert page.next_after is None

    query = audit.CallQuery.from_params(
        {
            "licensee": "lic-0",
            "dataset": "ds-weather",
            "from": "2026-03-01T16:00:10+08:00",
            "to": "2026-03-01T08:00:11Z",
        }
    )
    expected = [i for i in range(1000, 1100) if i % 3 == 0 and i % 2 == 0]
    seen: list[int] = []
    after = 0
    while True:
        page = await audit.find_calls(ledger.engine, dataclasses.replace(query, limit=5, after=after))
        seen += [c["seq"] for c in page.calls]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == expected

    for params, field in (
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-03-01T00:00:00"}, "to"),
        ({"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}, "to"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"after": "-1"}, "after"),
    ):
        with pytest.raises(ValidationFailedError) as caught:
            audit.CallQuery.from_params(params)
        assert caught.value.field == field

    run = await pdg("audit", "trace", "--request-id", "req-1500", "--config", str(ledger.config), "--json")
    assert run.code == 0, run
    assert [c["call_id"] for c in run.json()["calls"]] == [call_id(1500)]
    run = await pdg("audit", "trace", call_id(7), "--config", str(ledger.config), "--json")
    assert run.code == 0
    assert run.json()["seq"] == 7
    run = await pdg("audit", "trace", "--licensee", "lic-1", "--limit", "3", "--config", str(ledger.config))
    assert run.code == 0, run
    assert "more: add --after" in run.out, run
    run = await pdg("audit", "trace", "no-such-call", "--config", str(ledger.config))
    run.one_line_error("no call no-such-call")
    run = await pdg("audit", "trace", "--from", "soon", "--config", str(ledger.config))
    run.one_line_error("from:")


# -- the admin API, on a gateway that records real calls ----------------------------------------


async def admin_get(world: World, path: str, token: str | None = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else world.admin
    async with world.client.get(f"/admin/v1{path}", headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def test_calls_admin_api(world_factory: Callable[..., Awaitable[World]]) -> None:
    # A checkpoint with every batch, so that every call can be proved at once.
    world = await world_factory(ledger__checkpoint_records=1)
    _, lic, _, token = await world.licensed()
    _, other_lic, _, other_token = await world.licensed()
    mine, theirs = lic["licensee_id"], other_lic["licensee_id"]
    path = f"/data/{lic['datasets'][0]}/records?n=2"
    call_ids = []
    for i in range(3):
        status, _, resp = await world.call(path, token, headers={"X-Request-Id": f"trace-me-{i}"})
        assert status == 200
        call_ids.append(resp.headers["X-Call-Id"])
    status, _, resp = await world.call(f"/data/{other_lic['datasets'][0]}/x", other_token)
    assert status == 200
    their_call = resp.headers["X-Call-Id"]

    async with asyncio.timeout(15):  # the ledger writer moves records into SQL in batches
        while True:
            status, listed, _ = await admin_get(world, f"/calls?licensee={mine}")
            assert status == 200, listed
            if len(listed) == 3 and (await admin_get(world, f"/calls/{their_call}"))[0] == 200:
                break
            await asyncio.sleep(0.1)
    assert [c["call_id"] for c in listed] == call_ids
    assert [c["request_id"] for c in listed] == ["trace-me-0", "trace-me-1", "trace-me-2"]
    assert all(c["outcome"] == "served" and c["records"] == 2 for c in listed)

    status, one, _ = await admin_get(world, f"/calls/{call_ids[1]}")
    assert status == 200
    assert one == listed[1]
    status, found, _ = await admin_get(world, "/calls?request_id=trace-me-2")
    assert [c["call_id"] for c in found] == [call_ids[2]]
    status, page, headers = await admin_get(world, f"/calls?licensee={mine}&limit=2")
    assert [c["call_id"] for c in page] == call_ids[:2]
    assert 'rel="next"' in headers["Link"]
    assert f"after={page[-1]['seq']}" in headers["Link"]
    status, page, headers = await admin_get(world, f"/calls?licensee={mine}&limit=2&after={page[-1]['seq']}")
    assert [c["call_id"] for c in page] == call_ids[2:]
    assert "Link" not in headers
    start = listed[0]["time"]
    status, timed, _ = await admin_get(
        world, f"/calls?from={start.replace('+', '%2B')}&to=2099-01-01T00:00:00Z"
    )
    assert {c["call_id"] for c in timed} >= set(call_ids)

    tokens = world.app[ADMIN_TOKENS]
    for role in ("auditor", "viewer", "finance"):
        role_token = (await tokens.create(AdminTokenIn(role=role))).token
        status, body, _ = await admin_get(world, f"/calls/{their_call}", role_token)
        assert status == 200, (role, body)
    scoped = (await tokens.create(AdminTokenIn(role="licensee", licensee_id=mine))).token
    status, body, _ = await admin_get(world, "/calls", scoped)
    assert status == 200
    assert {c["licensee_id"] for c in body} == {mine}
    status, body, _ = await admin_get(world, f"/calls?licensee={theirs}", scoped)
    assert (status, body) == (200, [])
    status, body, _ = await admin_get(world, f"/calls/{call_ids[0]}", scoped)
    assert status == 200
    status, body, _ = await admin_get(world, f"/calls/{their_call}", scoped)
    assert (status, body["code"]) == (404, "not-found")
    assert theirs not in json.dumps(body)

    status, body, _ = await admin_get(world, "/calls/no-such-call")
    assert (status, body["code"]) == (404, "not-found")
    for query, field in (
        ("from=yesterday", "from"),
        ("to=2026-01-01", "to"),
        ("from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("limit=ten", "limit"),
        ("after=x", "after"),
    ):
        status, body, _ = await admin_get(world, f"/calls?{query}")
        assert (status, body["code"], body.get("field")) == (400, "bad-request", field), (query, body)

    # What the gateway wrote re-derives, and proves.
    keys = audit.read_public_keys([world.settings.ledger_key_path])
    report = await audit.verify(world.app[ENGINE], keys)
    assert report.ok, report
    assert report.records >= 4, report
    proof = await audit.prove(world.app[ENGINE], call_ids[0], keys)
    assert audit.check_proof(proof, keys[proof["checkpoint"]["key_id"]]).ok


# -- SM3 ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not sm3_available(), reason="this OpenSSL build has no SM3")
async def test_sm3_ledger(backend: Backend, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, backend)
    engine = create_engine(backend.database_url)
    try:
        await migrate.upgrade(engine)
        key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
        store = LedgerStore(engine, key, algorithm="sm3", checkpoint_records=100, checkpoint_seconds=3600)
        for start in range(1, 301, 100):
            await store.append([make_record(i) for i in range(start, start + 100)], f"{start}-0")
        keys = audit.read_public_keys([settings.ledger_key_path])
        report = await audit.verify(engine, keys)
        assert report.ok, report
        assert (report.algorithm, report.records, report.checkpoints) == ("sm3", 300, 3)
        manifest = await audit.export(engine, tmp_path / "export", from_seq=150)
        assert (manifest["algorithm"], manifest["first_seq"], manifest["last_seq"]) == ("sm3", 101, 300)
        assert audit.verify_export(tmp_path / "export" / "manifest.json", keys).ok
        proof = await audit.prove(engine, call_id(250), keys)
        assert audit.check_proof(proof, keys[key.kid]).ok
        async with engine.begin() as conn:
            await conn.execute(
                text("DROP TRIGGER calls_append_only ON calls")
                if engine.dialect.name == "postgresql"
                else text("DROP TRIGGER calls_no_update")
            )
            await conn.execute(update(CALLS).where(CALLS.c.seq == 222).values(bytes=0))
        report = await audit.verify(engine, keys)
        assert report.problem is not None
        assert (report.problem.seq, report.problem.kind) == (222, "altered")
    finally:
        await engine.dispose()


# -- the writer's side ------------------------------------------------------------------------


async def test_records_already_stored_or_repeated_land_once(ledger: Ledger) -> None:
    """A batch is inserted without a look-up first; one that meets a stored
    call id is written again, without the records already there."""
    store = LedgerStore(ledger.engine, ledger.key, checkpoint_records=1000, checkpoint_seconds=3600)
    again = [make_record(N - 1), make_record(N + 1), make_record(N + 1), make_record(N + 2), make_record(N)]
    done = await store.append(again, f"{N + 1}-0")
    assert (done.written, done.skipped) == (2, 3)
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(select(CALLS.c.seq, CALLS.c.call_id).where(CALLS.c.seq > N))).all()
    assert [(r.seq, r.call_id) for r in rows] == [(N + 1, call_id(N + 1)), (N + 2, call_id(N + 2))]
    # A batch of new records alone goes straight in.
    done = await store.append([make_record(N + 3)], f"{N + 2}-0")
    assert (done.written, done.skipped) == (1, 0)
    report = await audit.verify(ledger.engine, ledger.keys)
    assert report.ok, report
    assert report.records == N + 3


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 3, 1, 8, 0, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 3, 1, 8, 0, 0, 10, tzinfo=timezone(timedelta(0))),
    ],
)
def test_sqlite_time_binding_is_the_columns_own(value: datetime) -> None:
    """The writer's fast spelling of a time on SQLite is exactly what the
    column's bind processor and the driver store (and queries compare against)."""
    import sqlite3

    from sqlalchemy.dialects import sqlite

    from ledger.store import sqlite_utc

    own = CALLS.c.time.type.bind_processor(sqlite.dialect())
    assert own is not None
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        stored = db.execute("SELECT ?", (own(value),)).fetchone()[0]
    assert sqlite_utc(value) == stored
    with pytest.raises(ValueError, match="aware UTC"):
        sqlite_utc(value.replace(tzinfo=timezone(timedelta(hours=8))))


async def test_a_batch_lands_whole_or_not_at_all(ledger: Ledger) -> None:
    """Rows, checkpoint and state commit together: a batch whose checkpoint
    cannot be stored (after its rows went in) leaves no row behind."""
    if ledger.postgres:
        await ledger.sql(
            "CREATE FUNCTION pdg_test_refuse() RETURNS trigger AS "
            "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER pdg_test_refuse BEFORE INSERT ON ledger_checkpoints "
            "FOR EACH ROW EXECUTE FUNCTION pdg_test_refuse()",
        )
    else:
        await ledger.sql(
            "CREATE TRIGGER pdg_test_refuse BEFORE INSERT ON ledger_checkpoints "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    store = LedgerStore(ledger.engine, ledger.key, checkpoint_records=1000, checkpoint_seconds=3600)
    batch = [make_record(i) for i in range(N + 1, N + 11)]
    with pytest.raises(DBAPIError, match="refused by the test"):
        await store.append(batch, f"{N + 1}-0", force_checkpoint=True)
    async with ledger.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(CALLS).where(CALLS.c.seq > N)) == 0
        assert await conn.scalar(select(LedgerStateRow.next_seq)) == N + 1
    await ledger.sql("DROP TRIGGER pdg_test_refuse" + (" ON ledger_checkpoints" if ledger.postgres else ""))
    done = await store.append(batch, f"{N + 1}-0", force_checkpoint=True)
    assert (done.written, len(done.checkpoints)) == (10, 1)
    report = await audit.verify(ledger.engine, ledger.keys)
    assert report.ok, report
    assert report.records == N + 10
