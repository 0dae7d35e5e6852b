"""Checkpoint files out: signed download URLs, the downloads themselves, and checkpoint TTLs.

`GET .../checkpoints/{checkpoint_id}/external_weights_urls` (the SDK's
get_external_weights_urls; with the caller's key) answers one signed URL per file of a
checkpoint the caller may see: of any kind here, though the SDK asks only for
external_weights. The URLs point at `GET /api/v1/checkpoint_files/...` on `public_router`,
which needs no API key: the signature is the permission (tinsmith.scheduler.signing).
`PUT .../ttl` (set_checkpoint_ttl) is what the SDK's `tinker checkpoint download` calls too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.scheduler.paths import ref_from_checkpoint_id
from tinsmith.types import UserError

router = APIRouter(prefix="/api/v1")
public_router = APIRouter(prefix="/api/v1")
FILES_PATH = "checkpoint_files"


class TtlRequest(BaseModel):
    ttl_seconds: int | None = None


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
async def external_weights_urls(run_id: str, checkpoint_id: str, request: Request,
                                caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    ref = ref_from_checkpoint_id(run_id, checkpoint_id)
    sizes = svc.checkpoint_file_sizes(ref, caller)
    expires = svc.signer.expiry()
    root = str(request.base_url).rstrip("/")
    base = f"{root}/api/v1/{FILES_PATH}/{quote(run_id, safe=':')}/{ref.kind}/{ref.name}"
    urls = {}
    for name in sorted(sizes):
        signed = svc.signer.sign(run_id, ref.checkpoint_id, name, expires)
        urls[name] = f"{base}/{quote(name)}?expires={signed.expires}&signature={signed.signature}"
    return {"urls": urls, "expires": datetime.fromtimestamp(expires, UTC).isoformat()}


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
async def set_ttl(run_id: str, checkpoint_id: str, req: TtlRequest, request: Request,
                  caller: CallerDep) -> dict[str, object]:
    service(request).set_checkpoint_ttl(run_id, checkpoint_id, req.ttl_seconds, caller)
    return {}


@public_router.get(f"/{FILES_PATH}/{{run_id}}/{{kind}}/{{name}}/{{file_name}}")
async def checkpoint_file(run_id: str, kind: str, name: str, file_name: str, expires: int,
                          signature: str, request: Request) -> Response:
    svc = service(request)
    ref = ref_from_checkpoint_id(run_id, f"{kind}/{name}")
    if not svc.signer.valid(run_id, ref.checkpoint_id, file_name, expires, signature):
        raise UserError("this download URL is invalid or has expired; ask for new URLs "
                        "(get_external_weights_urls)", 403)
    data = svc.read_checkpoint_file(ref, file_name)
    return Response(data, media_type="application/octet-stream")
