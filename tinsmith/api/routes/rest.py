"""REST resources the RestClient reads: capabilities, runs, checkpoints, sessions and
their search.

Each caller sees only what its API key made (an admin key sees everything), and published
checkpoints with the runs holding them (only those checkpoints); the rest answers as if it
did not exist."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel
from tinker.types import SessionSearchRequest

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.scheduler.access import Caller
from tinsmith.scheduler.paths import parse_path
from tinsmith.scheduler.session_ops import SessionHit, SessionSearch, StatusQuery
from tinsmith.storage.db import CheckpointRow, RunRow

router = APIRouter(prefix="/api/v1")
OWNER = "local"


class WeightsInfoRequest(BaseModel):
    tinker_path: str


def _str_dict(d: dict[str, object] | None) -> dict[str, str] | None:
    """The SDK's TrainingRun and Checkpoint models want string metadata values."""
    return {str(k): str(v) for k, v in d.items()} if d else None


def checkpoint_json(row: CheckpointRow) -> dict[str, object]:
    return {
        "checkpoint_id": row.checkpoint_id,
        "checkpoint_type": row.checkpoint_type,
        "time": row.created_at.isoformat(),
        "tinker_path": row.tinker_path,
        "size_bytes": row.size_bytes,
        "public": row.public,
        "user_metadata": _str_dict(row.user_metadata),
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


def run_json(request: Request, row: RunRow, caller: Caller | None = None) -> dict[str, object]:
    """A TrainingRun; its last checkpoints those `caller` sees (None: all)."""
    last, last_sampler = service(request).latest_checkpoints(row.training_run_id, caller)
    return {
        "training_run_id": row.training_run_id,
        "base_model": row.base_model,
        "model_owner": row.owner or OWNER,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": row.lora.get("rank"),
        "last_request_time": row.last_request_time.isoformat(),
        "last_checkpoint": checkpoint_json(last) if last else None,
        "last_sampler_checkpoint": checkpoint_json(last_sampler) if last_sampler else None,
        "user_metadata": _str_dict(row.user_metadata),
    }


@router.get("/get_server_capabilities")
def capabilities(request: Request) -> dict[str, object]:
    return {"supported_models": [
        {"model_name": h.name, "max_context_length": h.max_context, "trainable": True, "sampleable": True}
        for h in service(request).served_models()
    ]}


@router.get("/training_runs")
def list_runs(request: Request, caller: CallerDep, limit: int = 20, offset: int = 0,
              project_id: str | None = None) -> dict[str, object]:
    rows, total = service(request).list_runs_in(caller, limit, offset, project_id)
    return {"training_runs": [run_json(request, r) for r in rows],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


@router.get("/training_runs/{run_id}")
def get_run(run_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    return run_json(request, service(request).shared_run(run_id, caller)[0], caller)


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    rows = service(request).run_checkpoints(run_id, caller)
    return {"checkpoints": [checkpoint_json(c) for c in rows], "cursor": None}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request,
                            caller: CallerDep) -> dict[str, object]:
    service(request).delete_checkpoint(run_id, checkpoint_id, caller)
    return {}


@router.get("/checkpoints")
def list_all_checkpoints(request: Request, caller: CallerDep, limit: int = 100,
                               offset: int = 0) -> dict[str, object]:
    rows, total = service(request).list_checkpoints(caller, limit=limit, offset=offset)
    return {"checkpoints": [checkpoint_json(c) for c in rows],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


@router.post("/weights_info")
def weights_info(req: WeightsInfoRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    row = svc.checkpoint(parse_path(req.tinker_path), caller)
    lora = row.lora
    return {"base_model": row.base_model, "is_lora": True, "lora_rank": lora.get("rank"),
            "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn"),
            "optimizer_config": svc.checkpoint_optimizer(row.storage_key).to_json()}


@router.get("/sessions")
def list_sessions(request: Request, caller: CallerDep, limit: int = 20, offset: int = 0) -> dict[str, object]:
    return {"sessions": [s.session_id for s in service(request).list_sessions(caller, limit, offset)]}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    s = svc.session(session_id, caller)
    run_ids, sampler_ids = svc.session_contents(session_id)
    return {"training_run_ids": run_ids, "sampler_ids": sampler_ids,
            "user_metadata": s.user_metadata, "display_name": s.display_name}


def _summary(hit: SessionHit) -> dict[str, object]:
    row = hit.row
    return {"session_id": row.session_id, "created_at": row.created_at.isoformat(),
            "owner": row.owner or OWNER, "project_id": row.project_id or "",
            "status": hit.status, "checkpoints_count": hit.checkpoints,
            "display_name": row.display_name, "user_metadata": _str_dict(row.user_metadata),
            "checkpoint_storage_bytes": hit.checkpoint_bytes}


@router.post("/sessions/search")
def search_sessions(req: SessionSearchRequest, request: Request,
                    caller: CallerDep) -> dict[str, object]:
    """The SDK's search_sessions: one page, newest first. A session without a project
    shows project_id "" (and "" in project_ids matches those)."""
    owner = req.owner
    after: tuple[datetime, str] | None = None
    if req.cursor is not None:
        after = (req.cursor.last_created_at, req.cursor.last_session_id)
    query = SessionSearch(
        session_id=req.session_id, display_name=req.display_name, project_ids=req.project_ids,
        user_metadata=req.user_metadata, owner=owner.type,
        owner_ids=getattr(owner, "owner_urns", ()), limit=req.limit, after=after,
        statuses=None if req.statuses is None else [
            StatusQuery(q.type, tuple(r) if (r := getattr(q, "reasons", None)) else None)
            for q in req.statuses])
    hits, next_after = service(request).search_sessions(caller, query)
    cursor = None if next_after is None else {"last_created_at": next_after[0].isoformat(),
                                              "last_session_id": next_after[1]}
    return {"sessions": [_summary(h) for h in hits], "next_cursor": cursor}
