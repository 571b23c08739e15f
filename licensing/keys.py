"""The gateway's token-signing keys.

Each replica signs with the private key in ``tokens.signing_key_file``
(generated with ``cryptography`` on first start, file mode 0600). The public
halves live in the database, so any replica verifies any replica's tokens,
and ``/.well-known/jwks.json`` lists every key that is not retired. The key
id is the RFC 7638 thumbprint of the public key; token headers are only ever
used to pick one of *these* keys, never to fetch or build one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from licensing.models import SigningKeyRow

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

#: The only algorithms our own tokens may carry, per key type.
ALGORITHM_FOR_KEY = {"EC": "ES256", "OKP": "EdDSA"}


class KeyFileError(Exception):
    """The signing key file cannot be read or is not a supported key."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey
    public_jwk: dict[str, Any]


def _public_jwk(private_key: PrivateKey, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(OKPAlgorithm.to_jwk(public))
    jwk.update({"alg": alg, "use": "sig"})
    jwk["kid"] = thumbprint(jwk)
    return jwk


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    members = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}[
        jwk["kty"]
    ]
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def load_or_create_signing_key(path: Path, alg: str) -> SigningKey:
    """Read the PEM at ``path``; create it (0600) if it does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key: PrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if alg == "ES256"
            else ed25519.Ed25519PrivateKey.generate()
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc}") from exc
    if isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1):
        alg = "ES256"
    elif isinstance(loaded, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    else:
        raise KeyFileError(f"signing key {path} must be an EC P-256 or Ed25519 private key")
    jwk = _public_jwk(loaded, alg)
    return SigningKey(kid=jwk["kid"], alg=alg, private_key=loaded, public_jwk=jwk)


async def register_public_key(sessions: async_sessionmaker[AsyncSession], key: SigningKey) -> None:
    async with sessions() as session, session.begin():
        if await session.get(SigningKeyRow, key.kid) is None:
            session.add(SigningKeyRow(kid=key.kid, alg=key.alg, public_jwk=key.public_jwk))


async def load_public_keys(sessions: async_sessionmaker[AsyncSession]) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = (
            (
                await session.execute(
                    select(SigningKeyRow)
                    .where(SigningKeyRow.retired_at.is_(None))
                    .order_by(SigningKeyRow.created_at)
                )
            )
            .scalars()
            .all()
        )
    return [dict(r.public_jwk) for r in rows]
