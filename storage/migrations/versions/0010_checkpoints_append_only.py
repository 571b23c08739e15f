"""signed checkpoints are append-only

``ledger_checkpoints`` gets the guard ``calls`` has had from the start:
triggers refuse UPDATE and DELETE on both backends. Whoever holds the schema
can still drop them; a signed checkpoint already seen elsewhere is what
catches that.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # The function of migration 0002 names the table in its message.
        op.execute(
            "CREATE TRIGGER ledger_checkpoints_append_only BEFORE UPDATE OR DELETE ON ledger_checkpoints "
            "FOR EACH ROW EXECUTE FUNCTION pdg_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER ledger_checkpoints_no_{action.lower()} BEFORE {action} ON ledger_checkpoints "
            "BEGIN SELECT RAISE(ABORT, 'signed checkpoints are append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_checkpoints_append_only ON ledger_checkpoints")
    else:
        op.execute("DROP TRIGGER IF EXISTS ledger_checkpoints_no_update")
        op.execute("DROP TRIGGER IF EXISTS ledger_checkpoints_no_delete")
