"""The FastAPI application: routers for each resource over one Service."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError

from tinsmith import __version__
from tinsmith.api.auth import current_caller
from tinsmith.api.body_limit import BodyLimit
from tinsmith.api.deps import user_error_response, validation_error_response
from tinsmith.api.routes import (
    accounting,
    dashboard,
    downloads,
    futures,
    health,
    rest,
    sampling,
    session,
    sharing,
    training,
)
from tinsmith.api.zstd_body import ZstdBody
from tinsmith.scheduler.service import Service
from tinsmith.types import UserError


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="Tinsmith", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.service = svc
    app.add_exception_handler(UserError, user_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_middleware(ZstdBody, max_bytes=svc.settings.max_body_bytes)  # inside BodyLimit
    app.add_middleware(BodyLimit, max_bytes=svc.settings.max_body_bytes)
    # Everything but the health probes and the dashboard's static files needs a valid API
    # key once the server has keys. Routes are matched in order and no two paths overlap:
    # the per-step ones (retrieve_future, forward_backward, optim_step) come first.
    # sharing's .../checkpoints/{id}/publish precedes rest's .../checkpoints/{id:path}.
    for r in (futures.router, training.router, sampling.router, session.router, sharing.router,
              rest.router, dashboard.router, downloads.router, accounting.router):
        app.include_router(r, dependencies=[Depends(current_caller)])
    app.include_router(health.router)
    app.include_router(downloads.public_router)  # signed URLs: the signature is the permission
    app.include_router(dashboard.pages)
    return app
