"""billing: closed periods, invoices, their lines and the calls they billed

All four are append-only: triggers refuse UPDATE and DELETE on both backends.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TABLES = ("billing_closes", "invoices", "invoice_lines", "invoice_calls")


def upgrade() -> None:
    op.create_table(
        "billing_closes",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("after_seq", sa.BigInteger(), nullable=False),
        sa.Column("through_seq", sa.BigInteger(), nullable=False),
        sa.Column("vat_rate", sa.String(length=16), nullable=False),
        sa.Column("invoices", sa.Integer(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_billing_closes")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("licensee_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("subtotal_fen", sa.BigInteger(), nullable=False),
        sa.Column("vat_rate", sa.String(length=16), nullable=False),
        sa.Column("vat_fen", sa.BigInteger(), nullable=False),
        sa.Column("total_fen", sa.BigInteger(), nullable=False),
        sa.Column("closed_at", sa.DateTime(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["period"], ["billing_closes.period"], name=op.f("fk_invoices_period_billing_closes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("licensee_id", "period", name=op.f("uq_invoices_licensee_id")),
    )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.create_index("ix_invoices_period", ["period"], unique=False)
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.String(length=100), nullable=False),
        sa.Column("line_no", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("usage_period", sa.String(length=7), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("charge_e4", sa.BigInteger(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("provider_fen", sa.BigInteger(), nullable=False),
        sa.Column("operator_fen", sa.BigInteger(), nullable=False),
        sa.Column("public_fund_fen", sa.BigInteger(), nullable=False),
        sa.Column("split_provider", sa.Integer(), nullable=False),
        sa.Column("split_operator", sa.Integer(), nullable=False),
        sa.Column("split_public_fund", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_invoice_lines_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("invoice_id", "line_no", name=op.f("pk_invoice_lines")),
    )
    op.create_table(
        "invoice_calls",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("call_id", sa.String(length=36), nullable=False),
        sa.Column("invoice_id", sa.String(length=100), nullable=False),
        sa.Column("charge_e4", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_invoice_calls_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_invoice_calls")),
    )
    with op.batch_alter_table("invoice_calls", schema=None) as batch_op:
        batch_op.create_index("ix_invoice_calls_invoice_seq", ["invoice_id", "seq"], unique=False)
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute(
            "CREATE FUNCTION pdg_billing_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'closed billing is append-only (% on %)', TG_OP, TG_TABLE_NAME; END $$"
        )
    for table in _TABLES:
        if postgres:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION pdg_billing_append_only()"
            )
            continue
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'closed billing is append-only'); END"
            )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table in _TABLES:
        if postgres:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS pdg_billing_append_only()")
    with op.batch_alter_table("invoice_calls", schema=None) as batch_op:
        batch_op.drop_index("ix_invoice_calls_invoice_seq")
    op.drop_table("invoice_calls")
    op.drop_table("invoice_lines")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index("ix_invoices_period")
    op.drop_table("invoices")
    op.drop_table("billing_closes")
