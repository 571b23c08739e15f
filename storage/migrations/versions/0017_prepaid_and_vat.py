"""prepaid money and per-dataset VAT rates

* ``prepaid_top_ups``: each purchase of prepaid calls for a licence -- how
  many calls, the positions they take in the licence's prepaid balance
  (``first_position`` + 1 .. ``first_position`` + ``calls``), the unit price
  paid (1/10000 fen) and the invoice it was billed on. Append-only.
* ``licences.paid_prepaid_unit_price_e4``: the licence's agreed unit price of
  a prepaid call (the default price of its top-ups).
* ``datasets.vat_rate``: the VAT rate of the dataset's invoice lines (null:
  ``billing.vat_rate``).
* ``invoices.kind``: ``period`` (a period's invoice, made by its close) or
  ``top-up`` (a purchase of prepaid calls, issued when bought). A top-up is
  billed in the month it was bought, whether or not that month was closed,
  and a licensee may buy several in one month: the invoice's period no longer
  names a close (foreign key dropped) nor is unique per licensee (a period's
  invoice id, ``inv-{period}-{licensee}``, already is).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_TOP_UPS = "prepaid_top_ups"


def _append_only(table: str, what: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        # The function revision 0003 made for the billing tables.
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION pdg_billing_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{what}'); END"
        )


@contextmanager
def _rebuilding_invoices() -> Iterator[Any]:
    """SQLite rebuilds ``invoices`` for a change of its constraints: the rows
    are copied to a new table that takes the old one's name. Dropping the
    old table must not trip the foreign keys that name ``invoices`` (the new
    one holds every row they point to): they are checked at commit when a
    transaction is open (``defer_foreign_keys``), else switched off for the
    rebuild. The append-only triggers go with the old table and are made again."""
    op.execute("PRAGMA foreign_keys = OFF")
    op.execute("PRAGMA defer_foreign_keys = ON")
    try:
        with op.batch_alter_table("invoices", schema=None, recreate="always") as batch:
            yield batch
    finally:
        op.execute("PRAGMA foreign_keys = ON")
    _append_only("invoices", "closed billing is append-only")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table("licences", schema=None) as batch:
        batch.add_column(sa.Column("paid_prepaid_unit_price_e4", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("datasets", schema=None) as batch:
        batch.add_column(sa.Column("vat_rate", sa.String(length=16), nullable=True))
    if postgres:
        op.drop_constraint("fk_invoices_period_billing_closes", "invoices", type_="foreignkey")
        op.drop_constraint("uq_invoices_licensee_id", "invoices", type_="unique")
        op.add_column(
            "invoices", sa.Column("kind", sa.String(length=16), server_default="period", nullable=False)
        )
    else:
        with _rebuilding_invoices() as batch:
            batch.drop_constraint("fk_invoices_period_billing_closes", type_="foreignkey")
            batch.drop_constraint("uq_invoices_licensee_id", type_="unique")
            batch.add_column(sa.Column("kind", sa.String(length=16), server_default="period", nullable=False))
    op.create_table(
        _TOP_UPS,
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("licence_id", sa.String(length=64), nullable=False),
        sa.Column("licensee_id", sa.String(length=64), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("first_position", sa.BigInteger(), nullable=False),
        sa.Column("unit_price_e4", sa.BigInteger(), nullable=False),
        sa.Column("invoice_id", sa.String(length=100), nullable=False),
        sa.Column("bought_at", sa.DateTime(), nullable=False),
        sa.Column("bought_by", sa.String(length=64), nullable=False),
        sa.CheckConstraint("calls > 0", name=op.f("ck_prepaid_top_ups_calls_positive")),
        sa.CheckConstraint("unit_price_e4 >= 0", name=op.f("ck_prepaid_top_ups_price_not_negative")),
        sa.ForeignKeyConstraint(
            ["licence_id"], ["licences.id"], name=op.f("fk_prepaid_top_ups_licence_id_licences")
        ),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_prepaid_top_ups_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prepaid_top_ups")),
        sa.UniqueConstraint("licence_id", "first_position", name=op.f("uq_prepaid_top_ups_licence_id")),
    )
    _append_only(_TOP_UPS, "prepaid top-ups are append-only")


def downgrade() -> None:
    bought = op.get_bind().execute(sa.text("SELECT count(*) FROM invoices WHERE kind <> 'period'")).scalar()
    if bought:
        raise RuntimeError(
            f"{bought} top-up invoice(s) are issued: the schema before 0017 cannot hold them, "
            "and issued invoices are never deleted"
        )
    op.drop_table(_TOP_UPS)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("invoices", "kind")
        op.create_unique_constraint("uq_invoices_licensee_id", "invoices", ["licensee_id", "period"])
        op.create_foreign_key(
            "fk_invoices_period_billing_closes", "invoices", "billing_closes", ["period"], ["period"]
        )
    else:
        with _rebuilding_invoices() as batch:
            batch.drop_column("kind")
            batch.create_unique_constraint("uq_invoices_licensee_id", ["licensee_id", "period"])
            batch.create_foreign_key(
                "fk_invoices_period_billing_closes", "billing_closes", ["period"], ["period"]
            )
    with op.batch_alter_table("datasets", schema=None) as batch:
        batch.drop_column("vat_rate")
    with op.batch_alter_table("licences", schema=None) as batch:
        batch.drop_column("paid_prepaid_unit_price_e4")
