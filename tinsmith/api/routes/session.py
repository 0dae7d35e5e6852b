"""Client configuration, sessions, heartbeats and telemetry.

/client/config switches the SDK's optional transport features (see docs/operating.md,
"Client transport options"): zstd-compressed /forward_backward bodies (decompressed by
tinsmith.api.zstd_body), the batched sampling poll /retrieve_futures, and server-allocated
clone ids for unpickled SamplingClients (/join_sampling_session) are on; server-side custom
losses stay off, so `create_custom_loss` traces the loss and `forward_backward_custom` runs
it on the client, and /create_custom_loss answers 400 saying so.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from tinker.types import CreateSessionRequest, SessionHeartbeatRequest

from tinsmith import __version__
from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.types import UserError

router = APIRouter(prefix="/api/v1")


@router.post("/client/config")
def client_config(request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    # Parallel chunks arrive first-chunk-last, all held until it comes: under a concurrency
    # limit the held ones could fill it, so a limited key sends its chunks in order.
    parallel = svc.keys.limits(caller.owner).max_concurrent is None
    # The SDK exchanges its key for a short-lived token (POST /auth/token, tinsmith.scheduler.
    # tokens), which whoami needs; the httpx transport suits plain HTTP.
    return {"pjwt_auth_enabled": True, "use_pyqwest_transport": False,
            "parallel_fwdbwd_chunks": parallel, "proto_compress_fwdbwd": True,
            "fwdbwd_max_chunk_len": svc.settings.fwdbwd_max_chunk_len,
            "sample_use_retrieve_futures": True, "sample_join_sampling_session": True,
            "custom_loss_server_side": False}


@router.post("/client/dynamic_config")
async def dynamic_config() -> dict[str, object]:
    # Abandoned sample futures are cancelled explicitly (/cancel_future).
    return {"sample_cancel_enabled": True}


@router.post("/create_custom_loss")
async def create_custom_loss() -> dict[str, object]:
    raise UserError(
        "server-side custom losses are not supported by this server (custom_loss_server_side "
        "is off in /client/config): ServiceClient.create_custom_loss returns a LossHandle that "
        "TrainingClient.forward_backward_custom runs on the client, which works here", 400)


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

