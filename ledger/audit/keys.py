"""Public keys for checking checkpoint signatures: from files, from the
``ledger_keys`` table, by id.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core import sm2
from ledger.audit.common import _KEYS, AuditError
from licensing.keys import thumbprint

#: A ledger key: ECDSA P-256, or SM2 (Tongsuo's, with the ``[sm]`` extra).
PublicKey: TypeAlias = Any


def key_id(key: PublicKey) -> str:
    """The id checkpoints name a key by: its RFC 7638 thumbprint (as the writer's)."""
    if sm2.is_public_key(key):
        return thumbprint(sm2.public_jwk(key))
    return thumbprint(json.loads(ECAlgorithm.to_jwk(key)))


def load_public_key(pem: bytes, where: str) -> PublicKey:
    """An EC P-256 or SM2 public key from a public or private PEM (a ledger key file)."""
    key: object
    try:
        if b"PRIVATE KEY" in pem:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if sm2.available():
            with contextlib.suppress(ValueError):
                return sm2.load_public_pem(pem)
        raise AuditError(f"{where}: not a PEM key of P-256 or SM2 ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AuditError(f"{where}: ledger keys are EC P-256 or SM2")
    return key


def read_public_keys(paths: Sequence[Path]) -> dict[str, PublicKey]:
    """Trusted keys from PEM files, by key id."""
    keys: dict[str, PublicKey] = {}
    for path in paths:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise AuditError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        key = load_public_key(pem, str(path))
        keys[key_id(key)] = key
    return keys


async def stored_keys(engine: AsyncEngine) -> dict[str, PublicKey]:
    """The keys in ``ledger_keys`` (not trusted by default; see the :mod:`ledger.audit` docstring)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(_KEYS.c.key_id, _KEYS.c.public_pem))).all()
    keys = {}
    for row in rows:
        with contextlib.suppress(AuditError):
            keys[row.key_id] = load_public_key(row.public_pem.encode(), f"stored key {row.key_id}")
    return keys
