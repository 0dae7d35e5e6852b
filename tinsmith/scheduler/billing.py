"""Reports over what accounting wrote, in the SDK's wire shapes (tinker.types): the audit
log (AuditLogResponse), usage with its cost (BillingUsageResponse) and the checkpoints
stored now (CurrentCheckpointStorageUsageResponse).

A key that is not an admin sees its own entries, usage and checkpoints; an admin key (or
anyone on an open server) sees every key's. Each report writes what accounting gathered in
memory first, so it includes everything finished before it was asked for. Costs are the
usage at the server's prices now (`ServerSettings.prices`), not at those of the hour the
usage happened.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from tinsmith.config import Prices
from tinsmith.scheduler.access import Caller
from tinsmith.scheduler.accounting import (
    CHECKPOINT,
    FORWARD,
    PREFILL,
    SAMPLE,
    TRAINING,
    Accounting,
)
from tinsmith.storage.db import MetadataStore
from tinsmith.types import UserError

# The SDK's `event_type` filter of the audit log: the event name prefixes each one keeps.
AUDIT_FILTERS: dict[str, tuple[str, ...] | None] = {
    "all": None, "checkpoints": ("checkpoint_",), "projects": ("project_",),
    "teams": ("team_",), "organizations": ("key_", "organization_"),
}
MAX_WINDOW = timedelta(days=366)
GB = 10**9  # the storage billing unit


def _rates(prices: Prices) -> dict[str, float]:
    """USD per million tokens of each token kind."""
    return {TRAINING: prices.train_per_mtok, FORWARD: prices.forward_per_mtok,
            PREFILL: prices.prefill_per_mtok, SAMPLE: prices.sample_per_mtok}


def _event_info(kind: str, quantity: int) -> dict[str, Any]:
    """A usage row's `event_info`. The SDK's union has no forward-only type: forward tokens
    are a `training` event marked `forward_only` (the SDK's model drops the mark, the raw
    JSON keeps it) with the forward price."""
    if kind == CHECKPOINT:
        return {"type": "checkpoint", "count": quantity}
    if kind == FORWARD:
        return {"type": "training", "token_count": quantity, "forward_only": True}
    if kind == PREFILL:
        return {"type": "sampling_prefill", "token_count": quantity, "cached": False}
    return {"type": kind, "token_count": quantity}


class Reports:
    def __init__(self, db: MetadataStore, accounting: Accounting, prices: Prices) -> None:
        self.db = db
        self.accounting = accounting
        self.prices = prices

    def _key_names(self) -> dict[str, str | None]:
        return {k.key_id: k.name for k in self.db.list_api_keys()}

    def audit_log(self, caller: Caller, event_type: str = "all",
                  day: date | None = None) -> dict[str, Any]:
        """The entries of one UTC day (default today), oldest first."""
        if event_type not in AUDIT_FILTERS:
            raise UserError(f"unknown audit event_type {event_type!r}: use one of "
                            + ", ".join(AUDIT_FILTERS))
        day = day or datetime.now(UTC).date()
        start = datetime.combine(day, time(), tzinfo=UTC)
        self.accounting.flush()
        rows = self.db.audit_entries(start, start + timedelta(days=1),
                                     owner=caller.listing_owner, prefixes=AUDIT_FILTERS[event_type])
        entries = []
        for r in rows:
            entry: dict[str, Any] = {"timestamp": r.at.isoformat(), "event": r.event,
                                     "event_details": r.details}
            if r.event.startswith("checkpoint_"):  # the deprecated fields, as the SDK says
                d = r.details
                entry["model_id"] = d.get("model_id")
                entry["tinker_path"] = d.get("tinker_path") or (
                    f"tinker://{d['model_id']}/{d['checkpoint_id']}"
                    if d.get("model_id") and d.get("checkpoint_id") else None)
            entries.append(entry)
        return {"entries": entries}

    def usage(self, caller: Caller, starting_on: datetime,
              ending_before: datetime) -> dict[str, Any]:
        """Hourly usage overlapping [starting_on, ending_before), with costs (naive times
        are UTC)."""
        start, end = (t if t.tzinfo else t.replace(tzinfo=UTC)
                      for t in (starting_on, ending_before))
        if end <= start:
            raise UserError(f"ending_before ({end.isoformat()}) must be after starting_on "
                            f"({start.isoformat()})")
        if end - start > MAX_WINDOW:
            raise UserError(f"the usage window may span at most {MAX_WINDOW.days} days")
        self.accounting.flush()
        rows = self.db.usage(start, end, owner=caller.listing_owner)
        sessions = self.db.session_projects(sorted({r.session_id for r in rows if r.session_id}))
        names = self._key_names()
        rates = _rates(self.prices)
        data = []
        for r in rows:
            rate = rates.get(r.kind)
            data.append({
                "bucket_start": r.bucket_start.isoformat(),
                "bucket_end": (r.bucket_start + timedelta(hours=1)).isoformat(),
                "base_model": r.base_model,
                "user_id": r.owner,
                "user_name": names.get(r.owner) if r.owner else None,
                "session_id": r.session_id,
                "project_id": sessions.get(r.session_id, (None, {}))[0] if r.session_id else None,
                "estimated_cost_usd": None if rate is None else rate * r.quantity / 1e6,
                "effective_rate_usd_per_million_tokens": rate,
                "event_info": _event_info(r.kind, r.quantity),
            })
        return {
            "data": data,
            "sessions": {sid: {"user_metadata": {k: str(v) for k, v in md.items()} or None}
                         for sid, (_, md) in sessions.items()},
            "cost_data_through": None,
        }

    def checkpoint_storage(self, caller: Caller, project_id: str | None = None) -> dict[str, Any]:
        """Live checkpoints now, grouped by project and API key, with their monthly cost."""
        rows = self.db.stored_usage(datetime.now(UTC), owner=caller.listing_owner,
                                    project_id=project_id)
        names = self._key_names()
        rate = self.prices.storage_per_gb_month
        return {
            "effective_rate_usd_per_gigabyte_month": rate,
            "data": [{
                "project_id": r.project_id,
                "org_user_urn": r.owner,
                "user_name": names.get(r.owner) if r.owner else None,
                "checkpoint_count": r.checkpoint_count,
                "size_bytes": r.size_bytes,
                "size_gigabytes": r.size_bytes / GB,
                "estimated_monthly_cost_usd": rate * r.size_bytes / GB,
            } for r in rows],
        }
