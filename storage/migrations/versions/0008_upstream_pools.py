"""upstream pools

A dataset may name several upstream targets with weights, health checks and
a breaker (``datasets.upstream_pool``), and how its upstream's TLS is met
(``datasets.upstream_tls``); every call record names the target that
answered (``calls.upstream_target``, null in the records before, which hash
as they were written).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream_pool", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("upstream_tls", sa.JSON(), nullable=True))
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream_target", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_column("upstream_target")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("upstream_tls")
        batch_op.drop_column("upstream_pool")
