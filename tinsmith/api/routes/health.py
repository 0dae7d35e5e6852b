"""Health and metrics for load balancers and Prometheus: /healthz, /readyz, /metrics.

No API key on these: they are for infrastructure, and they reveal no user data.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tinsmith.api.deps import service

router = APIRouter()


@router.get("/healthz")
@router.get("/api/v1/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 when every check passes, else 503 naming the failing checks.
    A plain `def`: the database check blocks, so it runs in the threadpool."""
    checks = service(request).readiness()
    failing = sorted(name for name, c in checks.items() if not c.ok)
    body = {
        "status": "unavailable" if failing else "ok",
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
        "failing": failing,
    }
    return JSONResponse(body, status_code=503 if failing else 200)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text exposition of this server's metrics."""
    return Response(service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
