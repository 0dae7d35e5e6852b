"""Sessions, and the samplers made in them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from tinsmith.storage.models import (
    CheckpointModel,
    RunModel,
    SamplerModel,
    SamplerRow,
    SessionModel,
    SessionRow,
    to_row,
)
from tinsmith.storage.queries.base import StoreBase, utcnow


class SessionQueries(StoreBase):
    def add_session(self, session_id: str, *, tags: list[str], user_metadata: dict[str, Any],
                    display_name: str | None = None, project_id: str | None = None,
                    sdk_version: str | None = None, owner: str | None = None) -> SessionRow:
        t = utcnow()
        obj = SessionModel(session_id=session_id, created_at=t, last_heartbeat_at=t,
                           tags=list(tags), user_metadata=dict(user_metadata),
                           display_name=display_name, project_id=project_id,
                           sdk_version=sdk_version, finished_at=None, finish_reason=None,
                           owner=owner)
        with self._tx(write=True) as s:
            s.add(obj)
        return to_row(SessionRow, obj)

    def heartbeat(self, session_id: str) -> bool:
        return self._update(SessionModel, session_id, last_heartbeat_at=utcnow())

    def finish_session(self, session_id: str, reason: str) -> None:
        self._update(SessionModel, session_id, finished_at=utcnow(), finish_reason=reason)

    def get_session(self, session_id: str) -> SessionRow | None:
        with self._tx() as s:
            obj = s.get(SessionModel, session_id)
            return None if obj is None else to_row(SessionRow, obj)

    def list_sessions(self, limit: int = 20, offset: int = 0,
                      owner: str | None = None) -> list[SessionRow]:
        """Newest first; with `owner`, only that owner's sessions (likewise list_runs and
        list_all_checkpoints)."""
        q = (select(SessionModel).order_by(SessionModel.created_at.desc())
             .limit(limit).offset(offset))
        if owner is not None:
            q = q.where(SessionModel.owner == owner)
        with self._tx() as s:
            return [to_row(SessionRow, o) for o in s.scalars(q)]

    def set_session_project(self, session_id: str, project_id: str) -> bool:
        """Move the session into `project_id` (its runs without a project of their own go
        with it); False if there is no such session."""
        return self._update(SessionModel, session_id, project_id=project_id)

    def scan_sessions(self, *, owners: Sequence[str | None] | None = None,
                      project_ids: Sequence[str | None] | None = None,
                      before: tuple[datetime, str] | None = None,
                      limit: int = 200) -> list[SessionRow]:
        """Sessions newest first (by created_at, then session_id, both descending), from
        just after `before` = (created_at, session_id) when given: a page of a keyset scan.
        `owners` / `project_ids`: only sessions whose owner / project is one of them (None
        in the list: none). The caller filters further what SQL cannot portably (JSON)."""
        q = select(SessionModel)
        if owners is not None:
            q = q.where(_one_of(SessionModel.owner, owners))
        if project_ids is not None:
            q = q.where(_one_of(SessionModel.project_id, project_ids))
        if before is not None:
            t, sid = before
            q = q.where(or_(SessionModel.created_at < t,
                            and_(SessionModel.created_at == t, SessionModel.session_id < sid)))
        q = q.order_by(SessionModel.created_at.desc(), SessionModel.session_id.desc()).limit(limit)
        with self._tx() as s:
            return [to_row(SessionRow, o) for o in s.scalars(q)]

    def session_checkpoints(self, session_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """{session id: (checkpoints, their bytes)} over the runs of each session (sessions
        without a checkpoint are left out). Bytes shared with a copy count in both."""
        if not session_ids:
            return {}
        q = (select(RunModel.session_id, func.count(CheckpointModel.id),
                    func.coalesce(func.sum(CheckpointModel.size_bytes), 0))
             .join(CheckpointModel, CheckpointModel.training_run_id == RunModel.training_run_id)
             .where(RunModel.session_id.in_(list(session_ids)))
             .group_by(RunModel.session_id))
        with self._tx() as s:
            return {sid: (int(n), int(size)) for sid, n, size in s.execute(q)}

    # --- samplers -------------------------------------------------------------------

    def add_sampler(self, sampler_id: str, *, session_id: str, base_model: str,
                    model_path: str | None = None, owner: str | None = None) -> SamplerRow:
        obj = SamplerModel(sampler_id=sampler_id, session_id=session_id, base_model=base_model,
                           model_path=model_path, created_at=utcnow(), owner=owner)
        with self._tx(write=True) as s:
            s.add(obj)
        return to_row(SamplerRow, obj)

    def get_sampler(self, sampler_id: str) -> SamplerRow | None:
        with self._tx() as s:
            obj = s.get(SamplerModel, sampler_id)
            return None if obj is None else to_row(SamplerRow, obj)

    def samplers_in_session(self, session_id: str) -> list[SamplerRow]:
        q = (select(SamplerModel).where(SamplerModel.session_id == session_id)
             .order_by(SamplerModel.created_at))
        with self._tx() as s:
            return [to_row(SamplerRow, o) for o in s.scalars(q)]

    def samplers_of_session(self, session_id: str) -> list[str]:
        q = (select(SamplerModel.sampler_id).where(SamplerModel.session_id == session_id)
             .order_by(SamplerModel.created_at))
        with self._tx() as s:
            return list(s.scalars(q))


def _one_of(column: ColumnElement[Any], values: Sequence[str | None]) -> ColumnElement[bool]:
    """`column` is one of `values`, where None in `values` stands for NULL."""
    named = [v for v in values if v is not None]
    match = column.in_(named) if named else None
    if len(named) < len(values):
        null = column.is_(None)
        return null if match is None else or_(match, null)
    return match if match is not None else column.in_([])
