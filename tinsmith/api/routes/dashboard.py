"""The web dashboard: its static page, and the JSON it reads beyond the REST resources.

The page (`/dashboard`, packaged in tinsmith/api/dashboard/) holds no data and needs no key;
everything it shows comes from keyed endpoints, so a key sees on it exactly what it sees
through the SDK. Keyed endpoints here: a run's metric history, an overview of sessions and
runs (with the models the playground offers), the engine figures, playground completions
and checkpoint archives.

A session's status is worked out when it is read (`session_status`), from what is stored:
"finished" when its client finished it, "ended" when its client has missed
`MISSED_HEARTBEATS` heartbeats in a row (it exited, or lost the server, without finishing
it), else "active". Nothing is written when a session goes quiet, so a client whose
heartbeats resume shows as active again.
"""

from __future__ import annotations

import io
import re
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from tinsmith.api.auth import CallerDep
from tinsmith.api.deps import service
from tinsmith.api.routes.rest import run_json
from tinsmith.scheduler.paths import KINDS, parse_path
from tinsmith.types import NotFound

if TYPE_CHECKING:
    from tinsmith.scheduler.access import Caller
    from tinsmith.scheduler.service import Service
    from tinsmith.storage.db import SessionRow

STATIC = Path(__file__).resolve().parent.parent / "dashboard"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}

SDK_HEARTBEAT_S = 10
"""How often the tinker SDK heartbeats a live session (its SESSION_HEARTBEAT_PERIOD_SEC)."""
MISSED_HEARTBEATS = 3
"""Heartbeats a session may miss in a row before it shows as ended."""
PLAYGROUND_CHECKPOINTS = 100
"""Sampler checkpoints the playground offers at most, the newest first."""
_CHECKPOINTS_READ = 1000
"""The newest checkpoints (of every type) looked through for them."""

pages = APIRouter()  # no key: static files only
router = APIRouter(prefix="/api/v1")


@pages.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@pages.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    """The icon, for the browsers and tools that ask for /favicon.ico whatever the page says."""
    return await static_file("favicon.svg")


@pages.get("/dashboard", include_in_schema=False)
@pages.get("/dashboard/{name}", include_in_schema=False)
async def static_file(name: str = "index.html") -> FileResponse:
    path = STATIC / name
    if "/" in name or path.suffix not in _TYPES or not path.is_file():
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/training_runs/{run_id}/metrics")
def run_metrics(run_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    """The run's per-step metrics, oldest first (in memory: since the server started)."""
    svc = service(request)
    svc.run_row(run_id, caller)  # someone else's run: not found
    points, total = svc.history.points(run_id)
    return {"training_run_id": run_id, "points": [p.to_json() for p in points],
            "total_points": total, "max_points": svc.history.max_points}


def session_status(row: SessionRow, now: datetime) -> str:
    """"finished", "ended" (no heartbeat for MISSED_HEARTBEATS intervals) or "active"."""
    if row.finished_at is not None:
        return "finished"
    if now - row.last_heartbeat_at > timedelta(seconds=MISSED_HEARTBEATS * SDK_HEARTBEAT_S):
        return "ended"
    return "active"


def sampler_paths(svc: Service, caller: Caller) -> list[str]:
    """The tinker:// paths of the caller's own sampler checkpoints (an admin's too: not
    everyone's), newest first, from the newest _CHECKPOINTS_READ checkpoints."""
    paths: list[str] = []
    offset = 0
    while len(paths) < PLAYGROUND_CHECKPOINTS and offset < _CHECKPOINTS_READ:
        rows, total = svc.list_checkpoints(caller, limit=200, offset=offset)
        paths += [r.tinker_path for r in rows
                  if r.checkpoint_type == KINDS["sampler_weights"] and r.owner == caller.owner]
        offset += len(rows)
        if not rows or offset >= total:
            break
    return paths[:PLAYGROUND_CHECKPOINTS]


@router.get("/dashboard/overview")
def overview(request: Request, caller: CallerDep, limit: int = 50) -> dict[str, object]:
    """The caller's newest sessions and training runs, each run with its step and last loss,
    and the models its playground may sample: the served base models, then its own sampler
    checkpoints."""
    svc = service(request)
    sessions = svc.list_sessions(caller, limit, 0)
    rows, total = svc.list_runs(caller, limit, 0)
    runs = []
    for row in rows:
        steps, last = svc.history.latest(row.training_run_id)
        runs.append({**run_json(request, row), "session_id": row.session_id,
                     "loaded": svc.is_loaded(row.training_run_id), "steps": steps,
                     "last_metrics": last})
    now = datetime.now(UTC)
    return {
        "sessions": [{"session_id": s.session_id, "display_name": s.display_name,
                      "tags": s.tags, "created_at": s.created_at.isoformat(),
                      "last_heartbeat_at": s.last_heartbeat_at.isoformat(),
                      "status": session_status(s, now),
                      "finished_at": s.finished_at.isoformat() if s.finished_at else None,
                      "finish_reason": s.finish_reason} for s in sessions],
        "training_runs": runs, "total_runs": total, "models": sorted(h.name for h in svc.served_models()),
        "sampler_checkpoints": sampler_paths(svc, caller),
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
