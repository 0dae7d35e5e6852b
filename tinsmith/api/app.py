"""The FastAPI application: routers for each resource over one Service."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from tinsmith import __version__
from tinsmith.api.auth import current_caller
from tinsmith.api.deps import user_error_response
from tinsmith.api.routes import futures, health, rest, sampling, session, training
from tinsmith.scheduler.service import Service
from tinsmith.types import UserError


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(title="Tinsmith", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.service = svc
    app.add_exception_handler(UserError, user_error_response)
    # Everything but the health probes needs a valid API key once the server has keys.
    for r in (session.router, training.router, sampling.router, futures.router, rest.router):
        app.include_router(r, dependencies=[Depends(current_caller)])
    app.include_router(health.router)
    return app
