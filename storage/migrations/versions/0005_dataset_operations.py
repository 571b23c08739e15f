"""dataset operations and limits; licence narrowing

A dataset declares the methods it serves (existing datasets: ``GET`` and
``HEAD``, the default) and optionally path patterns (``[]``: every path), the
largest response it relays and, when records are priced, the most records a
call may return. A licence may narrow the methods and paths of the datasets it
grants (``NULL``: the datasets' own).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("methods", sa.JSON(), nullable=False, server_default=sa.text('\'["GET", "HEAD"]\''))
        )
        batch_op.add_column(sa.Column("paths", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
        batch_op.add_column(sa.Column("max_response_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("max_records_per_call", sa.BigInteger(), nullable=True))
    # The defaults served the rows already there; the application always writes them.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("methods", server_default=None)
        batch_op.alter_column("paths", server_default=None)
    with op.batch_alter_table("licences", schema=None) as batch_op:
        batch_op.add_column(sa.Column("methods", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("paths", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("licences", schema=None) as batch_op:
        batch_op.drop_column("paths")
        batch_op.drop_column("methods")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("max_records_per_call")
        batch_op.drop_column("max_response_bytes")
        batch_op.drop_column("paths")
        batch_op.drop_column("methods")
