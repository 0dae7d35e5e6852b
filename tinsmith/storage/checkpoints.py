"""Operations that span the metadata store and the checkpoint files."""

from __future__ import annotations

from tinsmith.storage.db import CheckpointRow, MetadataStore
from tinsmith.storage.files import CheckpointStore


def remove_checkpoint(db: MetadataStore, store: CheckpointStore, row: CheckpointRow) -> None:
    """Unlist first, then delete the files (a listed checkpoint always has its files), but
    only once no other checkpoint references them: a copy (copy_weights) shares its
    source's files, so deleting (or expiring) either one leaves the other whole."""
    key = db.release_checkpoint(row.training_run_id, row.checkpoint_id)
    if key is not None:
        store.delete(key)
