"""the admin audit log

``admin_log`` holds one hash-chained entry per administrative change
(``ledger.admin_log``), append-only like ``calls``.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_admin_log")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER admin_log_append_only BEFORE UPDATE OR DELETE ON admin_log "
            "FOR EACH ROW EXECUTE FUNCTION pdg_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER admin_log_no_{action.lower()} BEFORE {action} ON admin_log "
            "BEGIN SELECT RAISE(ABORT, 'the admin log is append-only'); END"
        )


def downgrade() -> None:
    op.drop_table("admin_log")
