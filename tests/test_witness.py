"""A log others can witness: the whole-log Merkle tree, its C2SP checkpoints,
RFC 9162 proofs, and a third party that polls, cosigns and catches a
rollback or a fork that ``pdg audit verify`` alone cannot see.

The tree code is checked against a naive RFC 6962 implementation written
here from the RFC's recursive definitions; the ledger is driven with the
real writer (``LedgerStore``) and served by the real gateway; the witness is
the real CLI, polling over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Table, delete, select, text, update

from cli import main as cli
from gateway.state import ADMIN_TOKENS, ENGINE
from ledger import audit
from ledger.chain import Chain
from ledger.models import CallRow, CheckpointRow, LedgerStateRow, LogCheckpointRow, TreeNodeRow
from ledger.note import COSIGNATURE, Checkpoint, NoteError, Signer, Verifier, cosign, open_note, sign, split
from ledger.store import LedgerStore
from ledger.tree import (
    TILE,
    LogTree,
    consistency_ranges,
    inclusion_ranges,
    subtree_hash,
    verify_consistency,
)
from licensing.keys import load_or_create_signing_key
from licensing.schemas import AdminTokenIn
from tests.conftest import World
from tests.test_audit import make_record

WorldFactory = Callable[..., Awaitable[World]]
SHA = Chain("sha256")


# -- RFC 6962 §2.1, written from the RFC's recursive definitions ---------------------


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return h(b"")
    if n == 1:
        return leaves[0]  # already leaf hashes
    k = 1 << ((n - 1).bit_length() - 1)
    return h(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], b), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def leaves_of(n: int) -> list[bytes]:
    return [h(b"\x00" + f"record {i}".encode()) for i in range(n)]


def node_from(leaves: Sequence[bytes]) -> Callable[[int, int], bytes]:
    return lambda level, index: mth(leaves[index << level : (index + 1) << level])


def test_the_incremental_tree_has_the_rfc_root_at_every_size() -> None:
    leaves = leaves_of(3 * TILE + 77)
    tree = LogTree(SHA)
    stored: dict[tuple[int, int], bytes] = {}
    assert tree.root() == h(b"")
    for n, leaf in enumerate(leaves, start=1):
        for level, index, value in tree.add(leaf):
            stored[(level, index)] = value
        if n % 37 == 0 or n % TILE in (0, 1, TILE - 1):
            assert tree.root() == mth(leaves[:n]), n
    # Only complete subtrees of a tile or more are handed out to store.
    assert set(stored) == {(8, 0), (8, 1), (9, 0), (8, 2)}
    for (level, index), value in stored.items():
        assert value == mth(leaves[index << level : (index + 1) << level])


def test_proofs_are_the_rfc_s_and_verify() -> None:
    leaves = leaves_of(2 * TILE + 9)
    node = node_from(leaves)
    sizes = [*range(1, 40), TILE - 1, TILE, TILE + 1, 2 * TILE, 2 * TILE + 9]
    for n in sizes:
        root = mth(leaves[:n])
        for m in sorted({0, n - 1, n // 2, n // 3}):
            got = [subtree_hash(SHA, a, b, node) for a, b in inclusion_ranges(m, n)]
            assert got == path(m, leaves[:n]), (m, n)
            assert SHA.verify_leaf_inclusion(leaves[m], m, n, got, root)
            assert not SHA.verify_leaf_inclusion(h(leaves[m]), m, n, got, root)
        for m in sorted({1, n // 2 or 1, n - 1 or 1, n}):
            proof = [subtree_hash(SHA, a, b, node) for a, b in consistency_ranges(m, n)]
            assert proof == subproof(m, leaves[:n], True), (m, n)
            old_root = mth(leaves[:m])
            assert verify_consistency(SHA, m, n, old_root, root, proof), (m, n)
            # Any change to either root or to the proof is caught.
            assert not verify_consistency(SHA, m, n, h(old_root), root, proof) or m == n == 0
            assert not verify_consistency(SHA, m, n, old_root, h(root), proof)
            if proof:
                bent = [*proof]
                bent[-1] = h(bent[-1])
                assert not verify_consistency(SHA, m, n, old_root, root, bent)
                assert not verify_consistency(SHA, m, n, old_root, root, proof[:-1])
    # A fork: another leaf under the same old tree does not extend it.
    forked = [*leaves[:20], h(b"another"), *leaves[21:40]]
    proof = subproof(20, forked, True)
    assert verify_consistency(SHA, 20, 40, mth(leaves[:20]), mth(forked), proof)
    proof = subproof(21, forked, True)
    assert not verify_consistency(SHA, 21, 40, mth(leaves[:21]), mth(forked), proof)


def test_random_pairs_of_a_larger_tree() -> None:
    rng = random.Random(7)
    leaves = leaves_of(5 * TILE + 3)
    node = node_from(leaves)
    for _ in range(40):
        m, n = sorted(rng.sample(range(1, len(leaves) + 1), 2))
        proof = [subtree_hash(SHA, a, b, node) for a, b in consistency_ranges(m, n)]
        assert verify_consistency(SHA, m, n, mth(leaves[:m]), mth(leaves[:n]), proof)


# -- signed notes -------------------------------------------------------------------


def test_signed_notes_checkpoints_and_cosignatures() -> None:
    log = Signer("gw.example/pdg-ledger", Ed25519PrivateKey.generate())
    witness = Signer("witness.example", Ed25519PrivateKey.generate(), COSIGNATURE)
    checkpoint = Checkpoint("gw.example/pdg-ledger", 12, bytes(range(32)))
    note = sign(checkpoint.text, log)
    assert note.startswith("gw.example/pdg-ledger\n12\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n\n— ")
    verifier = Verifier.parse(log.verifier.vkey)
    assert Checkpoint.parse(open_note(note, verifier)) == checkpoint
    cosigned = cosign(note, witness, 1_700_000_000)
    # The log's key still opens it; the witness's signature is its own.
    assert open_note(cosigned, verifier) == checkpoint.text
    assert open_note(cosigned, Verifier.parse(witness.verifier.vkey)) == checkpoint.text
    _text, signatures = split(cosigned)
    stamp = signatures[1][2][:8]
    assert int.from_bytes(stamp, "big") == 1_700_000_000
    # An edited size, another key, an edited signature: refused.
    with pytest.raises(NoteError):
        open_note(note.replace("\n12\n", "\n13\n"), verifier)
    with pytest.raises(NoteError, match="not signed"):
        open_note(
            note, Verifier.parse(Signer("gw.example/pdg-ledger", Ed25519PrivateKey.generate()).verifier.vkey)
        )
    line = note.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(line[1]))
    raw[-1] ^= 1
    with pytest.raises(NoteError, match="does not verify"):
        open_note(f"{line[0]} {base64.b64encode(bytes(raw)).decode()}\n", verifier)
    for bad in (
        "gw.example/pdg-ledger\n012\nAAAA\n",
        "gw.example/pdg-ledger\n12\n" + base64.b64encode(b"short").decode() + "\n",
        checkpoint.text + "extension\n",
        "\n12\n" + base64.b64encode(bytes(32)).decode() + "\n",
    ):
        with pytest.raises(NoteError):
            Checkpoint.parse(bad)
    with pytest.raises(NoteError):
        split(note.replace("\n12\n", "\n12\x07\n"))
    with pytest.raises(NoteError):
        Verifier.parse(log.verifier.vkey[:-4] + "AAAA")


# -- the ledger, the gateway and a witness ------------------------------------------


CALLS = cast(Table, CallRow.__table__)


async def pdg(*args: str) -> tuple[int, str, str]:
    """``pdg`` in-process (in a thread: it runs its own event loop)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                return cli.main(list(args))
            except SystemExit as exc:
                return int(exc.code or 0)

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


async def wipe_after(world: World, size: int) -> None:
    """Restore the ledger as a snapshot taken at ``size`` records would:
    records, checkpoints, tree, signed heads and state cut back together."""
    engine = world.app[ENGINE]
    postgres = engine.dialect.name == "postgresql"
    tables = ("calls", "ledger_checkpoints", "ledger_tree", "log_checkpoints")
    async with engine.begin() as conn:
        for table in tables:
            if postgres:
                await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            else:
                for action in ("update", "delete"):
                    await conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{action}"))
        await conn.execute(delete(CallRow).where(CallRow.seq > size))
        await conn.execute(delete(CheckpointRow).where(CheckpointRow.last_seq > size))
        await conn.execute(delete(LogCheckpointRow).where(LogCheckpointRow.size > size))
        await conn.execute(delete(TreeNodeRow).where(((TreeNodeRow.idx + 1) * (2**TreeNodeRow.level)) > size))
        head = await conn.scalar(select(CallRow.hash).where(CallRow.seq == size))
        await conn.execute(update(LedgerStateRow).values(next_seq=size + 1, head=head, checkpointed_seq=size))
        if postgres:
            for table in tables:
                await conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))


async def test_a_witness_catches_a_rollback_and_a_fork_that_verify_alone_does_not(
    world_factory: WorldFactory, tmp_path: Path
) -> None:
    world = await world_factory(ledger__run_writer=False)
    settings = world.settings
    engine = world.app[ENGINE]
    key = load_or_create_signing_key(settings.ledger_key_path, "ES256")
    log_key = load_or_create_signing_key(settings.log_key_path, "EdDSA")
    signer = Signer(settings.log_origin, log_key.private_key)
    config = tmp_path / "pdg.toml"
    config.write_text(
        f'data_dir = "{settings.data_dir}"\n[storage]\ndatabase_url = "{settings.database_url}"\n',
        encoding="utf-8",
    )

    async def write(numbers: range) -> None:
        store = LedgerStore(engine, key, checkpoint_records=100, checkpoint_seconds=3600, log_signer=signer)
        await store.append([make_record(i) for i in numbers], "0-0", force_checkpoint=True)

    async def checkpoint() -> tuple[int, str]:
        async with world.client.get("/audit/v1/checkpoint") as resp:
            return resp.status, await resp.text()

    assert (await checkpoint())[0] == 404  # nothing signed yet
    await write(range(1, 301))
    status, note = await checkpoint()
    assert status == 200
    assert note.startswith(f"{settings.log_origin}\n300\n")
    url = str(world.client.make_url("")).rstrip("/")
    state = tmp_path / "witness.json"
    code, vkey, err = await pdg("audit", "log-key", "--config", str(config))
    assert code == 0, err
    vkey = vkey.strip()
    assert Verifier.parse(vkey).name == settings.log_origin

    code, out, err = await pdg("audit", "witness", url, "--state", str(state), "--log-key", vkey)
    assert code == 0, (out, err)
    saved = json.loads(state.read_text())
    assert saved["size"] == 300
    assert state.stat().st_mode & 0o077 == 0
    # Its cosignature is on the checkpoint it keeps.
    assert open_note(saved["checkpoint"], Verifier.parse(saved["witness_vkey"])).startswith(
        settings.log_origin
    )

    await write(range(301, 551))
    code, out, err = await pdg("audit", "witness", url, "--state", str(state), "--json")
    assert code == 0, (out, err)
    assert json.loads(out) == {"ok": True, "origin": settings.log_origin, "size": 550, "previous_size": 300}
    # Consistency proofs over HTTP, and their refusals.
    async with world.client.get("/audit/v1/consistency?from=300&to=550") as resp:
        body = await resp.json()
    assert body["from"] == 300
    assert body["to"] == 550
    for query in ("from=0&to=5", "from=9&to=5", "from=1&to=551", "from=x&to=5", "to=5"):
        async with world.client.get(f"/audit/v1/consistency?{query}") as resp:
            assert resp.status == 400, query
            assert (await resp.json())["code"] == "bad-request", query
    # An inclusion proof of one record against the newest signed head.
    proof = await audit.inclusion(engine, 257)
    assert proof is not None
    assert proof["tree_size"] == 550
    async with engine.connect() as conn:
        row = (await conn.execute(select(CALLS).where(CALLS.c.seq == 257))).one()
    from ledger.chain import canonical
    from ledger.record import hashed

    leaf = SHA.leaf_hash(canonical(hashed(dict(row._mapping))))
    root = Checkpoint.parse(open_note(proof["checkpoint"], Verifier.parse(vkey))).root
    path_ = [base64.b64decode(p) for p in proof["path"]]
    assert SHA.verify_leaf_inclusion(leaf, 256, 550, path_, root)

    # A consistent rollback, as restoring an old snapshot does: verify alone passes ...
    await wipe_after(world, 400)
    code, out, err = await pdg("audit", "verify", "--config", str(config))
    assert code == 0, (out, err)
    # ... the witness and verify --witness do not.
    code, out, err = await pdg("audit", "witness", url, "--state", str(state))
    assert code == 3, (out, err)
    assert "ROLLBACK" in out
    assert json.loads(state.read_text())["size"] == 550  # its state is kept
    code, out, err = await pdg("audit", "verify", "--config", str(config), "--witness", str(state))
    assert code == 1, (out, err)
    assert "cut back" in out

    # The log grows again, with other records: a fork.
    await write(range(10_401, 10_601))
    status, note = await checkpoint()
    assert note.startswith(f"{settings.log_origin}\n600\n")
    code, out, err = await pdg("audit", "witness", url, "--state", str(state))
    assert code == 3, (out, err)
    assert "FORK" in out
    code, out, err = await pdg("audit", "verify", "--config", str(config), "--witness", str(state), "--json")
    assert code == 1, (out, err)
    assert "forked" in json.loads(out)["witness"]["problem"]


async def test_the_proof_of_a_call_carries_its_place_in_the_whole_log_tree(
    world_factory: WorldFactory,
) -> None:
    world = await world_factory(ledger__checkpoint_seconds=0.2)
    ds, _lic, _app, token = await world.licensed()
    call_ids = []
    for n in range(3):
        status, body, resp = await world.call(f"/data/{ds['id']}/r{n}", token)
        assert status == 200, body
        call_ids.append(resp.headers["X-Call-Id"])
    auditor = (await world.app[ADMIN_TOKENS].create(AdminTokenIn(role="auditor"))).token
    log_key = load_or_create_signing_key(world.settings.log_key_path, "EdDSA")
    verifier = Signer(world.settings.log_origin, log_key.private_key).verifier
    for call_id in call_ids:
        for _ in range(150):
            async with world.client.get(
                f"/audit/v1/proof/{call_id}", headers={"Authorization": f"Bearer {auditor}"}
            ) as resp:
                proof = await resp.json()
            if resp.status == 200 and proof.get("tree"):
                break
            await asyncio.sleep(0.1)
        tree = proof["tree"]
        assert tree is not None, proof
        head = Checkpoint.parse(open_note(tree["checkpoint"], verifier))
        seq = proof["record"]["seq"]
        assert tree["leaf_index"] == seq - 1
        leaf = SHA.leaf_hash(audit_bytes(proof["record"]))
        path_ = [base64.b64decode(p) for p in tree["path"]]
        assert SHA.verify_leaf_inclusion(leaf, seq - 1, head.size, path_, head.root)


def audit_bytes(public_record: dict[str, Any]) -> bytes:
    """The hashed bytes of a record in its public form."""
    from ledger.audit.common import _record_from_public
    from ledger.chain import canonical

    return canonical(_record_from_public(public_record))
