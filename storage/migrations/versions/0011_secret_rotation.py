"""secret rotation and admin token expiry

An app's secret rotates with an overlap: the previous secret's hash stays
valid until ``apps.previous_secret_until``. An admin token may expire
(``admin_tokens.expires_at``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.db import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_secret_hash", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_until", UTCDateTime(), nullable=True))
    with op.batch_alter_table("admin_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("admin_tokens", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_secret_hash")
