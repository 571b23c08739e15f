"""Console users and their sessions: the service behind ``pdg console-user``
and the console's sign-in (``console.web``).

Passwords are stored as Argon2id hashes (``licensing.secrets``); TOTP codes
(RFC 6238, 6 digits, 30-second steps, SHA-1 as authenticator apps expect)
are made by ``cryptography``'s TOTP and accepted one step either side of
now, each at most once. A session id is 32 random bytes; only its SHA-256
is stored. Every change and every sign-in attempt (never the password or
code) is written to the admin audit log in the transaction that makes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import quote

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from config.settings import ConsoleSettings
from console import ROLES
from console.models import ConsoleSessionRow, ConsoleUserRow
from core.actor import acting_as
from core.errors import ConflictError, NotFoundError, ValidationFailedError
from ledger import admin_log
from licensing.models import LicenseeRow
from licensing.secrets import hash_secret_async, new_secret, verify_secret_async
from storage.db import utcnow

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: The shortest password ``pdg console-user add --password-stdin`` accepts.
MIN_PASSWORD = 12
#: How long the TOTP step of a sign-in may take.
TOTP_STAGE_SECONDS = 300
#: A session's ``last_seen_at`` is written at most this often.
_TOUCH_SECONDS = 30
_TOTP_STEP = 30
_TOTP_DIGITS = 6

Outcome = Literal["ok", "totp", "failed"]


def session_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _totp(secret_b32: str) -> TOTP:
    key = base64.b32decode(secret_b32)
    # RFC 6238 with HMAC-SHA1: what authenticator apps implement.
    return TOTP(key, _TOTP_DIGITS, SHA1(), _TOTP_STEP, enforce_key_length=False)  # noqa: S303


def totp_code(secret_b32: str, at: datetime) -> str:
    """The code of ``at``'s time step (what an authenticator app shows)."""
    return _totp(secret_b32).generate(int(at.timestamp())).decode()


def totp_uri(secret_b32: str, username: str, issuer: str = "pdg") -> str:
    return _totp(secret_b32).get_provisioning_uri(quote(username, safe="@._-"), issuer)


@dataclass(frozen=True, slots=True)
class ConsolePrincipal:
    """Who a console request runs as."""

    username: str
    role: str
    licensee_id: str | None

    @property
    def staff(self) -> bool:
        """The operating company's (any role but ``developer``)."""
        return self.role != "developer"

    @property
    def licensing_writer(self) -> bool:
        return self.role == "licence-admin"

    @property
    def actor(self) -> str:
        """As the admin audit log names whoever made a change."""
        return f"console:{self.username} ({self.role})"


@dataclass(frozen=True, slots=True)
class CreatedUser:
    username: str
    role: str
    licensee_id: str | None
    password: str
    totp_secret: str | None

    @property
    def totp_uri(self) -> str | None:
        return None if self.totp_secret is None else totp_uri(self.totp_secret, self.username)


@dataclass(frozen=True, slots=True)
class SignIn:
    outcome: Outcome
    #: The new session's id (to set as the cookie), for ``ok`` and ``totp``.
    token: str | None = None


def _user_view(row: ConsoleUserRow) -> dict[str, object]:
    return {
        "username": row.username,
        "role": row.role,
        "licensee_id": row.licensee_id,
        "totp": row.totp_secret is not None,
        "disabled": row.disabled,
        "locked_until": row.locked_until,
    }


def check_username(username: str) -> str:
    if not USERNAME.fullmatch(username):
        raise ValidationFailedError(
            "username",
            "1-64 characters: letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
        )
    return username


class ConsoleUsers:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: ConsoleSettings) -> None:
        self._sessions = sessions
        self._settings = settings

    # -- administration (``pdg console-user``) ----------------------------------

    async def add(
        self,
        username: str,
        role: str,
        *,
        licensee_id: str | None = None,
        password: str | None = None,
        totp: bool = False,
    ) -> CreatedUser:
        check_username(username)
        if role not in ROLES:
            raise ValidationFailedError("role", f"one of {', '.join(ROLES)}")
        if (role == "developer") != (licensee_id is not None):
            raise ValidationFailedError("licensee", "a developer names its licensee; no other role does")
        if password is not None and len(password) < MIN_PASSWORD:
            raise ValidationFailedError("password", f"at least {MIN_PASSWORD} characters")
        password = password or new_secret(18)
        secret = base64.b32encode(secrets.token_bytes(20)).decode() if totp else None
        password_hash = await hash_secret_async(password)
        async with self._sessions() as session, session.begin():
            if licensee_id is not None and await session.get(LicenseeRow, licensee_id) is None:
                raise ValidationFailedError("licensee", f"no licensee {licensee_id}")
            if await session.get(ConsoleUserRow, username) is not None:
                raise ConflictError(f"console user {username} already exists")
            row = ConsoleUserRow(
                username=username,
                role=role,
                licensee_id=licensee_id,
                password_hash=password_hash,
                totp_secret=secret,
                disabled=False,
                failed_attempts=0,
            )
            session.add(row)
            await session.flush()
            await admin_log.record(
                await session.connection(), "console-user.create", username, after=_user_view(row)
            )
        return CreatedUser(username, role, licensee_id, password, secret)

    async def disable(self, username: str) -> None:
        """Disabled, and signed out everywhere."""
        async with self._sessions() as session, session.begin():
            row = await self._user(session, username)
            before = _user_view(row)
            row.disabled = True
            await session.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.username == username))
            await session.flush()
            await admin_log.record(
                await session.connection(),
                "console-user.disable",
                username,
                before=before,
                after=_user_view(row),
            )

    async def reset(self, username: str, password: str | None = None) -> str:
        """A new password (returned), the lock-out cleared, every session ended."""
        if password is not None and len(password) < MIN_PASSWORD:
            raise ValidationFailedError("password", f"at least {MIN_PASSWORD} characters")
        password = password or new_secret(18)
        password_hash = await hash_secret_async(password)
        async with self._sessions() as session, session.begin():
            row = await self._user(session, username)
            before = _user_view(row)
            row.password_hash = password_hash
            row.password_changed_at = utcnow()
            row.failed_attempts = 0
            row.locked_until = None
            await session.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.username == username))
            await session.flush()
            await admin_log.record(
                await session.connection(),
                "console-user.reset",
                username,
                before=before,
                after=_user_view(row),
            )
        return password

    async def list(self) -> list[dict[str, object]]:
        """Every console user, JSON-ready."""
        async with self._sessions() as session:
            rows = (await session.execute(select(ConsoleUserRow).order_by(ConsoleUserRow.username))).scalars()
            return [
                {**_user_view(r), "locked_until": r.locked_until.isoformat() if r.locked_until else None}
                for r in rows
            ]

    @staticmethod
    async def _user(session: AsyncSession, username: str) -> ConsoleUserRow:
        row = await session.get(ConsoleUserRow, username) if USERNAME.fullmatch(username) else None
        if row is None:
            raise NotFoundError(f"no console user {username[:64]!r}")
        return row

    # -- signing in -----------------------------------------------------------------

    async def sign_in(self, username: str, password: str, *, address: str, now: datetime) -> SignIn:
        """Check a password. ``failed`` says nothing of why (unknown user,
        wrong password, disabled, locked out); the audit log does."""
        plausible = USERNAME.fullmatch(username) is not None
        async with self._sessions() as session:
            row = await session.get(ConsoleUserRow, username) if plausible else None
            stored = row.password_hash if row is not None else None
        # Always the same slow work, whoever is named.
        matched = await verify_secret_async(stored, password)
        target = username if plausible else "(not a username)"
        async with self._sessions() as session, session.begin():
            row = await session.get(ConsoleUserRow, username) if plausible else None
            if row is None:
                reason = "unknown-user"
            elif row.disabled:
                reason = "disabled"
            elif row.locked_until is not None and row.locked_until > now:
                reason = "locked"
            elif not matched:
                reason = self._failed(row, now)
            else:
                reason = ""
            if reason:
                await self._log_sign_in(session, target, reason, address)
                return SignIn("failed")
            assert row is not None  # noqa: S101 - a match needs a stored hash
            row.failed_attempts = 0
            row.locked_until = None
            stage = "totp" if row.totp_secret is not None else "ok"
            token = await self._new_session(session, row.username, stage, now)
            await self._log_sign_in(session, target, "password-ok" if stage == "totp" else "ok", address)
        return SignIn("totp" if stage == "totp" else "ok", token)

    async def verify_totp(self, token: str, code: str, *, address: str, now: datetime) -> SignIn:
        """The second step: a code for the session the password opened.
        Success replaces that session with a new, signed-in one."""
        async with self._sessions() as session, session.begin():
            pending = await session.get(ConsoleSessionRow, session_hash(token))
            if (
                pending is None
                or pending.stage != "totp"
                or now - pending.created_at > timedelta(seconds=TOTP_STAGE_SECONDS)
            ):
                return SignIn("failed")
            row = await session.get(ConsoleUserRow, pending.username)
            if row is None or row.totp_secret is None:
                return SignIn("failed")
            step = self._accepted_step(row, code.strip(), now)
            if row.disabled or (row.locked_until is not None and row.locked_until > now):
                reason = "locked" if not row.disabled else "disabled"
            elif step is None:
                reason = "wrong-code"
                if self._failed(row, now) == "locked-now":
                    reason = "wrong-code; locked-now"
            else:
                reason = ""
            if reason:
                if reason != "wrong-code":
                    await session.delete(pending)
                await self._log_sign_in(session, row.username, reason, address)
                return SignIn("failed")
            row.totp_last_step = step
            row.failed_attempts = 0
            await session.delete(pending)
            new = await self._new_session(session, row.username, "ok", now)
            await self._log_sign_in(session, row.username, "ok", address)
        return SignIn("ok", new)

    def _failed(self, row: ConsoleUserRow, now: datetime) -> str:
        row.failed_attempts += 1
        if row.failed_attempts >= self._settings.lockout_failures:
            row.failed_attempts = 0
            row.locked_until = now + timedelta(seconds=self._settings.lockout_seconds)
            return "locked-now"
        return "wrong-password"

    @staticmethod
    def _accepted_step(row: ConsoleUserRow, code: str, now: datetime) -> int | None:
        if row.totp_secret is None or not re.fullmatch(r"[0-9]{6}", code):
            return None
        current = int(now.timestamp()) // _TOTP_STEP
        totp = _totp(row.totp_secret)
        for step in (current - 1, current, current + 1):
            if row.totp_last_step is not None and step <= row.totp_last_step:
                continue
            if hmac.compare_digest(totp.generate(step * _TOTP_STEP), code.encode()):
                return step
        return None

    @staticmethod
    async def _new_session(session: AsyncSession, username: str, stage: str, now: datetime) -> str:
        token = secrets.token_urlsafe(32)
        session.add(
            ConsoleSessionRow(
                id_hash=session_hash(token), username=username, stage=stage, created_at=now, last_seen_at=now
            )
        )
        await session.flush()
        return token

    @staticmethod
    async def _log_sign_in(session: AsyncSession, username: str, outcome: str, address: str) -> None:
        with acting_as(f"console:{username}"):
            await admin_log.record(
                await session.connection(),
                "console.sign-in",
                username,
                after={"outcome": outcome, "address": address},
            )

    async def principal(self, token: str, now: datetime) -> ConsolePrincipal | None:
        """The signed-in user of a session id, if the session is alive
        (neither idle nor old past the settings) and the user enabled."""
        key = session_hash(token)
        async with self._sessions() as session:
            row = await session.get(ConsoleSessionRow, key)
            if row is None or row.stage != "ok":
                return None
            user = await session.get(ConsoleUserRow, row.username)
            idle = now - row.last_seen_at > timedelta(seconds=self._settings.idle_timeout_seconds)
            old = now - row.created_at > timedelta(seconds=self._settings.session_max_seconds)
            if user is None or user.disabled or idle or old:
                await session.delete(row)
                await session.commit()
                return None
            if now - row.last_seen_at > timedelta(seconds=_TOUCH_SECONDS):
                row.last_seen_at = now
                await session.commit()
            return ConsolePrincipal(user.username, user.role, user.licensee_id)

    async def pending_user(self, token: str, now: datetime) -> str | None:
        """The user whose TOTP code a session awaits."""
        async with self._sessions() as session:
            row = await session.get(ConsoleSessionRow, session_hash(token))
        if row is None or row.stage != "totp":
            return None
        if now - row.created_at > timedelta(seconds=TOTP_STAGE_SECONDS):
            return None
        return row.username

    async def sign_out(self, token: str, username: str) -> None:
        async with self._sessions() as session, session.begin():
            row = await session.get(ConsoleSessionRow, session_hash(token))
            if row is None:
                return
            await session.delete(row)
            with acting_as(f"console:{username}"):
                await admin_log.record(await session.connection(), "console.sign-out", username)

    async def sweep(self, now: datetime) -> int:
        """Forget sessions past their longest life."""
        cutoff = now - timedelta(seconds=self._settings.session_max_seconds)
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                delete(ConsoleSessionRow).where(ConsoleSessionRow.created_at < cutoff)
            )
        return int(getattr(result, "rowcount", 0) or 0)
