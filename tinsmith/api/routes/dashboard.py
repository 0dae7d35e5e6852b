"""The web dashboard: its static page, and the JSON it reads beyond the REST resources.

The page (`/dashboard`, packaged in tinsmith/api/dashboard/) holds no data and needs no key;
everything it shows comes from keyed endpoints, so a key sees on it exactly what it sees
through the SDK. Keyed endpoints here: a run's metric history, an overview of sessions and
runs, the engine figures, playground completions and checkpoint archives.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.api.routes.rest import run_json
from tinsmith.scheduler.paths import parse_path
from tinsmith.types import NotFound

STATIC = Path(__file__).resolve().parent.parent / "dashboard"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}

pages = APIRouter()  # no key: static files only
router = APIRouter(prefix="/api/v1")


@pages.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@pages.get("/dashboard", include_in_schema=False)
@pages.get("/dashboard/{name}", include_in_schema=False)
async def static_file(name: str = "index.html") -> FileResponse:
    path = STATIC / name
    if "/" in name or path.suffix not in _TYPES or not path.is_file():
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/training_runs/{run_id}/metrics")
async def run_metrics(run_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    """The run's per-step metrics, oldest first (in memory: since the server started)."""
    svc = service(request)
    svc.run_row(run_id, caller)  # someone else's run: not found
    points, total = svc.history.points(run_id)
    return {"training_run_id": run_id, "points": [p.to_json() for p in points],
            "total_points": total, "max_points": svc.history.max_points}


@router.get("/dashboard/overview")
async def overview(request: Request, caller: CallerDep, limit: int = 50) -> dict[str, object]:
    """The caller's newest sessions and training runs, each run with its step and last loss."""
    svc = service(request)
    sessions = svc.list_sessions(caller, limit, 0)
    rows, total = svc.list_runs(caller, limit, 0)
    runs = []
    for row in rows:
        steps, last = svc.history.latest(row.training_run_id)
        runs.append({**run_json(request, row), "session_id": row.session_id,
                     "loaded": row.training_run_id in svc.runs, "steps": steps,
                     "last_metrics": last})
    return {
        "sessions": [{"session_id": s.session_id, "display_name": s.display_name,
                      "tags": s.tags, "created_at": s.created_at.isoformat(),
                      "last_heartbeat_at": s.last_heartbeat_at.isoformat(),
                      "finished_at": s.finished_at.isoformat() if s.finished_at else None,
                      "finish_reason": s.finish_reason} for s in sessions],
        "training_runs": runs, "total_runs": total, "models": sorted(svc.models),
    }


@router.get("/dashboard/engine")
async def engine(request: Request) -> dict[str, object]:
    """Per base model: queue depth, busy fraction, tokens/s, requests per pass."""
    return {"models": [f.to_json() for f in service(request).utilisation.figures()]}


class PlaygroundRequest(BaseModel):
    model: str = Field(description="a served base model, or a tinker:// sampler checkpoint path")
    prompt: str
    max_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0)
    seed: int | None = None


@router.post("/dashboard/sample")
async def playground(req: PlaygroundRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    out = await service(request).playground.complete(
        caller, model=req.model, prompt=req.prompt, max_tokens=req.max_tokens,
        temperature=req.temperature, seed=req.seed)
    return out.to_json()


@router.get("/checkpoints/download")
def download_checkpoint(path: str, request: Request, caller: CallerDep) -> Response:
    """A checkpoint's files as a zip archive (a plain `def`: reading the store blocks)."""
    svc = service(request)
    ref = parse_path(path)
    files = svc.checkpoint_files(ref, caller)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            z.writestr(name, data)
    filename = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ref.run_id}-{ref.kind}-{ref.name}") + ".zip"
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
