"""dataset idle timeout

``timeout_seconds`` bounds a call's whole time upstream (to the last byte
relayed); ``idle_timeout_seconds`` (``NULL``: the settings' default) bounds
the upstream's silence before its answer and between chunks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idle_timeout_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("idle_timeout_seconds")
