"""payments: money received against issued invoices

``payments`` holds each payment recorded against an issued invoice: its
amount in fen (above 0), the day it was paid, when it was recorded, the
payer's reference and who recorded it. Payments of one invoice are numbered
1, 2, ... (unique per invoice), which serialises concurrent payments
(``billing.payments``). Append-only, as the rest of billing: triggers refuse
UPDATE and DELETE.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_TABLE = "payments"


def upgrade() -> None:
    op.create_table(
        _TABLE,
        sa.Column("id", sa.String(length=120), nullable=False),
        sa.Column("invoice_id", sa.String(length=100), nullable=False),
        sa.Column("payment_no", sa.Integer(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("paid_on", sa.Date(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column("recorded_by", sa.String(length=64), nullable=False),
        sa.CheckConstraint("amount_fen > 0", name=op.f("ck_payments_amount_positive")),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_payments_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
        sa.UniqueConstraint("invoice_id", "payment_no", name=op.f("uq_payments_invoice_id")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # The function revision 0003 made for the billing tables.
        op.execute(
            f"CREATE TRIGGER {_TABLE}_append_only BEFORE UPDATE OR DELETE ON {_TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION pdg_billing_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {_TABLE}_no_{action.lower()} BEFORE {action} ON {_TABLE} "
            "BEGIN SELECT RAISE(ABORT, 'payments are append-only'); END"
        )


def downgrade() -> None:
    # The triggers go with the table.
    op.drop_table(_TABLE)
