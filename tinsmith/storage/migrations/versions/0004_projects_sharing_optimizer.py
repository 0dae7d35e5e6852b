"""Projects, sharing and the optimizer family of a run.

- `training_runs.project_id`: the project a run belongs to (NULL: its session's project, which
  may be none). A copy made by `copy_weights` belongs to its destination project.
- `training_runs.copied_from`: the tinker path a copied run was made from (NULL for a run that
  was trained); such a run holds checkpoints but cannot be trained.
- `training_runs.optimizer`: the optimizer config fixed at the run's creation, as the SDK sent
  it (`{"type": "dimuon", "version": 1}`); NULL for AdamW, the default, so older runs are AdamW.
- `checkpoints.public`: published, so any API key may read and load it.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.add_column(sa.Column("project_id", sa.String(255), nullable=True))
        batch_op.add_column(sa.Column("copied_from", sa.String(1024), nullable=True))
        batch_op.add_column(sa.Column("optimizer", sa.JSON(), nullable=True))
        batch_op.create_index("ix_training_runs_project_id", ["project_id"])
    with op.batch_alter_table("checkpoints") as batch_op:
        batch_op.add_column(sa.Column("public", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch_op:
        batch_op.drop_column("public")
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.drop_index("ix_training_runs_project_id")
        for column in ("optimizer", "copied_from", "project_id"):
            batch_op.drop_column(column)
