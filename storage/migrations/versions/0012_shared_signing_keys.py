"""shared signing keys

The keys that sign access tokens are shared by every replica through the
database, so one rotation switches all of them: ``signing_keys.private_pem``
(PKCS#8 PEM, encrypted under the key passphrase when one is set) and
``signing_keys.activated_at``. Rows of a replica's own key file keep only the
public half, as before.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.db import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("signing_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("private_pem", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("activated_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("signing_keys", schema=None) as batch_op:
        batch_op.drop_column("activated_at")
        batch_op.drop_column("private_pem")
