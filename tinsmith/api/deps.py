"""Shared helpers of the routers: the service from the app state, and error responses."""

from __future__ import annotations

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tinsmith.scheduler.service import Service
from tinsmith.types import UserError


def service(request: Request) -> Service:
    return request.app.state.service


def future_response(request_id: str, model_id: str | None = None, **extra: object) -> dict[str, object]:
    """The UntypedAPIFuture every asynchronous endpoint answers with."""
    out: dict[str, object] = {"request_id": request_id}
    if model_id is not None:
        out["model_id"] = model_id
    out.update(extra)
    return out


def user_error_response(_: Request, exc: Exception) -> JSONResponse:
    # Always a non-empty body: the SDK treats a bodiless 400 as a connection error and retries.
    assert isinstance(exc, UserError)
    headers = {"WWW-Authenticate": 'APIKey header="X-API-Key"'} if exc.status_code == 401 else None
    if exc.status_code == 429:  # over a concurrency limit: worth retrying soon
        headers = {"Retry-After": "1"}
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)


def validation_error_response(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a body that does not fit the schema, safe for any body: bytes that
    are not UTF-8 (binary sent to a JSON endpoint) are shown escaped instead of ending in a 500."""
    assert isinstance(exc, RequestValidationError)
    safe = {bytes: lambda b: b.decode("utf-8", "backslashreplace")}
    return JSONResponse({"detail": jsonable_encoder(exc.errors(), custom_encoder=safe)},
                        status_code=422)
