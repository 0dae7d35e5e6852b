"""Sessions, and the samplers made in them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from tinsmith.storage.models import SamplerModel, SamplerRow, SessionModel, SessionRow, to_row
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

    def samplers_of_session(self, session_id: str) -> list[str]:
        q = (select(SamplerModel.sampler_id).where(SamplerModel.session_id == session_id)
             .order_by(SamplerModel.created_at))
        with self._tx() as s:
            return list(s.scalars(q))
