"""The audit log (tinsmith.scheduler.accounting.AuditLog buffers entries and writes them here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select

from tinsmith.storage.models import AuditEventModel, AuditEventRow, to_row
from tinsmith.storage.queries.base import StoreBase, utcnow


@dataclass(frozen=True)
class AuditEntry:
    """An entry not yet written: when, what, whose log it goes to, what it records."""

    at: datetime
    event: str
    owner: str | None
    details: dict[str, Any]

    def model(self) -> AuditEventModel:
        return AuditEventModel(at=self.at, event=self.event, owner=self.owner,
                               details=dict(self.details))


def audit_model(event: str, owner: str | None, **details: Any) -> AuditEventModel:
    """An entry stamped now, for a query that writes it in its own transaction (keys.py)."""
    return AuditEntry(utcnow(), event, owner, details).model()


class AuditQueries(StoreBase):
    def add_audit_entries(self, entries: Sequence[AuditEntry]) -> None:
        """Write buffered entries, all in one transaction."""
        if not entries:
            return
        with self._tx(write=True) as s:
            s.add_all([e.model() for e in entries])

    def audit_entries(self, start: datetime, end: datetime, *, owner: str | None = None,
                      prefixes: Sequence[str] | None = None,
                      limit: int = 10_000) -> list[AuditEventRow]:
        """Entries with `start <= at < end`, oldest first; only `owner`'s unless None (all);
        only events starting with one of `prefixes` unless None."""
        if prefixes is not None and not prefixes:
            return []
        q = select(AuditEventModel).where(AuditEventModel.at >= start, AuditEventModel.at < end)
        if owner is not None:
            q = q.where(AuditEventModel.owner == owner)
        if prefixes is not None:
            q = q.where(or_(*[AuditEventModel.event.startswith(p) for p in prefixes]))
        q = q.order_by(AuditEventModel.at, AuditEventModel.id).limit(limit)
        with self._tx() as s:
            return [to_row(AuditEventRow, o) for o in s.scalars(q)]
