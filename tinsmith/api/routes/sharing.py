"""Sharing and projects: publishing checkpoints, copying them (copy_weights), and moving a
session into a project (tinsmith.scheduler.checkpoint_ops, session_ops).

Included before rest.py's router: `POST|DELETE .../checkpoints/{checkpoint_id}/publish`
would otherwise reach its `DELETE .../checkpoints/{checkpoint_id:path}`.
"""

from __future__ import annotations

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel
from tinker.types import CopyWeightsRequest

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service

router = APIRouter(prefix="/api/v1")


class ProjectRequest(BaseModel):
    project_id: str | None = None


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def publish(run_id: str, checkpoint_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    service(request).set_published(run_id, checkpoint_id, True, caller)
    return {}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def unpublish(run_id: str, checkpoint_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    service(request).set_published(run_id, checkpoint_id, False, caller)
    return {}


@router.post("/copy_weights")
def copy_weights(req: CopyWeightsRequest, request: Request, caller: CallerDep,
                 x_idempotency_key: str | None = Header(default=None)) -> dict[str, object]:
    """Synchronous: the copy is a few rows (its files are the source's)."""
    path = service(request).copy_weights(
        req.source_path, destination_project_id=req.destination_project_id,
        session_id=req.session_id, model_seq_id=req.model_seq_id, ttl_seconds=req.ttl_seconds,
        idempotency_key=x_idempotency_key, caller=caller)
    return {"tinker_path": path}


@router.put("/sessions/{session_id}/project")
def assign_project(session_id: str, req: ProjectRequest, request: Request,
                   caller: CallerDep) -> dict[str, object]:
    service(request).assign_session_project(session_id, req.project_id or "", caller)
    return {}
