"""ledger partitions

On PostgreSQL ``calls`` becomes a table partitioned by range of ``seq``; the
records so far become its open (default) partition, ``calls_open``, which
the writer closes at the first record of a later period
(``ledger.partitions``). ``ledger_partitions`` lists the partitions and
their archives (both dialects; an SQLite ledger has no partitions). A call id
is unique per partition; the parent indexes it for look-ups across them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: The indexes of ``calls`` besides its key, by name: their columns.
_INDEXES = {
    "ix_calls_dataset_seq": "dataset_id, seq",
    "ix_calls_licensee_seq": "licensee_id, seq",
    "ix_calls_period_licensee": "period, licensee_id",
    "ix_calls_request_id": "request_id",
    "ix_calls_time": "time",
}


def upgrade() -> None:
    op.create_table(
        "ledger_partitions",
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=True),
        sa.Column("opened_at", sa.DateTime(), nullable=True),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.Column("archived_at", sa.DateTime(), nullable=True),
        sa.Column("archive_sha256", sa.String(length=64), nullable=True),
        sa.Column("archive_location", sa.String(length=1000), nullable=True),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_ledger_partitions")),
    )
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("calls", schema=None) as batch_op:
            batch_op.create_index("ix_calls_call_id", ["call_id"], unique=False)
        return
    statements = [
        "ALTER TABLE calls RENAME TO calls_open",
        "DROP TRIGGER calls_append_only ON calls_open",
        "ALTER TABLE calls_open RENAME CONSTRAINT pk_calls TO calls_open_pkey",
        "ALTER TABLE calls_open RENAME CONSTRAINT uq_calls_call_id TO calls_open_call_id_key",
        *(f"ALTER INDEX {name} RENAME TO calls_open_{name[9:]}" for name in _INDEXES),
        "CREATE TABLE calls (LIKE calls_open INCLUDING DEFAULTS) PARTITION BY RANGE (seq)",
        "ALTER TABLE calls ADD CONSTRAINT pk_calls PRIMARY KEY (seq)",
        "CREATE INDEX ix_calls_call_id ON calls (call_id)",
        *(f"CREATE INDEX {name} ON calls ({columns})" for name, columns in _INDEXES.items()),
        "ALTER TABLE calls ATTACH PARTITION calls_open DEFAULT",
        "CREATE TRIGGER calls_append_only BEFORE UPDATE OR DELETE ON calls "
        "FOR EACH ROW EXECUTE FUNCTION pdg_append_only()",
    ]
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    """Back to one table, with the records of the attached partitions (an
    archived partition's records stay in its archive)."""
    if op.get_bind().dialect.name == "postgresql":
        statements = [
            "CREATE TABLE calls_whole (LIKE calls INCLUDING DEFAULTS)",
            "INSERT INTO calls_whole SELECT * FROM calls",
            "DROP TABLE calls CASCADE",
            "ALTER TABLE calls_whole RENAME TO calls",
            "ALTER TABLE calls ADD CONSTRAINT pk_calls PRIMARY KEY (seq)",
            "ALTER TABLE calls ADD CONSTRAINT uq_calls_call_id UNIQUE (call_id)",
            *(f"CREATE INDEX {name} ON calls ({columns})" for name, columns in _INDEXES.items()),
            "CREATE TRIGGER calls_append_only BEFORE UPDATE OR DELETE ON calls "
            "FOR EACH ROW EXECUTE FUNCTION pdg_append_only()",
        ]
        for statement in statements:
            op.execute(statement)
    else:
        with op.batch_alter_table("calls", schema=None) as batch_op:
            batch_op.drop_index("ix_calls_call_id")
    op.drop_table("ledger_partitions")
