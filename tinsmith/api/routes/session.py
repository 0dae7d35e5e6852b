"""Client configuration, sessions, heartbeats and telemetry."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from tinker.types import CreateSessionRequest, SessionHeartbeatRequest

from tinsmith import __version__
from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service

router = APIRouter(prefix="/api/v1")


@router.post("/client/config")
async def client_config(request: Request) -> dict[str, object]:
    # Plain API keys (no JWT exchange) and the httpx transport, which suits plain HTTP.
    return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False,
            "parallel_fwdbwd_chunks": True, "proto_compress_fwdbwd": False,
            "fwdbwd_max_chunk_len": service(request).settings.fwdbwd_max_chunk_len}


@router.post("/client/dynamic_config")
async def dynamic_config() -> dict[str, object]:
    return {}


@router.post("/create_session")
def create_session(req: CreateSessionRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    sid = service(request).create_session(
        tags=req.tags, user_metadata=req.user_metadata, display_name=req.display_name,
        project_id=req.project_id, sdk_version=req.sdk_version, caller=caller,
    )
    return {"session_id": sid, "type": "create_session",
            "info_message": f"Tinsmith {__version__}: session {sid}"}


@router.post("/session_heartbeat")
def heartbeat(req: SessionHeartbeatRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    service(request).heartbeat(req.session_id, caller)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish(session_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    body = await request.json() if await request.body() else {}
    reason = (body.get("reason") or {}).get("type", "success") if isinstance(body, dict) else "success"
    await run_in_threadpool(service(request).finish_session, session_id, str(reason), caller)
    return {}


@router.post("/telemetry")
async def telemetry() -> dict[str, object]:
    return {"status": "accepted"}

