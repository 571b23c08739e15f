"""issued billing documents: identity, numbers, the signed register, drafts

Licensees gain the address, bank and account an invoice names its buyer by;
datasets a tax classification code. Invoices gain their number, issue time
and due date, notes their number (both empty on documents issued before). A
period closed for review before its invoices are issued is held in
``billing_drafts``; ``billing_register`` is the hash chain of every issued
invoice and note, each entry signed (``billing.register``), append-only.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("licensees") as batch:
        batch.add_column(sa.Column("address", sa.String(length=300), server_default="", nullable=False))
        batch.add_column(sa.Column("bank", sa.String(length=200), server_default="", nullable=False))
        batch.add_column(sa.Column("account", sa.String(length=64), server_default="", nullable=False))
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("tax_code", sa.String(length=19), nullable=True))
    # Appended columns only (no batch copy): the billing tables' append-only
    # triggers stay as they are.
    op.add_column("invoices", sa.Column("number", sa.String(length=40), nullable=True))
    op.add_column("invoices", sa.Column("issued_at", sa.DateTime(), nullable=True))
    op.add_column("invoices", sa.Column("due_at", sa.String(length=10), nullable=True))
    op.create_index("ux_invoices_number", "invoices", ["number"], unique=True)
    op.add_column("billing_notes", sa.Column("number", sa.String(length=40), nullable=True))
    op.create_index("ux_billing_notes_number", "billing_notes", ["number"], unique=True)
    op.create_table(
        "billing_drafts",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("opened_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_billing_drafts")),
    )
    op.create_table(
        "billing_register",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("document_id", sa.String(length=120), nullable=False),
        sa.Column("series", sa.String(length=60), nullable=False),
        sa.Column("series_no", sa.BigInteger(), nullable=False),
        sa.Column("number", sa.String(length=40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_billing_register")),
        sa.UniqueConstraint("number", name=op.f("uq_billing_register_number")),
        sa.UniqueConstraint("series", "series_no", name=op.f("uq_billing_register_series")),
        sa.UniqueConstraint("kind", "document_id", name=op.f("uq_billing_register_document")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER billing_register_append_only BEFORE UPDATE OR DELETE ON billing_register "
            "FOR EACH ROW EXECUTE FUNCTION pdg_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER billing_register_no_{action.lower()} BEFORE {action} ON billing_register "
            "BEGIN SELECT RAISE(ABORT, 'the billing register is append-only'); END"
        )


def downgrade() -> None:
    op.drop_table("billing_register")
    op.drop_table("billing_drafts")
    op.drop_index("ux_billing_notes_number", table_name="billing_notes")
    op.drop_column("billing_notes", "number")
    op.drop_index("ux_invoices_number", table_name="invoices")
    op.drop_column("invoices", "due_at")
    op.drop_column("invoices", "issued_at")
    op.drop_column("invoices", "number")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("tax_code")
    with op.batch_alter_table("licensees") as batch:
        batch.drop_column("account")
        batch.drop_column("bank")
        batch.drop_column("address")
