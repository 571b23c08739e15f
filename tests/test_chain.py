"""The call record's hash chain, Merkle intervals and signed checkpoints (pure)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ledger.chain import (
    GENESIS,
    Chain,
    ChainWriter,
    Checkpoint,
    Problem,
    Verifier,
    canonical,
    inclusion_proof,
    merkle_root,
    sm3_available,
    verify_inclusion,
)

T0 = datetime(2026, 3, 1, 8, 0, 0, 123456, tzinfo=UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
KEYS = {"k1": KEY.public_key()}

Row = tuple[dict[str, Any], bytes]


def make_record(seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "call_id": f"call-{seq:06d}",
        "request_id": f"req-{seq}",
        "time": T0 + timedelta(milliseconds=seq),
        "app": "app-1",
        "dataset": "ds-weather",
        "upstream_status": 200,
        "records_returned": seq % 7,
        "charge_e4": 150,
        "client": "203.0.113.9",
        "token_id": None,
    }


def build(n: int, every: int = 10, algorithm: str = "sha256") -> tuple[list[Row], list[Checkpoint]]:
    """n records with stored hashes, and signed checkpoints every ``every`` records."""
    w = ChainWriter(algorithm)
    rows: list[Row] = []
    cps: list[Checkpoint] = []
    for seq in range(1, n + 1):
        rec = make_record(seq)
        rows.append((rec, w.append(rec)))
        if w.pending == every:
            cps.append(w.checkpoint(T0 + timedelta(seconds=seq)).sign(KEY, "k1"))
    return rows, cps


def run(
    rows: Iterable[Row],
    cps: Sequence[Checkpoint] = (),
    keys: Mapping[str, ec.EllipticCurvePublicKey] = KEYS,
    algorithm: str = "sha256",
) -> Problem | None:
    v = Verifier(algorithm, checkpoints=cps, public_keys=keys)
    for record, stored in rows:
        if (problem := v.feed(record, stored)) is not None:
            return problem
    return v.finish()


# -- canonical encoding ------------------------------------------------------


def test_canonical_is_sorted_compact_and_spells_times_in_utc() -> None:
    rec = {"time": datetime(2026, 3, 1, 8, 0, tzinfo=UTC), "seq": 3, "call_id": "c", "x": None, "n": 10}
    assert canonical(rec) == b'{"call_id":"c","n":10,"seq":3,"time":"2026-03-01T08:00:00Z","x":null}'
    assert canonical(dict(reversed(list(rec.items())))) == canonical(rec)
    rec["time"] = datetime(2026, 3, 1, 8, 0, 0, 5, tzinfo=ZoneInfo("UTC"))
    rec["name"] = "气象"
    assert canonical(rec) == (
        '{"call_id":"c","n":10,"name":"气象","seq":3,"time":"2026-03-01T08:00:00.000005Z","x":null}'.encode()
    )


def test_canonical_refuses_ambiguous_records() -> None:
    with pytest.raises(ValueError, match="UTC"):
        canonical({"seq": 1, "call_id": "c", "time": datetime(2026, 1, 1)})  # noqa: DTZ001
    with pytest.raises(ValueError, match="UTC"):
        canonical(
            {"seq": 1, "call_id": "c", "time": datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=8)))}
        )
    with pytest.raises(ValueError, match="'time'"):
        canonical({"seq": 1, "call_id": "c"})
    with pytest.raises(ValueError, match="seq"):
        canonical({"seq": True, "call_id": "c", "time": T0})
    with pytest.raises(ValueError, match="call_id"):
        canonical({"seq": 1, "call_id": 1, "time": T0})
    with pytest.raises(TypeError):
        canonical({"seq": 1, "call_id": "c", "time": T0, "charge": Decimal("1.5")})


# -- chain -------------------------------------------------------------------


def test_chain_is_deterministic_and_starts_at_genesis() -> None:
    a, _ = build(20)
    b, _ = build(20)
    assert [h for _, h in a] == [h for _, h in b]
    c = Chain()
    first = canonical(make_record(1))
    leaf = hashlib.sha256(b"\x00" + first).digest()
    assert a[0][1] == hashlib.sha256(b"\x02" + GENESIS + leaf).digest() == c.link(GENESIS, first)
    assert len({h for _, h in a}) == 20


def test_untouched_ledger_verifies() -> None:
    rows, cps = build(95)
    assert len(cps) == 9
    assert run(rows, cps) is None
    assert run([]) is None


@pytest.mark.parametrize("field", sorted(make_record(1)))
def test_altering_any_field_is_found_at_that_seq(field: str) -> None:
    rows, cps = build(30)
    rec = dict(rows[16][0])
    old = rec[field]
    if field == "seq":
        # Renumbering record 17 to 18 leaves a hole at 17 that the next 18 does not fill.
        rec[field] = 18
    elif isinstance(old, datetime):
        rec[field] = old + timedelta(microseconds=1)
    elif isinstance(old, int):
        rec[field] = old + 1
    else:
        rec[field] = f"{old}x"
    rows[16] = (rec, rows[16][1])
    problem = run(rows, cps)
    assert problem is not None
    assert problem.seq == 17
    # A renumbered record leaves 17 absent: missing, not altered.
    assert problem.kind == ("missing" if field == "seq" else "altered")


def test_altering_a_stored_hash_is_found() -> None:
    rows, cps = build(30)
    rows[4] = (rows[4][0], bytes(32))
    assert run(rows, cps) == Problem(5, "altered", "record 5 does not match its stored hash")


def test_adding_a_field_is_found() -> None:
    rows, _ = build(5)
    rows[2][0]["extra"] = 1
    assert run(rows) == Problem(3, "altered", "record 3 does not match its stored hash")


@pytest.mark.parametrize("index", [0, 13, 29])
def test_deleting_a_record_is_found(index: int) -> None:
    rows, cps = build(30)
    del rows[index]
    problem = run(rows, cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (index + 1, "missing")


def test_deleting_the_tail_under_a_checkpoint_is_found() -> None:
    rows, cps = build(30)
    problem = run(rows[:25], cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (26, "missing")


def test_inserting_a_duplicate_numbered_record_is_found() -> None:
    rows, cps = build(30)
    forged = make_record(12) | {"call_id": "forged"}
    rows.insert(12, (forged, rows[11][1]))
    problem = run(rows, cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (12, "inserted")


def test_inserting_a_well_chained_forgery_is_found() -> None:
    # The forger knows the construction (no secret): it chains a record 12 of its
    # own onto the real 11. The real 12 then arrives a second time.
    rows, cps = build(30)
    forged = make_record(12) | {"call_id": "forged"}
    rows.insert(11, (forged, Chain().link(rows[10][1], canonical(forged))))
    problem = run(rows, cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (12, "inserted")


def test_rewriting_the_whole_chain_is_caught_by_the_checkpoint() -> None:
    rows, cps = build(30)
    w = ChainWriter()
    rewritten: list[Row] = []
    for rec, _ in rows:
        rec2 = rec | ({"charge_e4": 0} if rec["seq"] == 17 else {})
        rewritten.append((rec2, w.append(rec2)))
    problem = run(rewritten, cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (11, "checkpoint")
    assert "chain head" in problem.reason


@pytest.mark.parametrize(("i", "j"), [(0, 1), (4, 5), (4, 20), (28, 29)])
def test_swapping_two_records_is_found_at_the_first(i: int, j: int) -> None:
    rows, cps = build(30)
    rows[i], rows[j] = rows[j], rows[i]
    problem = run(rows, cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (i + 1, "reordered")


def test_swapping_contents_but_keeping_numbers_is_found() -> None:
    rows, cps = build(30)
    (a, ha), (b, hb) = rows[6], rows[7]
    rows[6] = (b | {"seq": 7}, hb)
    rows[7] = (a | {"seq": 8}, ha)
    problem = run(rows, cps)
    assert problem is not None
    assert (problem.seq, problem.kind) == (7, "altered")


class _Seq(int):
    """An int subclass: not an integer the canonical form accepts."""


@pytest.mark.parametrize("seq", [True, 1.0, _Seq(1)], ids=["bool", "float", "int-subclass"])
def test_a_seq_that_is_not_a_plain_integer_is_altered(seq: Any) -> None:
    rows, _ = build(3)
    rows[0] = (rows[0][0] | {"seq": seq}, rows[0][1])
    problem = run(rows)
    assert problem is not None
    assert (problem.seq, problem.kind) == (1, "altered"), problem


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("tamper", ["none", "delete", "swap", "hash", "duplicate", "tail"])
def test_feeding_in_chunks_gives_the_same_verdict(tamper: str, chunk: int) -> None:
    rows, cps = build(45)
    if tamper == "delete":
        del rows[17]
    elif tamper == "swap":
        rows[8], rows[9] = rows[9], rows[8]
    elif tamper == "hash":
        rows[33] = (rows[33][0], bytes(32))
    elif tamper == "duplicate":
        rows.insert(21, rows[20])
    elif tamper == "tail":
        rows = rows[:25]
    expected = run(rows, cps)
    v = Verifier(checkpoints=cps, public_keys=KEYS)
    problem = None
    for start in range(0, len(rows), chunk):
        if (problem := v.feed_many(rows[start : start + chunk])) is not None:
            break
    assert (problem or v.finish()) == expected
    assert (expected is None) == (tamper == "none")


def test_problem_is_sticky() -> None:
    rows, _ = build(5)
    v = Verifier()
    assert v.feed(rows[0][0], rows[0][1]) is None
    p = v.feed(rows[2][0], rows[2][1])
    assert p is None  # a gap: verdict waits for the rest of the rows
    assert v.finish() == Problem(2, "missing", "record 2 is missing (next record is 3)")
    assert v.feed(rows[1][0], rows[1][1]) == v.finish()
    assert v.last_seq == 1
    assert v.head == rows[0][1]


@given(st.data())
def test_any_single_tampering_is_found_at_or_before_its_seq(data: st.DataObject) -> None:
    # 28 = 4 checkpoints of 7: every record is under a checkpoint, so even
    # deleting the last one is found.
    rows, cps = build(28, every=7)
    i = data.draw(st.integers(0, 27))
    op = data.draw(st.sampled_from(["alter", "delete", "swap"]))
    if op == "alter":
        rows[i] = (rows[i][0] | {"records_returned": -1}, rows[i][1])
    elif op == "delete":
        del rows[i]
    else:
        j = data.draw(st.integers(0, 27).filter(lambda j: j != i))
        rows[i], rows[j] = rows[j], rows[i]
        i = min(i, j)
    problem = run(rows, cps)
    assert problem is not None
    assert problem.seq == i + 1


def test_verifying_from_a_checkpoint_boundary() -> None:
    rows, cps = build(30)
    v = Verifier(checkpoints=cps, public_keys=KEYS, first_seq=11, prev_hash=cps[0].chain_head)
    for rec, h in rows[10:]:
        assert v.feed(rec, h) is None
    assert v.finish() is None
    with pytest.raises(ValueError, match="boundary"):
        Verifier(checkpoints=cps, first_seq=5, prev_hash=rows[3][1])


# -- checkpoints -------------------------------------------------------------


def test_checkpoint_signature_verifies_and_binds_every_field() -> None:
    _, cps = build(10)
    cp = cps[0]
    assert cp.verify(KEY.public_key())
    assert not cp.verify(OTHER_KEY.public_key())
    tampered = [
        replace(cp, first_seq=2),
        replace(cp, last_seq=11),
        replace(cp, chain_head=bytes(32)),
        replace(cp, merkle_root=bytes(32)),
        replace(cp, created_at=cp.created_at + timedelta(microseconds=1)),
        replace(cp, algorithm="sm3"),
        replace(cp, key_id="k2"),
        replace(cp, signature=cp.signature[:-1] + bytes([cp.signature[-1] ^ 1])),
        replace(cp, signature=b""),
    ]
    for bad in tampered:
        assert not bad.verify(KEY.public_key()), bad


def test_checkpoint_refuses_other_curves() -> None:
    _, cps = build(10)
    with pytest.raises(ValueError, match="P-256"):
        cps[0].sign(ec.generate_private_key(ec.SECP384R1()), "k1")


def test_verifier_reports_bad_checkpoints() -> None:
    rows, cps = build(30)
    forged_sig = replace(cps[1], merkle_root=bytes(32))
    assert run(rows, [cps[0], forged_sig, cps[2]]) == Problem(
        11, "checkpoint", "checkpoint 11..20: bad signature"
    )
    resigned = replace(cps[1], merkle_root=bytes(32)).sign(KEY, "k1")
    assert run(rows, [cps[0], resigned, cps[2]]) == Problem(
        11, "checkpoint", "checkpoint 11..20: Merkle root does not match"
    )
    assert run(rows, cps, keys={}) == Problem(1, "checkpoint", "checkpoint 1..10: unknown key id 'k1'")
    problem = run(rows, [cps[0], cps[2]])
    assert problem is not None
    assert (problem.seq, problem.kind) == (11, "checkpoint")
    problem = run(rows, cps[1:])
    assert problem is not None
    assert (problem.seq, problem.kind) == (1, "checkpoint")


# -- Merkle tree -------------------------------------------------------------


def _ref_mth(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH written exactly as the RFC recurses."""
    h = hashlib.sha256
    n = len(leaves)
    if n == 0:
        return h(b"").digest()
    if n == 1:
        return h(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return h(b"\x01" + _ref_mth(leaves[:k]) + _ref_mth(leaves[k:])).digest()


def test_rfc6962_known_answers() -> None:
    # Empty tree and one empty leaf, as in the certificate-transparency test vectors.
    assert merkle_root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle_root([b""]).hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    # The CT test vectors' 8-leaf tree.
    leaves = [
        bytes.fromhex(x)
        for x in [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
    ]
    assert merkle_root(leaves).hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


@pytest.mark.parametrize("n", range(70))
def test_root_matches_the_rfc_recursion(n: int) -> None:
    leaves = [bytes([i % 256]) * (i % 5) for i in range(n)]
    assert merkle_root(leaves) == _ref_mth(leaves)


@pytest.mark.parametrize("n", range(1, 34))
def test_inclusion_proofs_for_every_leaf(n: int) -> None:
    leaves = [f"leaf-{i}".encode() for i in range(n)]
    root = merkle_root(leaves)
    for i in range(n):
        proof = inclusion_proof(leaves, i)
        assert verify_inclusion(leaves[i], i, n, proof, root)
        assert not verify_inclusion(leaves[i] + b"x", i, n, proof, root)
        assert not verify_inclusion(leaves[i], i, n, proof, bytes(32))
        if n > 1:
            assert not verify_inclusion(leaves[i], (i + 1) % n, n, proof, root)
            assert not verify_inclusion(leaves[i], i, n, [*proof[:-1]], root)
        assert not verify_inclusion(leaves[i], i, n, [*proof, bytes(32)], root)
        # The tree size is not checked by the path alone (it is signed in the
        # checkpoint), but a size whose path is shorter or longer fails.
        assert not verify_inclusion(leaves[i], i, 2 * n + 1, proof, root)
    with pytest.raises(IndexError):
        inclusion_proof(leaves, n)


def test_proof_of_a_call_against_a_signed_checkpoint() -> None:
    # What `pdg audit prove CALL_ID` hands out and a third party checks.
    rows, cps = build(30)
    cp = cps[1]
    interval = [canonical(rec) for rec, _ in rows[cp.first_seq - 1 : cp.last_seq]]
    index = 17 - cp.first_seq
    proof = inclusion_proof(interval, index)
    assert cp.verify(KEY.public_key())
    assert verify_inclusion(
        canonical(rows[16][0]), index, cp.last_seq - cp.first_seq + 1, proof, cp.merkle_root
    )


# -- algorithms --------------------------------------------------------------


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        Chain("md5")


@pytest.mark.skipif(not sm3_available(), reason="this OpenSSL build has no SM3")
def test_sm3_chain_checkpoints_and_proofs() -> None:
    # GB/T 32905-2016 example 1.
    assert Chain("sm3").digest(b"abc").hex() == (
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    )
    rows, cps = build(25, algorithm="sm3")
    sha_rows, _ = build(25)
    assert rows[0][1] != sha_rows[0][1]
    assert cps[0].algorithm == "sm3"
    assert run(rows, cps, algorithm="sm3") is None
    assert run(rows, cps) is not None  # the same rows do not verify as SHA-256
    leaves = [b"a", b"b", b"c"]
    root = merkle_root(leaves, "sm3")
    assert verify_inclusion(b"b", 1, 3, inclusion_proof(leaves, 1, "sm3"), root, "sm3")
    assert not verify_inclusion(b"b", 1, 3, inclusion_proof(leaves, 1), root, "sm3")
