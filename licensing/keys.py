"""The gateway's token-signing keys.

By default the keys are shared by every replica through the database
(:class:`KeyStore`): one is active and signs every replica's tokens; ``pdg
keys rotate`` (or ``POST /admin/v1/keys/rotate``) makes a new one active at
once on the replica that rotates and within ``server.catalogue_refresh_seconds``
on every other (each polls the active key), and retires the one before. A
retired key stays in ``/.well-known/jwks.json`` and keeps verifying for
:meth:`KeyStore.grace_seconds` (the tokens' lifetime, the leeway and a minute
for replicas still switching), then leaves. Private keys are stored as PKCS#8
PEM, encrypted (``BestAvailableEncryption``) under ``tokens.key_passphrase``
(or the file ``tokens.key_passphrase_file``) when one is set. On first start
a key file left by an earlier version (``{data_dir}/keys/signing-key.pem``)
becomes the first active key.

With ``tokens.signing_key_file`` set, each replica signs with the private key
in that file instead (generated with ``cryptography`` on first start, mode
0600) and only the public halves are shared; such keys rotate by replacing
the file, not with ``pdg keys rotate``.

The key id is the RFC 7638 thumbprint of the public key; token headers are
only ever used to pick one of *these* keys, never to fetch or build one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config.settings import Settings
from core import sm2
from ledger import admin_log
from licensing.models import SigningKeyRow
from storage.db import utcnow

#: ECDSA P-256, Ed25519, or (with the ``[sm]`` extra) an SM2 key of Tongsuo's.
PrivateKey: TypeAlias = Any

#: The only algorithms our own tokens may carry, per key type and curve.
ALGORITHM_FOR_KEY: dict[tuple[str, str], str] = {
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
    ("EC", sm2.CURVE): sm2.ALG,
}


def algorithm_for(jwk: dict[str, Any]) -> str | None:
    """The algorithm one of our public JWKs signs with (``None``: not ours)."""
    return ALGORITHM_FOR_KEY.get((str(jwk.get("kty")), str(jwk.get("crv"))))


def verifying_key(jwk: dict[str, Any], alg: str) -> Any:
    """The public key object of one of our JWKs (ValueError if unusable)."""
    if alg == sm2.ALG:
        return sm2.key_from_jwk(jwk)
    try:
        return jwt.PyJWK(jwk, algorithm=alg).key
    except jwt.PyJWTError as exc:
        raise ValueError(str(exc)) from exc


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
    if alg == sm2.ALG:
        jwk: dict[str, Any] = sm2.public_jwk(public)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = json.loads(ECAlgorithm.to_jwk(public))
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
        pem = private_pem(generate_key(alg).private_key, None)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    try:
        loaded, alg = open_private_pem(path.read_bytes(), None)
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise KeyFileError(f"signing key {path}: {exc}") from exc
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


#: Why a deployment with key files has no key store to list or rotate.
FILE_KEYS = (
    "this deployment signs with key files (tokens.signing_key_file); they rotate by replacing the files"
)


def key_store(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> KeyStore | None:
    """The deployment's shared key store (``None`` with a key file)."""
    if not settings.shared_signing_keys:
        return None
    return KeyStore(
        sessions,
        passphrase=settings.key_passphrase,
        algorithm=settings.tokens.algorithm,
        ttl_seconds=settings.tokens.access_token_ttl_seconds,
        leeway_seconds=settings.tokens.leeway_seconds,
    )


def legacy_key(settings: Settings) -> SigningKey | None:
    """A key file an earlier version made in the data folder: the first
    shared key, so tokens it signed stay valid."""
    path = settings.signing_key_path
    return load_or_create_signing_key(path, settings.tokens.algorithm) if path.exists() else None


def private_pem(key: PrivateKey, passphrase: bytes | None) -> bytes:
    """PKCS#8 PEM, encrypted under ``passphrase`` when there is one."""
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        return sm2.private_pem(key, passphrase)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def open_private_pem(pem: bytes, passphrase: bytes | None) -> tuple[PrivateKey, str]:
    """A signing key from PKCS#8 PEM and the algorithm it signs with:
    ECDSA P-256, Ed25519, or SM2 (with the ``[sm]`` extra); ValueError for
    any other key, or one that cannot be decrypted."""
    try:
        loaded = serialization.load_pem_private_key(pem, password=passphrase)
    except UnsupportedAlgorithm as exc:  # an SM2 key (or its SM4 encryption) is Tongsuo's
        if not sm2.available():
            raise ValueError("not an EC P-256 or Ed25519 key (an SM2 key needs the [sm] extra)") from exc
        return sm2.load_private_pem(pem, passphrase), sm2.ALG
    except ValueError as exc:  # also an SM2 key encrypted with SM4, which only Tongsuo reads
        if not sm2.available():
            raise
        try:
            return sm2.load_private_pem(pem, passphrase), sm2.ALG
        except ValueError:
            raise exc from None
    if isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1):
        return loaded, "ES256"
    if isinstance(loaded, ed25519.Ed25519PrivateKey):
        return loaded, "EdDSA"
    raise ValueError("not an EC P-256, Ed25519 or SM2 private key")


class KeyStoreError(Exception):
    """The shared signing keys cannot be used (one line, for humans)."""


def generate_key(alg: str) -> SigningKey:
    private: PrivateKey
    if alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif alg == sm2.ALG:
        private = sm2.generate_private_key()
    else:
        raise ValueError(f"no signing keys of algorithm {alg!r}")
    jwk = _public_jwk(private, alg)
    return SigningKey(kid=jwk["kid"], alg=alg, private_key=private, public_jwk=jwk)


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    alg: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    #: When a retired key leaves the JWKS (``None``: it has not retired).
    leaves_jwks_at: datetime | None
    active: bool

    def as_dict(self) -> dict[str, Any]:
        def text(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "kid": self.kid,
            "alg": self.alg,
            "active": self.active,
            "created_at": text(self.created_at),
            "activated_at": text(self.activated_at),
            "retired_at": text(self.retired_at),
            "leaves_jwks_at": text(self.leaves_jwks_at),
        }


class KeyStore:
    """The signing keys every replica shares through the database."""

    #: Beyond the tokens' lifetime and leeway: replicas still switching.
    SWITCH_MARGIN_SECONDS = 60

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        passphrase: bytes | None,
        algorithm: str = "ES256",
        ttl_seconds: int,
        leeway_seconds: int,
    ) -> None:
        self._sessions = sessions
        self._passphrase = passphrase
        self.algorithm = algorithm
        #: Keys opened (decrypted) already, by kid: the poll of every replica
        #: reads the active row each refresh, and opens it once.
        self._opened: dict[str, SigningKey] = {}
        self.grace_seconds = ttl_seconds + leeway_seconds + self.SWITCH_MARGIN_SECONDS

    def _seal(self, key: SigningKey) -> str:
        return private_pem(key.private_key, self._passphrase).decode("ascii")

    def _open(self, row: SigningKeyRow) -> SigningKey:
        known = self._opened.get(row.kid)
        if known is not None:
            return known
        pem = (row.private_pem or "").encode("ascii")
        encrypted = b"ENCRYPTED" in pem.split(b"\n", 1)[0]
        if encrypted and not self._passphrase:
            raise KeyStoreError(
                f"signing key {row.kid} is encrypted: set tokens.key_passphrase (or key_passphrase_file)"
            )
        try:
            private, _alg = open_private_pem(pem, self._passphrase if encrypted else None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"signing key {row.kid} cannot be opened (wrong passphrase?)") from exc
        except sm2.SMUnavailableError as exc:
            raise KeyStoreError(f"signing key {row.kid}: {exc}") from exc
        key = SigningKey(kid=row.kid, alg=row.alg, private_key=private, public_jwk=dict(row.public_jwk))
        self._opened[row.kid] = key
        return key

    @staticmethod
    def _active_rows(rows: list[SigningKeyRow]) -> list[SigningKeyRow]:
        live = [r for r in rows if r.private_pem and r.retired_at is None and r.activated_at is not None]
        return sorted(live, key=lambda r: (r.activated_at, r.kid), reverse=True)

    async def active(self, *, first: SigningKey | None = None) -> SigningKey:
        """The active key; with none yet, ``first`` (or a new key of ``algorithm``)
        becomes it. Every other key still marked active is retired."""
        async with self._sessions() as session, session.begin():
            rows = list((await session.execute(select(SigningKeyRow))).scalars())
            active = self._active_rows(rows)
            if not active:
                key = first or generate_key(self.algorithm)
                row = await session.get(SigningKeyRow, key.kid)
                if row is None:
                    row = SigningKeyRow(kid=key.kid, alg=key.alg, public_jwk=key.public_jwk)
                    session.add(row)
                row.private_pem = self._seal(key)
                row.activated_at = utcnow()
                row.retired_at = None
                return key
            now = utcnow()
            for extra in active[1:]:  # two replicas that started at once
                extra.retired_at = now
            return self._open(active[0])

    async def rotate(self, alg: str) -> SigningKey:
        """A new active key; the one before retires now."""
        key = generate_key(alg)
        async with self._sessions() as session, session.begin():
            now = utcnow()
            retired = []
            for row in self._active_rows(list((await session.execute(select(SigningKeyRow))).scalars())):
                row.retired_at = now
                retired.append(row.kid)
            session.add(
                SigningKeyRow(
                    kid=key.kid,
                    alg=key.alg,
                    public_jwk=key.public_jwk,
                    private_pem=self._seal(key),
                    activated_at=now,
                )
            )
            await session.flush()
            await admin_log.record(
                await session.connection(),
                "key.rotate",
                key.kid,
                before={"active": retired},
                after={"active": key.kid, "alg": key.alg, "public_jwk": key.public_jwk},
            )
        return key

    async def public_keys(self) -> list[dict[str, Any]]:
        """The keys that verify: every one not retired, and the retired ones
        within their grace."""
        horizon = utcnow() - timedelta(seconds=self.grace_seconds)
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    select(SigningKeyRow)
                    .where((SigningKeyRow.retired_at.is_(None)) | (SigningKeyRow.retired_at > horizon))
                    .order_by(SigningKeyRow.created_at)
                )
            ).scalars()
            return [dict(r.public_jwk) for r in rows]

    async def listing(self) -> list[KeyInfo]:
        async with self._sessions() as session:
            rows = list(
                (await session.execute(select(SigningKeyRow).order_by(SigningKeyRow.created_at))).scalars()
            )
        active = self._active_rows(rows)
        current = active[0].kid if active else None
        grace = timedelta(seconds=self.grace_seconds)
        return [
            KeyInfo(
                kid=r.kid,
                alg=r.alg,
                created_at=r.created_at,
                activated_at=r.activated_at,
                retired_at=r.retired_at,
                leaves_jwks_at=r.retired_at + grace if r.retired_at is not None else None,
                active=r.kid == current,
            )
            for r in rows
        ]
