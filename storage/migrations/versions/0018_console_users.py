"""console users and sessions

``console_users`` holds the people who sign in to the browser console: a
role (the admin roles, or ``developer`` scoped to one licensee), an
Argon2id password hash, an optional TOTP seed, a disabled flag and the
lock-out state. ``console_sessions`` holds the signed-in browsers, by the
SHA-256 of their session id (never the id itself).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("licensee_id", sa.String(length=64), nullable=True),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("totp_secret", sa.String(length=64), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "role IN ('licence-admin', 'finance', 'auditor', 'viewer', 'developer')",
            name=op.f("ck_console_users_role_known"),
        ),
        sa.CheckConstraint(
            "(role = 'developer') = (licensee_id IS NOT NULL)",
            name=op.f("ck_console_users_developer_licensee"),
        ),
        sa.ForeignKeyConstraint(
            ["licensee_id"], ["licensees.id"], name=op.f("fk_console_users_licensee_id_licensees")
        ),
        sa.PrimaryKeyConstraint("username", name=op.f("pk_console_users")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["username"], ["console_users.username"], name=op.f("fk_console_sessions_username_console_users")
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_console_sessions")),
    )
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_console_sessions_username"), ["username"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_console_sessions_username"))
    op.drop_table("console_sessions")
    op.drop_table("console_users")
