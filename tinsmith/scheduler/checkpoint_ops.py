"""Checkpoints: their files, time to live, deletion, publishing, copies, and the sweeper of
expired ones.

Publishing (`set_published`) makes a checkpoint readable and loadable by every API key
(tinsmith.scheduler.access.sees); only its owner (or an admin) may publish, unpublish,
delete it or change its TTL. A run holding a published checkpoint can be read by every
key too, showing only its published checkpoints.

A copy (`copy_weights`) is a new training run holding one checkpoint that shares its
source's stored files: no bytes are duplicated, the files go only when the last checkpoint
referencing them does (tinsmith.storage.checkpoints.remove_checkpoint), and a save that
would write over shared files writes to a fresh storage key instead (`write_key`). The
copied run cannot be trained (tinsmith.scheduler.core.ServiceCore.run says why).
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from datetime import timedelta
from functools import cached_property

from tinsmith.scheduler import paths
from tinsmith.scheduler.access import Caller, owned, owns
from tinsmith.scheduler.core import MAX_TTL_S, ServiceCore, _now, log
from tinsmith.scheduler.paths import CheckpointRef, parse_path, ref_from_checkpoint_id
from tinsmith.storage.checkpoints import remove_checkpoint
from tinsmith.storage.db import CheckpointRow, MetadataStore, RunRow
from tinsmith.types import NotFound, UserError

_COPIES_REMEMBERED = 4096  # idempotency keys of copies kept for the SDK's retries


def write_key(db: MetadataStore, ref: CheckpointRef) -> str:
    """Where a save of `ref` writes its files: over the key its current row uses (or the
    ref's own key), unless another checkpoint (a copy, or a copy's source) references that
    key; then a fresh key, so the other keeps its files."""
    current = db.get_checkpoint(ref.run_id, ref.checkpoint_id)
    key = current.storage_key if current is not None else ref.storage_key
    if db.storage_key_used(key, excluding=(ref.run_id, ref.checkpoint_id)):
        key = f"{ref.storage_key}@{uuid.uuid4().hex[:12]}"
    return key


def check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_S:
        raise UserError(f"ttl_seconds must be between 1 and {MAX_TTL_S}, got {ttl_seconds}")


class CheckpointOps(ServiceCore):
    def _owned_checkpoint(self, run_id: str, checkpoint_id: str, caller: Caller | None,
                          action: str) -> CheckpointRow:
        ref = ref_from_checkpoint_id(run_id, checkpoint_id)
        return owned(self.db.get_checkpoint(ref.run_id, ref.checkpoint_id), caller,
                     f"checkpoint {ref.tinker_path}", action)

    def set_checkpoint_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: int | None,
                           caller: Caller | None = None) -> None:
        """Expire the checkpoint `ttl_seconds` from now (None: never)."""
        row = self._owned_checkpoint(run_id, checkpoint_id, caller, "change its TTL")
        check_ttl(ttl_seconds)
        expires = _now() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        self.db.set_checkpoint_expiry(row.training_run_id, row.checkpoint_id, expires)
        self.accounting.record_checkpoint("checkpoint_ttl_set", caller, row, ttl_seconds=ttl_seconds)

    def set_published(self, run_id: str, checkpoint_id: str, public: bool,
                      caller: Caller | None = None) -> None:
        """Publish (or unpublish) a checkpoint of the caller's."""
        row = self._owned_checkpoint(run_id, checkpoint_id, caller,
                                     "publish or unpublish it")
        self.db.set_checkpoint_public(row.training_run_id, row.checkpoint_id, public)
        self.accounting.record_checkpoint(f"checkpoint_{'' if public else 'un'}published", caller, row)

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
        remove_checkpoint(self.db, self.store,
                          self._owned_checkpoint(run_id, checkpoint_id, caller, "delete it"))
        self.accounting.record("checkpoint_deleted", caller, model_id=run_id,
                               checkpoint_id=checkpoint_id)

    # ----- runs as others see them: through their published checkpoints ------------------
    def shared_run(self, run_id: str, caller: Caller) -> tuple[RunRow, bool]:
        """A training run the caller owns, or one holding a checkpoint published by another
        key; and whether the caller owns it (else it sees only the published checkpoints)."""
        row = self.db.get_run(run_id)
        if row is not None and owns(caller, row):
            return row, True
        if row is None or not self.db.has_public_checkpoint(run_id):
            raise NotFound(f"unknown training run {run_id!r}")
        return row, False

    def run_checkpoints(self, run_id: str, caller: Caller) -> list[CheckpointRow]:
        """A run's checkpoints, oldest first: all of them for its owner, the published ones
        for anyone else."""
        _, mine = self.shared_run(run_id, caller)
        rows = self.db.list_checkpoints(run_id)
        return rows if mine else [r for r in rows if r.public]

    def latest_checkpoints(self, run_id: str, caller: Caller | None = None
                           ) -> tuple[CheckpointRow | None, CheckpointRow | None]:
        """A run's newest training and sampler checkpoints the caller sees (None: the
        server, which sees all)."""
        if caller is None or owns(caller, self.db.get_run(run_id)):
            return (self.db.last_checkpoint(run_id, "training"),
                    self.db.last_checkpoint(run_id, "sampler"))
        rows = self.run_checkpoints(run_id, caller)
        newest = {r.checkpoint_type: r for r in rows}  # oldest first: the last one wins
        return newest.get("training"), newest.get("sampler")

    # ----- copies ---------------------------------------------------------------------------
    def copy_weights(self, source_path: str, *, destination_project_id: str | None,
                     session_id: str | None = None, model_seq_id: int | None = None,
                     ttl_seconds: int | None = None, idempotency_key: str | None = None,
                     caller: Caller) -> str:
        """Copy a checkpoint the caller may see into a new training run of its own, which
        cannot be trained. The run is `<session_id>:train:<model_seq_id>` in the caller's
        session when given, else in a new session of the destination project. Returns the
        copy's tinker path; a retry with the same `idempotency_key` gets the same one."""
        ref = parse_path(source_path)
        check_ttl(ttl_seconds)
        if destination_project_id is not None and not destination_project_id.strip():
            raise UserError("destination_project_id must not be empty")
        if session_id is None and destination_project_id is None:
            raise UserError("copy_weights needs destination_project_id, or session_id and "
                            "model_seq_id")
        if (session_id is None) != (model_seq_id is None):
            raise UserError("copy_weights needs both session_id and model_seq_id, or neither")
        remembered = (caller.owner, idempotency_key or "")
        if idempotency_key:
            with self._copies_lock:
                done = self._copies.get(remembered)
            if done is not None:
                return done
        source = self.checkpoint(ref, caller)  # readable: the caller's own, or published
        if session_id is not None and model_seq_id is not None:
            self.session(session_id, caller)
            run_id = paths.run_id(session_id, model_seq_id)
            if run_id in self.runs or self.db.get_run(run_id) is not None:
                raise UserError(f"training run {run_id!r} already exists; copy into an "
                                "unused model_seq_id")
        else:
            session_id = self.create_session(
                tags=["copy_weights"], user_metadata={"copied_from": source_path},
                display_name=f"copy of {source_path}", project_id=destination_project_id,
                sdk_version=None, caller=caller)
            run_id = paths.run_id(session_id, 0)
        copy = CheckpointRef(run_id, ref.kind, ref.name)
        row = self.db.add_copy(
            source.training_run_id, source.checkpoint_id, training_run_id=run_id,
            session_id=session_id, tinker_path=copy.tinker_path,
            project_id=destination_project_id,
            expires_at=_now() + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
            owner=caller.owner)
        if row is None:  # deleted since it was read
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
        if idempotency_key:
            with self._copies_lock:
                self._copies[remembered] = row.tinker_path
                while len(self._copies) > _COPIES_REMEMBERED:
                    self._copies.popitem(last=False)
        self.accounting.record_checkpoint("checkpoint_copied", caller, row, source=source_path)
        return row.tinker_path

    @cached_property
    def _copies(self) -> OrderedDict[tuple[str | None, str], str]:
        """(owner, idempotency key) -> the path of the copy it made, newest last."""
        return OrderedDict()

    @cached_property
    def _copies_lock(self) -> threading.Lock:
        return threading.Lock()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.checkpoint_sweep_s):
            try:
                for row in self.db.expired_checkpoints(_now()):
                    remove_checkpoint(self.db, self.store, row)
                    self.accounting.record_checkpoint("checkpoint_expired", None, row)
            except Exception:  # noqa: BLE001 (the sweeper must outlive any one failure)
                log.exception("checkpoint sweep failed")
