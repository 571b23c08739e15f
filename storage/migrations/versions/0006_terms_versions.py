"""terms versions: a dataset's prices and revenue split as in force from a moment

Every change of a dataset's price, tiers or revenue split makes a new version
of its terms (``dataset_terms``, append-only); the dataset row holds the
current one and its number (``terms_version``). Each call record names the
version it was charged under (``calls.terms_version``) and each invoice line
the version it bills (``invoice_lines.terms_version``).

The terms already there become version 1 of each dataset, in force from its
creation; records and invoice lines written before have no version
(``NULL``), and are read as version 1. ``dataset_terms`` is append-only:
triggers refuse UPDATE and DELETE on both backends, as on the call record.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_terms",
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("effective_from", sa.DateTime(), nullable=False),
        sa.Column("per_call_e4", sa.BigInteger(), nullable=False),
        sa.Column("per_record_e4", sa.BigInteger(), nullable=False),
        sa.Column("tiers", sa.JSON(), nullable=False),
        sa.Column("split_provider", sa.Integer(), nullable=False),
        sa.Column("split_operator", sa.Integer(), nullable=False),
        sa.Column("split_public_fund", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"]),
        sa.PrimaryKeyConstraint("dataset_id", "version"),
    )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("terms_version", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("terms_version", server_default=None)
    op.execute(
        "INSERT INTO dataset_terms (dataset_id, version, effective_from, per_call_e4, per_record_e4, tiers, "
        "split_provider, split_operator, split_public_fund) "
        "SELECT id, 1, created_at, per_call_e4, per_record_e4, tiers, split_provider, split_operator, "
        "split_public_fund FROM datasets"
    )
    # Plain ADD COLUMN (no table copy): the append-only triggers stay.
    op.add_column("calls", sa.Column("terms_version", sa.Integer(), nullable=True))
    op.add_column("invoice_lines", sa.Column("terms_version", sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION pdg_terms_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'terms versions are append-only (% on %)', TG_OP, TG_TABLE_NAME; END $$"
        )
        op.execute(
            "CREATE TRIGGER dataset_terms_append_only BEFORE UPDATE OR DELETE ON dataset_terms "
            "FOR EACH ROW EXECUTE FUNCTION pdg_terms_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER dataset_terms_no_{action.lower()} BEFORE {action} ON dataset_terms "
                "BEGIN SELECT RAISE(ABORT, 'terms versions are append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS dataset_terms_append_only ON dataset_terms")
        op.execute("DROP FUNCTION IF EXISTS pdg_terms_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS dataset_terms_no_update")
        op.execute("DROP TRIGGER IF EXISTS dataset_terms_no_delete")
    op.drop_column("invoice_lines", "terms_version")
    op.drop_column("calls", "terms_version")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("terms_version")
    op.drop_table("dataset_terms")
