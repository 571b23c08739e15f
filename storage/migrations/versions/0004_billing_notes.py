"""billing notes: credit and debit notes correcting closed invoices; a lighter invoice_calls

``billing_notes`` is append-only, as the rest of billing: triggers refuse UPDATE
and DELETE. ``invoice_calls`` (a row per billed call, a million a month) loses
its foreign key to ``invoices`` and its index on ``invoice_id``: the row-by-row
key check and the index made up most of a close's time, and reconciliation reads
a period's billed calls by ``seq`` range: ``billing_closes.first_seq`` (the
smallest seq a close billed; 0 for closes made before it, read from the start).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TABLE = "billing_notes"


def _guard(table: str, postgres: bool) -> None:
    """The append-only triggers of revision 0003 (its function on PostgreSQL)."""
    if postgres:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION pdg_billing_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'closed billing is append-only'); END"
        )


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # On SQLite the batch copies the table into a new one, which has no triggers.
    with op.batch_alter_table("invoice_calls", schema=None) as batch_op:
        batch_op.drop_index("ix_invoice_calls_invoice_seq")
        batch_op.drop_constraint("fk_invoice_calls_invoice_id_invoices", type_="foreignkey")
    if not postgres:
        _guard("invoice_calls", postgres)
    # ALTER TABLE ... ADD COLUMN on both backends (a batch would copy the table
    # on SQLite, and the copy would have no triggers).
    op.add_column(
        "billing_closes", sa.Column("first_seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
    )
    op.create_table(
        _TABLE,
        sa.Column("id", sa.String(length=120), nullable=False),
        sa.Column("invoice_id", sa.String(length=100), nullable=False),
        sa.Column("note_no", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=True),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("vat_fen", sa.BigInteger(), nullable=False),
        sa.Column("total_fen", sa.BigInteger(), nullable=False),
        sa.Column("provider_fen", sa.BigInteger(), nullable=False),
        sa.Column("operator_fen", sa.BigInteger(), nullable=False),
        sa.Column("public_fund_fen", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("issued_by", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.DateTime(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_billing_notes_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_notes")),
        sa.UniqueConstraint("invoice_id", "note_no", name=op.f("uq_billing_notes_invoice_id")),
    )
    with op.batch_alter_table(_TABLE, schema=None) as batch_op:
        batch_op.create_index("ix_billing_notes_period", ["period"], unique=False)
    _guard(_TABLE, postgres)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_append_only ON {_TABLE}")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_no_update")
        op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_no_delete")
    with op.batch_alter_table(_TABLE, schema=None) as batch_op:
        batch_op.drop_index("ix_billing_notes_period")
    op.drop_table(_TABLE)
    with op.batch_alter_table("billing_closes", schema=None) as batch_op:
        batch_op.drop_column("first_seq")
    if not postgres:
        _guard("billing_closes", postgres)
    with op.batch_alter_table("invoice_calls", schema=None) as batch_op:
        batch_op.create_foreign_key(
            "fk_invoice_calls_invoice_id_invoices", "invoices", ["invoice_id"], ["id"]
        )
        batch_op.create_index("ix_invoice_calls_invoice_seq", ["invoice_id", "seq"], unique=False)
    if not postgres:
        _guard("invoice_calls", postgres)
