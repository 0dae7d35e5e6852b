"""Initial schema: sessions, training runs, checkpoints and samplers.

Exactly what `create_all` made before migrations existed (up to commit 7861ef9), so such a
database is stamped with this revision and upgraded from here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# The models' UTCDateTime stores through this type (naive UTC on SQLite).
_UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("training_run_id", sa.String(length=255), nullable=False),
        sa.Column("checkpoint_id", sa.String(length=255), nullable=False),
        sa.Column("checkpoint_type", sa.String(length=16), nullable=False),
        sa.Column("tinker_path", sa.String(length=1024), nullable=False),
        sa.Column("storage_key", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _UTC, nullable=False),
        sa.Column("expires_at", _UTC, nullable=True),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("base_model", sa.String(length=255), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        # Unnamed, as create_all made them (PostgreSQL names them <table>_<cols>_key).
        sa.UniqueConstraint("tinker_path"),
        sa.UniqueConstraint("training_run_id", "checkpoint_id"),
    )
    op.create_index("ix_checkpoints_created_at", "checkpoints", ["created_at"])
    op.create_index("ix_checkpoints_expires_at", "checkpoints", ["expires_at"])
    op.create_index("ix_checkpoints_training_run_id", "checkpoints", ["training_run_id"])

    op.create_table(
        "samplers",
        sa.Column("sampler_id", sa.String(length=255), nullable=False),
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("base_model", sa.String(length=255), nullable=False),
        sa.Column("model_path", sa.String(length=1024), nullable=True),
        sa.Column("created_at", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("sampler_id"),
    )
    op.create_index("ix_samplers_session_id", "samplers", ["session_id"])

    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("created_at", _UTC, nullable=False),
        sa.Column("last_heartbeat_at", _UTC, nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=False),
        sa.Column("display_name", sa.String(length=1024), nullable=True),
        sa.Column("project_id", sa.String(length=255), nullable=True),
        sa.Column("sdk_version", sa.String(length=64), nullable=True),
        sa.Column("finished_at", _UTC, nullable=True),
        sa.Column("finish_reason", sa.String(length=1024), nullable=True),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_sessions_created_at", "sessions", ["created_at"])

    op.create_table(
        "training_runs",
        sa.Column("training_run_id", sa.String(length=255), nullable=False),
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("base_model", sa.String(length=255), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", _UTC, nullable=False),
        sa.Column("last_request_time", _UTC, nullable=False),
        sa.PrimaryKeyConstraint("training_run_id"),
    )
    op.create_index("ix_training_runs_created_at", "training_runs", ["created_at"])
    op.create_index("ix_training_runs_session_id", "training_runs", ["session_id"])


def downgrade() -> None:
    for table in ("training_runs", "sessions", "samplers", "checkpoints"):
        op.drop_table(table)  # its indexes go with it
