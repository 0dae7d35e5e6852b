"""Accounting: the audit log and hourly usage (tinsmith.scheduler.accounting).

- `audit_events`: one row per audited event (key created/revoked, session created/finished,
  run created, checkpoint saved/deleted/published/TTL changed, copy); `owner` is the API key
  whose log holds it, `details` what it records.
- `usage_hourly`: tokens trained, forward-only, prefilled and sampled, and checkpoints saved,
  per UTC hour, API key, base model and session; added to every few seconds.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_owner", "audit_events", ["owner"])
    op.create_table(
        "usage_hourly",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.Column("base_model", sa.String(length=255), nullable=False),
        sa.Column("session_id", sa.String(length=255), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_usage_hourly_bucket_start", "usage_hourly", ["bucket_start"])
    op.create_index("ix_usage_hourly_owner", "usage_hourly", ["owner"])


def downgrade() -> None:
    op.drop_table("usage_hourly")
    op.drop_table("audit_events")
