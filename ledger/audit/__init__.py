"""The auditor's tools over the SQL ledger: verify, trace, export, prove.

Used by ``pdg audit`` and the admin API; pure service code over an
:class:`~sqlalchemy.ext.asyncio.AsyncEngine` (and files, for exports).

**Verify** (:mod:`ledger.audit.verification`, :mod:`ledger.audit.scan`,
:mod:`ledger.audit.parallel`, and :mod:`ledger.segment` for the PostgreSQL scan
and the parallel verify's child processes) re-derives the whole chain from the ``calls``
rows in ``seq`` order with :class:`ledger.chain.Verifier`, checks every
checkpoint (signature, chain head, Merkle root, tiling) and then what the rows
alone cannot show: that the last record is the one the writer's state
(``ledger_state``) says is last, with the chain head it says. Everything is
read from one snapshot (``REPEATABLE READ`` on PostgreSQL, a read transaction
on SQLite), so a gateway writing meanwhile is never mistaken for tampering. On
PostgreSQL rows are streamed through asyncpg directly (the ORM would cost more
than the hashing).

Trusted keys (:mod:`ledger.audit.keys`) are the caller's: the deployment's
ledger key file and any ``--public-key`` files. Keys stored in ``ledger_keys``
(or carried in an export) are *not* trusted unless asked: whoever can rewrite
the ledger can add a key of their own there.

**Export** (:mod:`ledger.audit.export`) writes a contiguous run of records
(JSON Lines or CSV, the :func:`ledger.record.public` form with ``hash``) and a
manifest: algorithm, range, the previous record's chain entry, every
checkpoint inside the range plus the one that vouches for its start, public
keys, and the data file's SHA-256. An export starts at a checkpoint boundary
(or seq 1), so :func:`verify_export` re-derives everything offline.

**Prove** (:mod:`ledger.audit.proof`) gives one call's RFC 6962 inclusion
proof against the signed checkpoint covering it; :func:`check_proof` is what a
third party runs.

**Trace** (:mod:`ledger.audit.query`): one call, or pages of calls by filters.
"""

from __future__ import annotations

from ledger.audit.archive import archive
from ledger.audit.common import (
    AuditError,
    Progress,
    PublicKeys,
    VerifyReport,
    atomic_write,
    checkpoint_from_json,
    public_json,
)
from ledger.audit.export import EXPORT_FORMAT, MANIFEST, export, manifest_keys, read_manifest, verify_export
from ledger.audit.keys import key_id, load_public_key, read_public_keys, stored_keys
from ledger.audit.parallel import MAX_SEGMENTS, PARALLEL_MIN_RECORDS
from ledger.audit.proof import PROOF_FORMAT, ProofCheck, check_proof, proof_key, prove
from ledger.audit.query import (
    MAX_PAGE,
    CallPage,
    CallQuery,
    CallRecord,
    find_calls,
    get_call,
    parse_int,
    parse_time,
)
from ledger.audit.verification import verify
from ledger.audit.witness import check_witnessed, consistency, inclusion, latest_checkpoint, tree_root
from ledger.chain import rfc3339
from ledger.note import b64
from ledger.segment import CHUNK, child_main

__all__ = [
    "CHUNK",
    "EXPORT_FORMAT",
    "MANIFEST",
    "MAX_PAGE",
    "MAX_SEGMENTS",
    "PARALLEL_MIN_RECORDS",
    "PROOF_FORMAT",
    "AuditError",
    "CallPage",
    "CallQuery",
    "CallRecord",
    "Progress",
    "ProofCheck",
    "PublicKeys",
    "VerifyReport",
    "archive",
    "atomic_write",
    "b64",
    "check_proof",
    "check_witnessed",
    "checkpoint_from_json",
    "child_main",
    "consistency",
    "export",
    "find_calls",
    "get_call",
    "inclusion",
    "key_id",
    "latest_checkpoint",
    "load_public_key",
    "manifest_keys",
    "parse_int",
    "parse_time",
    "proof_key",
    "prove",
    "public_json",
    "read_manifest",
    "read_public_keys",
    "rfc3339",
    "stored_keys",
    "tree_root",
    "verify",
    "verify_export",
]
