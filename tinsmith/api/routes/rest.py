"""REST resources the RestClient reads: capabilities, runs, checkpoints, sessions.

Each caller sees only what its API key made (an admin key sees everything); the rest
answers as if it did not exist."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.scheduler.paths import parse_path
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
        "public": False,
        "user_metadata": _str_dict(row.user_metadata),
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
    }


def run_json(request: Request, row: RunRow) -> dict[str, object]:
    last, last_sampler = service(request).last_checkpoints(row.training_run_id)
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
def list_runs(request: Request, caller: CallerDep, limit: int = 20, offset: int = 0) -> dict[str, object]:
    rows, total = service(request).list_runs(caller, limit, offset)
    return {"training_runs": [run_json(request, r) for r in rows],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


@router.get("/training_runs/{run_id}")
def get_run(run_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    return run_json(request, service(request).run_row(run_id, caller))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    rows, _ = service(request).list_checkpoints(caller, run_id)
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
            "train_attn": lora.get("train_attn")}


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
