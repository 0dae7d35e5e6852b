"""Usage: hourly sums of tokens and checkpoints per API key, base model and session
(tinsmith.scheduler.accounting.UsageMeter adds to them every few seconds), and the stored
bytes of live checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update

from tinsmith.storage.models import (
    CheckpointModel,
    RunModel,
    SessionModel,
    UsageModel,
    UsageRow,
    to_row,
)
from tinsmith.storage.queries.base import StoreBase


@dataclass(frozen=True)
class UsageKey:
    """What one usage_hourly row sums over."""

    bucket_start: datetime  # a UTC hour
    owner: str | None  # API key id; None: used while the server was open
    base_model: str
    session_id: str | None
    kind: str  # tinsmith.scheduler.accounting.KINDS


@dataclass(frozen=True)
class StoredUsage:
    """Live checkpoints of one project and API key."""

    project_id: str | None
    owner: str | None
    checkpoint_count: int
    size_bytes: int


def _is(column: object, value: object) -> object:
    """`column = value`, or IS NULL for None (NULLs never compare equal)."""
    return column.is_(None) if value is None else column == value  # type: ignore[attr-defined]


class UsageQueries(StoreBase):
    def add_usage(self, amounts: Mapping[UsageKey, int]) -> None:
        """Add `amounts` to their hourly rows (made if missing), in one transaction. One
        writer per server (its flusher thread), so update-else-insert cannot race itself."""
        if not amounts:
            return
        with self._tx(write=True) as s:
            for k, n in amounts.items():
                where = and_(UsageModel.bucket_start == k.bucket_start,
                             _is(UsageModel.owner, k.owner),
                             UsageModel.base_model == k.base_model,
                             _is(UsageModel.session_id, k.session_id), UsageModel.kind == k.kind)
                done = s.execute(update(UsageModel).where(where)
                                 .values(quantity=UsageModel.quantity + n))
                if done.rowcount == 0:  # type: ignore[attr-defined]
                    s.add(UsageModel(bucket_start=k.bucket_start, owner=k.owner,
                                     base_model=k.base_model, session_id=k.session_id,
                                     kind=k.kind, quantity=n))
                    s.flush()

    def usage(self, start: datetime, end: datetime, owner: str | None = None) -> list[UsageRow]:
        """Hourly rows whose hour overlaps [start, end), by hour then largest first; only
        `owner`'s unless None (all)."""
        q = select(UsageModel).where(UsageModel.bucket_start >= _hour(start),
                                     UsageModel.bucket_start < end)
        if owner is not None:
            q = q.where(UsageModel.owner == owner)
        q = q.order_by(UsageModel.bucket_start, UsageModel.quantity.desc(), UsageModel.id)
        with self._tx() as s:
            return [to_row(UsageRow, o) for o in s.scalars(q)]

    def session_projects(self, session_ids: list[str]
                         ) -> dict[str, tuple[str | None, dict[str, object]]]:
        """{session id: (project_id, user_metadata)} of these sessions (those that exist)."""
        if not session_ids:
            return {}
        q = select(SessionModel.session_id, SessionModel.project_id, SessionModel.user_metadata
                   ).where(SessionModel.session_id.in_(session_ids))
        with self._tx() as s:
            return {sid: (project, dict(md or {})) for sid, project, md in s.execute(q)}

    def stored_usage(self, now: datetime, owner: str | None = None,
                     project_id: str | None = None) -> list[StoredUsage]:
        """Live (unexpired) checkpoints grouped by project and API key; only `owner`'s unless
        None (all); only `project_id`'s if given. A checkpoint's project is its run's, else
        its run's session's."""
        project = func.coalesce(RunModel.project_id, SessionModel.project_id)
        q = (select(project, CheckpointModel.owner, func.count(CheckpointModel.id),
                    func.coalesce(func.sum(CheckpointModel.size_bytes), 0))
             .select_from(CheckpointModel)
             .outerjoin(RunModel, RunModel.training_run_id == CheckpointModel.training_run_id)
             .outerjoin(SessionModel, SessionModel.session_id == RunModel.session_id)
             .where(or_(CheckpointModel.expires_at.is_(None), CheckpointModel.expires_at > now))
             .group_by(project, CheckpointModel.owner)
             .order_by(project, CheckpointModel.owner))
        if owner is not None:
            q = q.where(CheckpointModel.owner == owner)
        if project_id is not None:
            q = q.where(project == project_id)
        with self._tx() as s:
            return [StoredUsage(p, o, int(c), int(b)) for p, o, c, b in s.execute(q)]


def _hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)
