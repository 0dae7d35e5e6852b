"""Checkpoint files out: signed download URLs, the downloads themselves, and checkpoint TTLs.

`GET .../checkpoints/{checkpoint_id}/external_weights_urls` (the SDK's
get_external_weights_urls; with the caller's key) answers one signed URL per file of a
checkpoint the caller may see: of any kind here, though the SDK asks only for
external_weights. The URLs point at `GET /api/v1/checkpoint_files/...` on `public_router`,
which needs no API key: the signature is the permission (tinsmith.scheduler.signing).
`PUT .../ttl` (set_checkpoint_ttl) is what the SDK's `tinker checkpoint download` calls too.
A file is sent in chunks straight from a local store's disk, never whole in memory.

`GET /sessions/{id}/trace_export` (export_session_trace) answers at once "ready" with a
signed URL of `GET /api/v1/session_traces/{id}`, which builds the session's trace when it
is downloaded (tinsmith.scheduler.trace): nothing is stored, and it is always up to date.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.scheduler.paths import CheckpointRef, ref_from_checkpoint_id
from tinsmith.scheduler.service import Service
from tinsmith.types import NotFound, UserError

router = APIRouter(prefix="/api/v1")
public_router = APIRouter(prefix="/api/v1")
FILES_PATH = "checkpoint_files"
TRACES_PATH = "session_traces"
CHUNK_BYTES = 1 << 20


class TtlRequest(BaseModel):
    ttl_seconds: int | None = None


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str, request: Request,
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
def set_ttl(run_id: str, checkpoint_id: str, req: TtlRequest, request: Request,
                  caller: CallerDep) -> dict[str, object]:
    service(request).set_checkpoint_ttl(run_id, checkpoint_id, req.ttl_seconds, caller)
    return {}


def _trace_mac_args(session_id: str) -> tuple[str, str, str]:
    """What a trace URL's signature covers, in the signer's (run, checkpoint id, file)
    slots: a checkpoint id always holds a "/", so no checkpoint file signs the same."""
    return f"session-trace:{session_id}", "trace", "trace.json"


@router.get("/sessions/{session_id}/trace_export")
def trace_export(session_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    svc.session(session_id, caller)  # someone else's session: not found
    expires = svc.signer.expiry()
    signed = svc.signer.sign(*_trace_mac_args(session_id), expires)
    root = str(request.base_url).rstrip("/")
    return {"status": "ready", "url": f"{root}/api/v1/{TRACES_PATH}/{quote(session_id)}"
                                      f"?expires={signed.expires}&signature={signed.signature}"}


@public_router.get(f"/{TRACES_PATH}/{{session_id}}")
def session_trace(session_id: str, expires: int, signature: str, request: Request) -> JSONResponse:
    svc = service(request)
    if not svc.signer.valid(*_trace_mac_args(session_id), expires, signature):
        raise UserError("this trace URL is invalid or has expired; export the trace again "
                        "(export_session_trace)", 403)
    return JSONResponse(svc.session_trace(session_id), headers={
        "Content-Disposition": f'attachment; filename="{session_id}.pftrace"'})


@public_router.get(f"/{FILES_PATH}/{{run_id}}/{{kind}}/{{name}}/{{file_name}}")
def checkpoint_file(run_id: str, kind: str, name: str, file_name: str, expires: int,
                    signature: str, request: Request) -> Response:
    """One checkpoint file (a plain `def`: reading the store blocks)."""
    svc = service(request)
    ref = ref_from_checkpoint_id(run_id, f"{kind}/{name}")
    if not svc.signer.valid(run_id, ref.checkpoint_id, file_name, expires, signature):
        raise UserError("this download URL is invalid or has expired; ask for new URLs "
                        "(get_external_weights_urls)", 403)
    f = _open_local(svc, ref, file_name)
    if f is None:  # an object store: read whole, as the store reads it consistently
        return Response(svc.read_checkpoint_file(ref, file_name),
                        media_type="application/octet-stream")
    size = os.fstat(f.fileno()).st_size
    return StreamingResponse(_chunks(f), media_type="application/octet-stream",
                             headers={"Content-Length": str(size)})


def _open_local(svc: Service, ref: CheckpointRef, name: str) -> BinaryIO | None:
    """The file opened from a local store's disk (`<root>/<key>/<name>`, storage/files.py),
    or None for an object store. An opened file is one whole version of it: a checkpoint's
    files are published by renaming their folder, never written in place."""
    store = svc.store
    if not store.local:
        return None
    key = svc.checkpoint(ref).storage_key
    missing = NotFound(f"checkpoint {ref.tinker_path} has no file {name!r}")
    try:
        if name not in store.sizes(key):
            raise missing
        return open(os.path.join(store.root, key, name), "rb")  # closed by _chunks
    except FileNotFoundError as e:  # deleted (or replaced) meanwhile
        raise missing from e


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk
