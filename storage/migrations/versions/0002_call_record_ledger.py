"""call record ledger

The call record, its checkpoints, the writer's position and the checkpoint
keys. ``calls`` is append-only: triggers refuse UPDATE and DELETE on both
backends (someone who drops them is what ``pdg audit verify`` is for).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("call_id", sa.String(length=36), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("app_id", sa.String(length=64), nullable=False),
        sa.Column("licensee_id", sa.String(length=64), nullable=False),
        sa.Column("licence_id", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=2048), nullable=False),
        sa.Column("query_digest", sa.String(length=64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("problem", sa.String(length=40), nullable=True),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("latency_us", sa.BigInteger(), nullable=False),
        sa.Column("pool", sa.String(length=16), nullable=True),
        sa.Column("period", sa.String(length=7), nullable=False),
        sa.Column("charge_e4", sa.BigInteger(), nullable=False),
        sa.Column("client_address", sa.String(length=64), nullable=False),
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("response_digest", sa.String(length=64), nullable=True),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_calls")),
        sa.UniqueConstraint("call_id", name=op.f("uq_calls_call_id")),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index("ix_calls_dataset_seq", ["dataset_id", "seq"], unique=False)
        batch_op.create_index("ix_calls_licensee_seq", ["licensee_id", "seq"], unique=False)
        batch_op.create_index("ix_calls_period_licensee", ["period", "licensee_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_calls_request_id"), ["request_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_calls_time"), ["time"], unique=False)

    _append_only()
    op.create_table(
        "ledger_checkpoints",
        sa.Column("first_seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("chain_head", sa.String(length=64), nullable=False),
        sa.Column("merkle_root", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("first_seq", name=op.f("pk_ledger_checkpoints")),
        sa.UniqueConstraint("last_seq", name=op.f("uq_ledger_checkpoints_last_seq")),
    )
    op.create_table(
        "ledger_keys",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("public_pem", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_ledger_keys")),
    )
    op.create_table(
        "ledger_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("next_seq", sa.BigInteger(), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.Column("algorithm", sa.String(length=16), nullable=False),
        sa.Column("log_position", sa.String(length=64), nullable=False),
        sa.Column("checkpointed_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_state")),
    )


def _append_only() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION pdg_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'call records are append-only (% on %)', TG_OP, TG_TABLE_NAME; END $$"
        )
        op.execute(
            "CREATE TRIGGER calls_append_only BEFORE UPDATE OR DELETE ON calls "
            "FOR EACH ROW EXECUTE FUNCTION pdg_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER calls_no_{action.lower()} BEFORE {action} ON calls "
            "BEGIN SELECT RAISE(ABORT, 'call records are append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS calls_append_only ON calls")
        op.execute("DROP FUNCTION IF EXISTS pdg_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS calls_no_update")
        op.execute("DROP TRIGGER IF EXISTS calls_no_delete")
    op.drop_table("ledger_state")
    op.drop_table("ledger_keys")
    op.drop_table("ledger_checkpoints")
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calls_time"))
        batch_op.drop_index(batch_op.f("ix_calls_request_id"))
        batch_op.drop_index("ix_calls_period_licensee")
        batch_op.drop_index("ix_calls_licensee_seq")
        batch_op.drop_index("ix_calls_dataset_seq")

    op.drop_table("calls")
