"""Admin API bearer tokens, by role.

A token reads ``pdga_<id>_<secret>``: the id finds the row, the secret is
checked against its Argon2id hash. A verified token is remembered in process
memory (by a SHA-256 digest, never the token) for a minute, so the admin API
does not pay the slow hash on every request; revocation is checked on each
lookup of the row regardless.

Roles and what they may do:

=============  ===================================================================
licence-admin  everything on the catalogue, licensees, licences and apps; reads all
finance        reads all; billing actions
auditor        reads all; the call record and audit tools
viewer         reads all
licensee       reads its own licensee, licences, apps, usage and invoices only
=============  ===================================================================
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import AdminAuthError, ForbiddenError, ValidationFailedError
from ledger import admin_log
from licensing.models import AdminTokenRow, LicenseeRow
from licensing.schemas import AdminTokenIn
from licensing.secrets import hash_secret_async, new_secret, verify_secret_async
from storage.db import utcnow

PREFIX = "pdga"
_CACHE_SECONDS = 60.0

#: Permissions each role holds.
PERMISSIONS: dict[str, frozenset[str]] = {
    "licence-admin": frozenset({"read", "catalogue:write", "licensing:write", "keys:write"}),
    "finance": frozenset({"read", "billing:write", "billing:reconcile"}),
    "auditor": frozenset({"read", "audit:read", "billing:reconcile"}),
    "viewer": frozenset({"read"}),
    "licensee": frozenset({"read:own"}),
}


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    token_id: str
    role: str
    licensee_id: str | None

    def require(self, permission: str) -> None:
        held = PERMISSIONS.get(self.role, frozenset())
        if permission in held:
            return
        if permission == "read" and "read:own" in held:
            return  # callers narrow to the principal's own licensee
        raise ForbiddenError(f"role {self.role} may not do this ({permission})")

    @property
    def own_licensee(self) -> str | None:
        """The only licensee this principal may see, or ``None`` for all."""
        return self.licensee_id if self.role == "licensee" else None


@dataclass(frozen=True, slots=True)
class CreatedAdminToken:
    id: str
    role: str
    licensee_id: str | None
    token: str


class AdminTokens:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._verified: dict[str, tuple[bytes, float]] = {}

    async def create(self, data: AdminTokenIn) -> CreatedAdminToken:
        token_id = new_secret(9).replace("-", "x").replace("_", "y")
        secret = new_secret()
        token_hash = await hash_secret_async(secret)
        async with self._sessions() as session, session.begin():
            if data.licensee_id is not None and await session.get(LicenseeRow, data.licensee_id) is None:
                raise ValidationFailedError("licensee_id", f"no licensee {data.licensee_id}")
            session.add(
                AdminTokenRow(
                    id=token_id,
                    role=data.role,
                    licensee_id=data.licensee_id,
                    token_hash=token_hash,
                    description=data.description,
                    expires_at=None
                    if data.expires_in_seconds is None
                    else utcnow() + timedelta(seconds=data.expires_in_seconds),
                )
            )
            await session.flush()
            await admin_log.record(
                await session.connection(),
                "admin-token.create",
                token_id,
                after={
                    "role": data.role,
                    "licensee_id": data.licensee_id,
                    "expires_in_seconds": data.expires_in_seconds,
                },
            )
        return CreatedAdminToken(token_id, data.role, data.licensee_id, f"{PREFIX}_{token_id}_{secret}")

    async def revoke(self, token_id: str) -> bool:
        async with self._sessions() as session, session.begin():
            row = await session.get(AdminTokenRow, token_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            await session.flush()
            await admin_log.record(
                await session.connection(), "admin-token.revoke", token_id, after={"role": row.role}
            )
        self._verified.pop(token_id, None)
        return True

    async def list(self) -> list[AdminTokenRow]:
        async with self._sessions() as session:
            return list(
                (await session.execute(select(AdminTokenRow).order_by(AdminTokenRow.created_at))).scalars()
            )

    @staticmethod
    def claimed_id(authorization: str | None) -> str | None:
        """The token id an ``Authorization`` header names, unchecked (for
        throttling failures)."""
        parts = (authorization or "").partition(" ")[2].strip().split("_", 2)
        return parts[1] if len(parts) == 3 and parts[0] == PREFIX else None

    async def authenticate(self, authorization: str | None) -> AdminPrincipal:
        if not authorization:
            raise AdminAuthError(
                "send an admin token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="pdg-admin"'},
            )
        scheme, _, token = authorization.partition(" ")
        parts = token.strip().split("_", 2)
        if scheme.lower() != "bearer" or len(parts) != 3 or parts[0] != PREFIX:
            raise AdminAuthError(
                "malformed admin token",
                headers={"WWW-Authenticate": 'Bearer realm="pdg-admin", error="invalid_token"'},
            )
        _, token_id, secret = parts
        async with self._sessions() as session:
            row = await session.get(AdminTokenRow, token_id)
        invalid = AdminAuthError(
            "unknown, revoked or expired admin token",
            headers={"WWW-Authenticate": 'Bearer realm="pdg-admin", error="invalid_token"'},
        )
        expired = row is not None and row.expires_at is not None and row.expires_at <= utcnow()
        if row is None or row.revoked_at is not None or expired:
            # As long as a known token with the wrong secret takes.
            await verify_secret_async(None, secret)
            raise invalid
        digest = hashlib.sha256(token.strip().encode()).digest()
        cached = self._verified.get(token_id)
        now = time.monotonic()
        if not (cached and hmac.compare_digest(cached[0], digest) and cached[1] > now):
            if not await verify_secret_async(row.token_hash, secret):
                raise invalid
            self._verified[token_id] = (digest, now + _CACHE_SECONDS)
        return AdminPrincipal(token_id=row.id, role=row.role, licensee_id=row.licensee_id)
