"""API keys: the `api_keys` table, and an `owner` column (the key id that made the row)
on sessions, training runs, checkpoints and samplers.

Rows that existed before keep owner NULL: only admin keys see them
(tinsmith/scheduler/access.py).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_OWNED = ("checkpoints", "samplers", "sessions", "training_runs")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("hint", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
        sa.UniqueConstraint("key_hash"),
    )
    for table in _OWNED:
        # A nullable column is a plain ALTER TABLE ADD COLUMN even on SQLite; batch mode
        # would copy the table only for operations SQLite cannot do in place.
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
            batch_op.create_index(f"ix_{table}_owner", ["owner"])


def downgrade() -> None:
    for table in _OWNED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_index(f"ix_{table}_owner")
            batch_op.drop_column("owner")
    op.drop_table("api_keys")
