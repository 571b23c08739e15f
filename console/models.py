"""Tables of the console: its users and their sessions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from storage.db import Base, UTCDateTime, utcnow


class ConsoleUserRow(Base):
    __tablename__ = "console_users"
    __table_args__ = (
        CheckConstraint(
            "role IN ('licence-admin', 'finance', 'auditor', 'viewer', 'developer')", name="role_known"
        ),
        CheckConstraint("(role = 'developer') = (licensee_id IS NOT NULL)", name="developer_licensee"),
    )

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))
    #: The one licensee a ``developer`` sees (``None`` for staff).
    licensee_id: Mapped[str | None] = mapped_column(ForeignKey("licensees.id"), nullable=True)
    #: Argon2id hash of the password (``licensing.secrets``).
    password_hash: Mapped[str] = mapped_column(String(200))
    #: The TOTP seed (RFC 6238, base32), when enrolled: it must be read to
    #: check a code, so it is stored as it is.
    totp_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The time step of the last code accepted: a code is never accepted twice.
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Failed sign-ins in a row; reset by a successful one.
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConsoleSessionRow(Base):
    """A signed-in browser. Only the SHA-256 of the session id is kept."""

    __tablename__ = "console_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(ForeignKey("console_users.username"), index=True)
    #: ``totp``: the password was right, a code is awaited; ``ok``: signed in.
    stage: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
