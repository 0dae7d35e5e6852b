"""Checkpoints: their files, time to live, deletion, and the sweeper of expired ones."""

from __future__ import annotations

from datetime import timedelta

from tinsmith.scheduler.access import Caller
from tinsmith.scheduler.core import MAX_TTL_S, ServiceCore, _now, log
from tinsmith.scheduler.paths import CheckpointRef, ref_from_checkpoint_id
from tinsmith.storage.checkpoints import remove_checkpoint
from tinsmith.types import NotFound, UserError


class CheckpointOps(ServiceCore):
    def set_checkpoint_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: int | None,
                           caller: Caller | None = None) -> None:
        """Expire the checkpoint `ttl_seconds` from now (None: never)."""
        row = self.checkpoint(ref_from_checkpoint_id(run_id, checkpoint_id), caller)
        if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_S:
            raise UserError(f"ttl_seconds must be between 1 and {MAX_TTL_S}, got {ttl_seconds}")
        expires = _now() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        self.db.set_checkpoint_expiry(row.training_run_id, row.checkpoint_id, expires)

    def checkpoint_files(self, ref: CheckpointRef, caller: Caller | None = None) -> dict[str, bytes]:
        """Every file of a checkpoint the caller may see."""
        row = self.checkpoint(ref, caller)
        try:
            return self.store.get(row.storage_key)
        except FileNotFoundError as e:  # deleted (or expired) since the row was read
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist") from e

    def checkpoint_file_sizes(self, ref: CheckpointRef, caller: Caller | None = None) -> dict[str, int]:
        """{file name: size} of a checkpoint the caller may see."""
        row = self.checkpoint(ref, caller)
        try:
            return self.store.sizes(row.storage_key)
        except FileNotFoundError as e:
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist") from e

    def read_checkpoint_file(self, ref: CheckpointRef, name: str) -> bytes:
        """One file of a checkpoint (the caller's right to it was checked when signing)."""
        row = self.checkpoint(ref)
        try:
            return self.store.read(row.storage_key, name)
        except (FileNotFoundError, ValueError) as e:
            raise NotFound(f"checkpoint {ref.tinker_path} has no file {name!r}") from e

    def delete_checkpoint(self, run_id: str, checkpoint_id: str, caller: Caller | None = None) -> None:
        ref = ref_from_checkpoint_id(run_id, checkpoint_id)
        remove_checkpoint(self.db, self.store, self.checkpoint(ref, caller))

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.checkpoint_sweep_s):
            try:
                for row in self.db.expired_checkpoints(_now()):
                    remove_checkpoint(self.db, self.store, row)
            except Exception:
                log.exception("checkpoint sweep failed")
