"""Inclusion proofs: one call's RFC 6962 proof against the signed checkpoint
covering it (:func:`prove`), and what a third party runs (:func:`check_proof`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import NotFoundError
from ledger.audit.common import (
    _CALLS,
    _CHECKPOINTS,
    _KEYS,
    AuditError,
    PublicKeys,
    _record_from_public,
    _snapshot,
    checkpoint_from_json,
    public_json,
)
from ledger.audit.keys import load_public_key
from ledger.chain import Chain, canonical, strict_int
from ledger.record import FIELDS
from ledger.store import checkpoint_of, public_pem

PROOF_FORMAT: Final = "pdg.inclusion-proof.v1"


async def prove(engine: AsyncEngine, call_id: str, public_keys: PublicKeys | None = None) -> dict[str, Any]:
    """The inclusion proof of one call against its signed checkpoint."""
    async with _snapshot(engine) as conn:
        row = (await conn.execute(select(_CALLS).where(_CALLS.c.call_id == call_id))).first()
        if row is None:
            raise NotFoundError(f"no call {call_id}")
        seq = int(row.seq)
        cp_row = (
            await conn.execute(
                select(_CHECKPOINTS).where(_CHECKPOINTS.c.first_seq <= seq, _CHECKPOINTS.c.last_seq >= seq)
            )
        ).first()
        if cp_row is None:
            raise AuditError(
                f"call {call_id} (seq {seq}) is not under a signed checkpoint yet; "
                "checkpoints are cut every few seconds: try again shortly"
            )
        try:
            cp = checkpoint_of(cp_row)
        except (TypeError, ValueError) as exc:
            raise AuditError(
                f"the checkpoint covering seq {seq} is unreadable: run 'pdg audit verify'"
            ) from exc
        interval = (
            await conn.execute(
                select(*(_CALLS.c[c] for c in FIELDS))
                .where(_CALLS.c.seq >= cp.first_seq, _CALLS.c.seq <= cp.last_seq)
                .order_by(_CALLS.c.seq)
            )
        ).all()
        pem = None
        if public_keys is not None and cp.key_id in public_keys:
            pem = public_pem(public_keys[cp.key_id])
        else:
            pem = await conn.scalar(select(_KEYS.c.public_pem).where(_KEYS.c.key_id == cp.key_id))
    chain = Chain(cp.algorithm)
    damaged = AuditError(
        f"the ledger around seq {seq} does not match checkpoint {cp.first_seq}..{cp.last_seq}: "
        "run 'pdg audit verify'"
    )
    if [r.seq for r in interval] != list(range(cp.first_seq, cp.last_seq + 1)):
        raise damaged
    try:
        leaves = [chain.leaf_hash(canonical(dict(r._mapping))) for r in interval]
    except (TypeError, ValueError) as exc:
        raise damaged from exc
    if chain.root_of_hashes(leaves) != cp.merkle_root:
        raise damaged
    index = seq - cp.first_seq
    record = public_json(row._mapping)
    return {
        "format": PROOF_FORMAT,
        "algorithm": cp.algorithm,
        "call_id": call_id,
        "seq": seq,
        "record": record,
        "leaf_data": canonical({name: row._mapping[name] for name in FIELDS}).decode(),
        "leaf_index": index,
        "tree_size": len(leaves),
        "audit_path": [h.hex() for h in chain.path_of_hashes(leaves, index)],
        "merkle_root": cp.merkle_root.hex(),
        "checkpoint": cp.as_json(),
        "public_key": {"key_id": cp.key_id, "pem": pem},
        "check": (
            "leaf = H(0x00 || leaf_data as UTF-8); fold audit_path per RFC 9162 2.1.3.2 to "
            "merkle_root; the checkpoint's signature (ECDSA P-256/SHA-256, DER) covers its "
            "sorted-key JSON payload including merkle_root; leaf_data is the sorted-key "
            "compact JSON of record without hash and charge_fen"
        ),
    }


@dataclass(frozen=True, slots=True)
class ProofCheck:
    ok: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason}


def check_proof(proof: Mapping[str, Any], public_key: ec.EllipticCurvePublicKey) -> ProofCheck:
    """Whether ``proof`` shows its record is in the ledger, signed by ``public_key``."""
    try:
        if proof.get("format") != PROOF_FORMAT:
            return ProofCheck(False, f"not a pdg inclusion proof ({PROOF_FORMAT})")
        cp = checkpoint_from_json(proof["checkpoint"], "checkpoint")
        leaf_data = str(proof["leaf_data"]).encode()
        record = _record_from_public(proof["record"])
        seq, index, size = (
            strict_int(proof["seq"]),
            strict_int(proof["leaf_index"]),
            strict_int(proof["tree_size"]),
        )
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        root = bytes.fromhex(proof["merkle_root"])
        algorithm = str(proof["algorithm"])
    except (AuditError, KeyError, TypeError, ValueError) as exc:
        return ProofCheck(False, f"malformed proof: {exc}")
    if not cp.verify(public_key):
        return ProofCheck(False, "the checkpoint's signature does not verify with this key")
    if cp.algorithm != algorithm or root != cp.merkle_root:
        return ProofCheck(False, "the proof's root or algorithm is not the signed checkpoint's")
    if record.get("seq") != seq or record.get("call_id") != proof.get("call_id"):
        return ProofCheck(False, "the record is not the call the proof names")
    if canonical(record) != leaf_data:
        return ProofCheck(False, "the record does not match the proved leaf data")
    if not (cp.first_seq <= seq <= cp.last_seq and index == seq - cp.first_seq):
        return ProofCheck(False, "the record's seq is not at the proved leaf index")
    if size != cp.last_seq - cp.first_seq + 1:
        return ProofCheck(False, "the tree size is not the checkpoint's interval")
    if not Chain(algorithm).verify_inclusion(leaf_data, index, size, path, root):
        return ProofCheck(False, "the audit path does not lead to the signed Merkle root")
    return ProofCheck(
        True,
        f"call {record['call_id']} is record {seq}, inside checkpoint {cp.first_seq}..{cp.last_seq} "
        f"signed by {cp.key_id}",
    )


def proof_key(proof: Mapping[str, Any]) -> Any:
    """The key carried in a proof (trust it only if you got it some other way)."""
    pem = (proof.get("public_key") or {}).get("pem")
    if not pem:
        raise AuditError("the proof carries no public key; give --public-key")
    return load_public_key(str(pem).encode(), "the proof's key")
