"""Training runs.

A run's project is its own `project_id` if set (a copy's destination), else its session's:
assigning a session to a project moves its runs along (`project_of`, `list_runs`)."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.sql.elements import ColumnElement

from tinsmith.storage.models import RunModel, RunRow, SessionModel, to_row
from tinsmith.storage.queries.base import StoreBase, utcnow
from tinsmith.storage.touches import Touches

TOUCH_INTERVAL_S = 1.0  # how often touched runs' last_request_time is written, at most
_touches_made = threading.Lock()


class RunQueries(StoreBase):
    _touches: Touches | None = None  # made on the first touch_run

    def add_run(self, training_run_id: str, *, session_id: str, base_model: str,
                lora: dict[str, Any], user_metadata: dict[str, Any] | None = None,
                owner: str | None = None, optimizer: dict[str, Any] | None = None) -> RunRow:
        """`optimizer`: the run's optimizer config as the SDK sends it; None (NULL): AdamW."""
        t = utcnow()
        obj = RunModel(training_run_id=training_run_id, session_id=session_id,
                       base_model=base_model, lora=dict(lora),
                       user_metadata=None if user_metadata is None else dict(user_metadata),
                       created_at=t, last_request_time=t, owner=owner,
                       optimizer=None if optimizer is None else dict(optimizer))
        with self._tx(write=True) as s:
            s.add(obj)
        return to_row(RunRow, obj)

    def touch_run(self, training_run_id: str) -> None:
        """Mark the run used now: cheap, for the hot path (every optim_step). The row is
        written off the caller's thread within TOUCH_INTERVAL_S (tinsmith.storage.touches);
        this store's own reads of runs write pending touches first, so they see it at once."""
        touches = self._touches
        if touches is None:
            with _touches_made:
                if self._touches is None:
                    self._touches = Touches(self._write_touches, TOUCH_INTERVAL_S, "run-touches")
                touches = self._touches
        touches.touch(training_run_id, utcnow())

    def _write_touches(self, batch: dict[str, datetime]) -> None:
        with self._tx(write=True) as s:
            for run_id, at in batch.items():
                obj = s.get(RunModel, run_id)
                if obj is not None:  # an unknown run: nothing, as before
                    obj.last_request_time = at

    def _flush_touches(self) -> None:
        if self._touches is not None:
            self._touches.flush()

    def close(self) -> None:
        if self._touches is not None:
            self._touches.close()
        super().close()

    def get_run(self, training_run_id: str) -> RunRow | None:
        self._flush_touches()
        with self._tx() as s:
            obj = s.get(RunModel, training_run_id)
            return None if obj is None else to_row(RunRow, obj)

    def list_runs(self, limit: int = 20, offset: int = 0, owner: str | None = None,
                  project_id: str | None = None) -> tuple[list[RunRow], int]:
        """Newest first, and how many there are in all; with `project_id`, only the runs
        in that project (their own, else their session's)."""
        q = select(RunModel).order_by(RunModel.created_at.desc()).limit(limit).offset(offset)
        count = select(func.count()).select_from(RunModel)
        if project_id is not None:
            q = q.outerjoin(SessionModel, SessionModel.session_id == RunModel.session_id)
            count = count.outerjoin(SessionModel, SessionModel.session_id == RunModel.session_id)
            q, count = q.where(_project() == project_id), count.where(_project() == project_id)
        if owner is not None:
            q, count = q.where(RunModel.owner == owner), count.where(RunModel.owner == owner)
        self._flush_touches()
        with self._tx() as s:
            total = s.scalar(count) or 0
            return [to_row(RunRow, o) for o in s.scalars(q)], total

    def project_of(self, training_run_id: str) -> str | None:
        """The run's project: its own, else its session's; None if neither has one."""
        q = (select(_project()).select_from(RunModel)
             .outerjoin(SessionModel, SessionModel.session_id == RunModel.session_id)
             .where(RunModel.training_run_id == training_run_id))
        with self._tx() as s:
            return s.scalar(q)

    def runs_of_session(self, session_id: str) -> list[str]:
        q = (select(RunModel.training_run_id).where(RunModel.session_id == session_id)
             .order_by(RunModel.created_at))
        with self._tx() as s:
            return list(s.scalars(q))


def _project() -> ColumnElement[str | None]:
    """A run's project, in a query joining its session."""
    return func.coalesce(RunModel.project_id, SessionModel.project_id)
