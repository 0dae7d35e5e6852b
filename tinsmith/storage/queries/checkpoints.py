"""Checkpoints' rows (their files are tinsmith.storage.files'), and the bytes an owner stores.

Several rows may share one storage key: a copy (copy_weights) references its source's files
instead of duplicating them. So a checkpoint's files may be deleted only once no row
references its key any more (`release_checkpoint`), and a copy is added only while its
source's row still exists (`add_copy` locks it).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tinsmith.storage.models import CheckpointModel, CheckpointRow, RunModel, to_row
from tinsmith.storage.queries.base import StoreBase, utcnow


def _select_one(training_run_id: str, checkpoint_id: str) -> Select[tuple[CheckpointModel]]:
    return select(CheckpointModel).where(CheckpointModel.training_run_id == training_run_id,
                                         CheckpointModel.checkpoint_id == checkpoint_id)


class CheckpointQueries(StoreBase):
    def upsert_checkpoint(self, training_run_id: str, checkpoint_id: str, *,
                          checkpoint_type: str, tinker_path: str, storage_key: str,
                          size_bytes: int, base_model: str, lora: dict[str, Any],
                          user_metadata: dict[str, Any] | None = None,
                          expires_at: datetime | None = None,
                          owner: str | None = None) -> CheckpointRow:
        """Insert, or replace the whole row (fresh created_at) if the key already exists."""
        if checkpoint_type not in ("training", "sampler", "external"):
            raise ValueError(f"checkpoint_type must be 'training', 'sampler' or 'external', "
                             f"not {checkpoint_type!r}")
        values = {"training_run_id": training_run_id, "checkpoint_id": checkpoint_id,
                  "checkpoint_type": checkpoint_type, "tinker_path": tinker_path,
                  "storage_key": storage_key, "size_bytes": size_bytes, "expires_at": expires_at,
                  "user_metadata": None if user_metadata is None else dict(user_metadata),
                  "base_model": base_model, "lora": dict(lora), "owner": owner}
        try:
            return self._replace_checkpoint(values)
        except IntegrityError:
            # A concurrent upsert of the same key won the race (only possible off SQLite,
            # where writers are serialized by BEGIN IMMEDIATE): replace its row in turn.
            return self._replace_checkpoint(values)

    def _replace_checkpoint(self, values: dict[str, Any]) -> CheckpointRow:
        obj = CheckpointModel(created_at=utcnow(), **values)
        same = or_(and_(CheckpointModel.training_run_id == obj.training_run_id,
                        CheckpointModel.checkpoint_id == obj.checkpoint_id),
                   CheckpointModel.tinker_path == obj.tinker_path)
        with self._tx(write=True) as s:
            for old in s.scalars(select(CheckpointModel).where(same)):
                s.delete(old)
            s.flush()  # the DELETEs must reach the database before the INSERT
            s.add(obj)
        return to_row(CheckpointRow, obj)

    def get_checkpoint(self, training_run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        with self._tx() as s:
            obj = s.scalars(_select_one(training_run_id, checkpoint_id)).first()
            return None if obj is None else to_row(CheckpointRow, obj)

    def get_checkpoint_by_path(self, tinker_path: str) -> CheckpointRow | None:
        with self._tx() as s:
            obj = s.scalars(select(CheckpointModel)
                            .where(CheckpointModel.tinker_path == tinker_path)).first()
            return None if obj is None else to_row(CheckpointRow, obj)

    def list_checkpoints(self, training_run_id: str) -> list[CheckpointRow]:
        q = (select(CheckpointModel).where(CheckpointModel.training_run_id == training_run_id)
             .order_by(CheckpointModel.created_at, CheckpointModel.id))
        with self._tx() as s:
            return [to_row(CheckpointRow, o) for o in s.scalars(q)]

    def list_all_checkpoints(self, limit: int = 100, offset: int = 0,
                             owner: str | None = None) -> tuple[list[CheckpointRow], int]:
        """Newest first, and how many there are in all."""
        q = (select(CheckpointModel)
             .order_by(CheckpointModel.created_at.desc(), CheckpointModel.id.desc())
             .limit(limit).offset(offset))
        count = select(func.count()).select_from(CheckpointModel)
        if owner is not None:
            q = q.where(CheckpointModel.owner == owner)
            count = count.where(CheckpointModel.owner == owner)
        with self._tx() as s:
            total = s.scalar(count) or 0
            return [to_row(CheckpointRow, o) for o in s.scalars(q)], total

    def _update_checkpoint(self, training_run_id: str, checkpoint_id: str,
                           change: Callable[[Session, CheckpointModel], None]) -> bool:
        """Apply `change` to the checkpoint's row in one write transaction; False if absent."""
        with self._tx(write=True) as s:
            obj = s.scalars(_select_one(training_run_id, checkpoint_id)).first()
            if obj is None:
                return False
            change(s, obj)
            return True

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> bool:
        return self._update_checkpoint(training_run_id, checkpoint_id, lambda s, o: s.delete(o))

    def release_checkpoint(self, training_run_id: str, checkpoint_id: str) -> str | None:
        """Delete the checkpoint's row. Returns its storage key if no other row (a copy, or
        the copy's source) references that key any more, so its files may go; else None
        (None too if there was no such row)."""
        with self._tx(write=True) as s:
            obj = s.scalars(_select_one(training_run_id, checkpoint_id)).first()
            if obj is None:
                return None
            key = obj.storage_key
            s.delete(obj)
            s.flush()  # the count below must not see this row
            # Runs after the DELETE: an add_copy that locked this row has committed by now.
            users = s.scalar(select(func.count()).select_from(CheckpointModel)
                             .where(CheckpointModel.storage_key == key)) or 0
            return None if users else key

    def storage_key_used(self, storage_key: str, excluding: tuple[str, str] | None = None) -> bool:
        """Whether any checkpoint row, other than `excluding` = (training_run_id,
        checkpoint_id), references `storage_key`."""
        q = select(CheckpointModel.id).where(CheckpointModel.storage_key == storage_key)
        if excluding is not None:
            q = q.where(or_(CheckpointModel.training_run_id != excluding[0],
                            CheckpointModel.checkpoint_id != excluding[1]))
        with self._tx() as s:
            return s.scalars(q.limit(1)).first() is not None

    def add_copy(self, source_run_id: str, source_checkpoint_id: str, *, training_run_id: str,
                 session_id: str, tinker_path: str, project_id: str | None,
                 expires_at: datetime | None, owner: str | None) -> CheckpointRow | None:
        """copy_weights, in one transaction: a new run `training_run_id` (copied_from the
        source's path, in `project_id`) holding one checkpoint at `tinker_path`, of the
        source's kind and name, that shares the source's storage key and keeps its
        metadata. The source row is locked meanwhile, so a concurrent delete of the source
        sees the copy when it counts who references the files. None if the source is gone."""
        with self._tx(write=True) as s:
            src = s.scalars(_select_one(source_run_id, source_checkpoint_id)
                            .with_for_update()).first()
            if src is None:
                return None
            source_run = s.get(RunModel, source_run_id)
            t = utcnow()
            s.add(RunModel(training_run_id=training_run_id, session_id=session_id,
                           base_model=src.base_model, lora=dict(src.lora),
                           user_metadata=source_run.user_metadata if source_run else None,
                           created_at=t, last_request_time=t, owner=owner,
                           project_id=project_id, copied_from=src.tinker_path))
            obj = CheckpointModel(
                training_run_id=training_run_id, checkpoint_id=src.checkpoint_id,
                checkpoint_type=src.checkpoint_type, tinker_path=tinker_path,
                storage_key=src.storage_key, size_bytes=src.size_bytes, created_at=t,
                expires_at=expires_at, user_metadata=src.user_metadata,
                base_model=src.base_model, lora=dict(src.lora), owner=owner, public=False)
            s.add(obj)
        return to_row(CheckpointRow, obj)

    def set_checkpoint_public(self, training_run_id: str, checkpoint_id: str,
                              public: bool) -> bool:
        return self._update_checkpoint(training_run_id, checkpoint_id,
                                       lambda _, o: setattr(o, "public", public))

    def has_public_checkpoint(self, training_run_id: str) -> bool:
        q = select(CheckpointModel.id).where(CheckpointModel.training_run_id == training_run_id,
                                             CheckpointModel.public.is_(True))
        with self._tx() as s:
            return s.scalars(q.limit(1)).first() is not None

    def set_checkpoint_expiry(self, training_run_id: str, checkpoint_id: str,
                              expires_at: datetime | None) -> bool:
        return self._update_checkpoint(training_run_id, checkpoint_id,
                                       lambda _, o: setattr(o, "expires_at", expires_at))

    def expired_checkpoints(self, now: datetime | None = None) -> list[CheckpointRow]:
        """Checkpoints whose expires_at is at or before ``now`` (default: the current time)."""
        q = (select(CheckpointModel)
             .where(CheckpointModel.expires_at.is_not(None),
                    CheckpointModel.expires_at <= (now or datetime.now(UTC)))
             .order_by(CheckpointModel.expires_at, CheckpointModel.id))
        with self._tx() as s:
            return [to_row(CheckpointRow, o) for o in s.scalars(q)]

    def last_checkpoint(self, training_run_id: str,
                        checkpoint_type: str) -> CheckpointRow | None:
        q = (select(CheckpointModel)
             .where(CheckpointModel.training_run_id == training_run_id,
                    CheckpointModel.checkpoint_type == checkpoint_type)
             .order_by(CheckpointModel.created_at.desc(), CheckpointModel.id.desc()).limit(1))
        with self._tx() as s:
            obj = s.scalars(q).first()
            return None if obj is None else to_row(CheckpointRow, obj)

    def stored_bytes(self, owner: str | None, excluding: tuple[str, str] | None = None) -> int:
        """Bytes of the checkpoints `owner` owns (None: those made while the server was open),
        less the checkpoint `excluding` = (training_run_id, checkpoint_id) if given."""
        q = select(func.coalesce(func.sum(CheckpointModel.size_bytes), 0)).where(
            CheckpointModel.owner.is_(None) if owner is None else CheckpointModel.owner == owner)
        if excluding is not None:
            q = q.where(or_(CheckpointModel.training_run_id != excluding[0],
                            CheckpointModel.checkpoint_id != excluding[1]))
        with self._tx() as s:
            return int(s.scalar(q) or 0)
