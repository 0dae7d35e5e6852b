"""Sessions beyond their creation: projects, search, and trace export.

A project is a free-form label (there is no project table, nor anything to create first):
a session carries one (`create_session`'s project_id, or `assign_session_project`), and a
training run belongs to its own project if it has one (a copy's destination), else to its
session's. Moving a session therefore moves its runs along.

Search (`search_sessions`) pages through the sessions a caller may see (its own; an
admin's: all), newest first, with the SDK's filters; what SQL cannot filter portably (JSON
metadata, words of a display name, status) is filtered here, page by page.

A session's status is worked out when read: "client_finished" once its client finished
it, "active" while its heartbeats arrive, else none (it went quiet without finishing:
nothing says whether it failed). The server records no failed or cancelled sessions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tinsmith.scheduler.access import Caller
from tinsmith.scheduler.core import ServiceCore
from tinsmith.scheduler.trace import session_trace
from tinsmith.storage.db import RunRow, SessionRow
from tinsmith.types import UserError

LIVE_HEARTBEAT_S = 30.0
"""A session whose last heartbeat is younger is active: three of the SDK's 10 s heartbeats,
as the dashboard's `session_status` counts."""
FINISH_REASONS = ("success", "errored", "interrupted")
_SCAN_PAGE = 200


@dataclass(frozen=True)
class StatusQuery:
    """One status a search matches: "active", "cancelled", "failed" or "client_finished"
    (with `reasons`, only those finish reasons)."""

    type: str
    reasons: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SessionSearch:
    """The SDK's SessionSearchRequest, as plain values. `owner`: "own", "accessible" or
    "user" (then `owner_ids`: the API key ids to match, "local" for what was made while the
    server was open). `project_ids`: "" stands for no project."""

    session_id: str | None = None
    display_name: str | None = None
    project_ids: Sequence[str] | None = None
    user_metadata: Mapping[str, str] = field(default_factory=dict)
    owner: str = "own"
    owner_ids: Sequence[str] = ()
    statuses: Sequence[StatusQuery] | None = None
    limit: int = 50
    after: tuple[datetime, str] | None = None  # the previous page's last (created_at, id)


@dataclass(frozen=True)
class SessionHit:
    row: SessionRow
    status: dict[str, object] | None  # the SDK's SessionStatus, as JSON
    checkpoints: int
    checkpoint_bytes: int


def session_status(row: SessionRow, now: datetime) -> dict[str, object] | None:
    if row.finished_at is not None:
        reason = row.finish_reason if row.finish_reason in FINISH_REASONS else "success"
        return {"type": "client_finished", "reason": {"type": reason}}
    if now - row.last_heartbeat_at <= timedelta(seconds=LIVE_HEARTBEAT_S):
        return {"type": "active"}
    return None


def _status_matches(status: dict[str, object] | None, wanted: Sequence[StatusQuery]) -> bool:
    if status is None:
        return False
    for q in wanted:
        if q.type != status["type"]:
            continue
        reason = status.get("reason")
        if q.reasons is None or (isinstance(reason, dict) and reason.get("type") in q.reasons):
            return True
    return False


def _text_matches(row: SessionRow, q: SessionSearch) -> bool:
    """session_id and display_name: either one matches; neither given: every session."""
    if q.session_id is None and q.display_name is None:
        return True
    if q.session_id is not None and row.session_id == q.session_id:
        return True
    if q.display_name is not None and row.display_name:
        name = row.display_name.casefold()
        return all(word in name for word in q.display_name.casefold().split())
    return False


def _metadata_matches(row: SessionRow, wanted: Mapping[str, str]) -> bool:
    have = row.user_metadata or {}
    return all(k in have and str(have[k]) == v for k, v in wanted.items())


class SessionOps(ServiceCore):
    def assign_session_project(self, session_id: str, project_id: str, caller: Caller) -> None:
        """Move one of the caller's sessions, and its runs without a project of their own,
        into `project_id`."""
        if not project_id or not project_id.strip():
            raise UserError("project_id is required: the project to move the session into")
        if len(project_id) > 255:
            raise UserError("project_id is longer than 255 characters")
        self.session(session_id, caller)
        self.db.set_session_project(session_id, project_id)

    def list_runs_in(self, caller: Caller, limit: int, offset: int,
                     project_id: str | None = None) -> tuple[list[RunRow], int]:
        """The caller's runs (an admin's: all), newest first, and how many; with
        `project_id`, only those in that project."""
        return self.db.list_runs(limit, offset, owner=caller.listing_owner, project_id=project_id)

    def _search_owners(self, caller: Caller, q: SessionSearch) -> list[str | None] | None:
        """The owners a search may match (None: any): never beyond what the caller sees."""
        if q.owner == "own":
            return [caller.key_id]
        if q.owner == "accessible":
            return None if caller.admin else [caller.key_id]
        if q.owner == "user":
            ids: list[str | None] = [None if i == "local" else i for i in q.owner_ids]
            return ids if caller.admin else [i for i in ids if i == caller.key_id]
        raise UserError(f"unknown search owner type {q.owner!r}: use own, accessible or user")

    def search_sessions(self, caller: Caller, q: SessionSearch
                        ) -> tuple[list[SessionHit], tuple[datetime, str] | None]:
        """One page of the sessions matching `q`, newest first, and where the next page
        starts (None: this is the last)."""
        if not 1 <= q.limit <= 200:
            raise UserError(f"limit must be between 1 and 200, got {q.limit}")
        owners = self._search_owners(caller, q)
        projects = None if q.project_ids is None else [p or None for p in q.project_ids]
        now = datetime.now(UTC)
        found: list[tuple[SessionRow, dict[str, object] | None]] = []
        after = q.after
        while len(found) <= q.limit:
            rows = self.db.scan_sessions(owners=owners, project_ids=projects, before=after,
                                         limit=_SCAN_PAGE)
            for row in rows:
                status = session_status(row, now)
                if (_text_matches(row, q) and _metadata_matches(row, q.user_metadata)
                        and (q.statuses is None or _status_matches(status, q.statuses))):
                    found.append((row, status))
            if len(rows) < _SCAN_PAGE:
                break
            after = (rows[-1].created_at, rows[-1].session_id)
        page = found[: q.limit]
        stats = self.db.session_checkpoints([row.session_id for row, _ in page])
        hits = [SessionHit(row, status, *stats.get(row.session_id, (0, 0)))
                for row, status in page]
        last = page[-1][0] if len(found) > q.limit else None
        return hits, None if last is None else (last.created_at, last.session_id)

    def session_trace(self, session_id: str, caller: Caller | None = None) -> dict[str, object]:
        """The session's timeline as a Chrome trace-event JSON object (Perfetto opens it)."""
        session = self.session(session_id, caller)
        runs = [self.db.get_run(r) for r in self.db.runs_of_session(session_id)]
        return session_trace(
            session,
            [(run, self.db.list_checkpoints(run.training_run_id),
              self.history.points(run.training_run_id)[0]) for run in runs if run is not None],
            self.db.samplers_in_session(session_id))
