"""Operations that span the metadata store and the checkpoint files."""

from __future__ import annotations

from tinsmith.storage.db import CheckpointRow, MetadataStore
from tinsmith.storage.files import CheckpointStore


def remove_checkpoint(db: MetadataStore, store: CheckpointStore, row: CheckpointRow) -> None:
    """Unlist first, then delete the files: a listed checkpoint always has its files."""
    db.delete_checkpoint(row.training_run_id, row.checkpoint_id)
    store.delete(row.storage_key)
