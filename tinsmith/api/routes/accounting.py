"""Accounting and identity: the audit log, usage and billing, and who the caller's key is.

GET /audit, /billing/usage/events and /billing/usage/checkpoints/current answer the SDK's
AdminClient (and `tinker billing ...`); GET/DELETE /auth/apikey/me answer `tinker auth
login/logout`; POST /auth/token the SDK's JWT mode (and makes `whoami` possible). What each
key may see is decided in tinsmith.scheduler.billing.
"""

from __future__ import annotations

from datetime import date, datetime

from fastapi import APIRouter, Request

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.scheduler.identity import describe_key, revoke_own_key

router = APIRouter(prefix="/api/v1")



@router.get("/audit")
def audit_log(request: Request, caller: CallerDep, event_type: str = "all",
              day: date | None = None) -> dict[str, object]:
    return service(request).reports.audit_log(caller, event_type, day)


@router.get("/billing/usage/events")
def billing_usage(request: Request, caller: CallerDep, starting_on: datetime,
                  ending_before: datetime) -> dict[str, object]:
    return service(request).reports.usage(caller, starting_on, ending_before)


@router.get("/billing/usage/checkpoints/current")
def checkpoint_storage(request: Request, caller: CallerDep,
                       project_id: str | None = None) -> dict[str, object]:
    return service(request).reports.checkpoint_storage(caller, project_id)


@router.get("/auth/apikey/me")
def whoami(request: Request, caller: CallerDep) -> dict[str, object]:
    return describe_key(service(request).db, caller)


@router.delete("/auth/apikey/me")
def delete_own_key(request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    revoke_own_key(svc.db, svc.keys, svc.tokens, caller)
    return {}


@router.post("/auth/token")
def auth_token(request: Request, caller: CallerDep) -> dict[str, object]:
    """A short-lived token standing for the caller's key (tinsmith.scheduler.tokens)."""
    return {"jwt": service(request).tokens.mint(caller)}
