"""No rejected training-run request leaves a hole in its run's seq_id order.

The SDK numbers a training client's requests 1, 2, 3, ... and the server runs them in that
order (tinsmith.scheduler.ordering), so a seq_id that never reaches the run's gate holds
every later request. A request refused anywhere on its way in (schema 422, decoding, an
unsupported option, a missing checkpoint, a 4xx raised in the service before it is queued)
must therefore still consume its seq_id. `SeqRoute`, the training router's route class,
does that in one place: when a handler raises, it reads model_id and seq_id from the body
(JSON, or the protobuf of /forward_backward) and
- on a refusal the SDK does not retry (4xx but 408/409/429), consumes the seq_id
  (`Service.reject_seq`): the client moves on to the next one;
- on one it retries with the same seq_id (408/409/429, 5xx), marks it in flight
  (`Service.defer_seq`): it must not be skipped while the SDK backs off.
Only for a caller who may see the run (another key's requests never touch it). A body too
broken to name both leaves a gap that the gate's gap policy closes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from tinsmith.api.codecs import seq_address
from tinsmith.api.deps import service
from tinsmith.api.zstd_body import BODY_PREFIX
from tinsmith.scheduler.access import HEADER
from tinsmith.scheduler.service import Service
from tinsmith.types import UserError

log = logging.getLogger("tinsmith.api")
RETRIED = frozenset({408, 409, 429})  # with the 5xx: statuses the SDK retries, same seq_id


def _status_and_reason(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, UserError):
        return exc.status_code, str(exc)
    if isinstance(exc, RequestValidationError):
        return 422, "the request body does not fit the endpoint's schema (HTTP 422)"
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    return 500, "internal error"


async def settle_seq(request: Request, exc: Exception, *, proto: bool) -> None:
    """Consume (or mark in flight) the seq_id of the refused request `request`."""
    status, reason = _status_and_reason(exc)
    try:
        body = await request.body()
    except (RuntimeError, HTTPException, ClientDisconnect):  # never read whole (e.g. 413)
        body = request.scope.get(BODY_PREFIX)  # the start of a zstd body over the limit
        if body is None:
            return
    address = seq_address(body, proto=proto)
    if address is None:
        return
    await run_in_threadpool(_settle, service(request), request.headers.get(HEADER), address,
                            status, reason)


def _settle(svc: Service, api_key: str | None, address: tuple[str, int], status: int,
            reason: str) -> None:
    """The blocking half of settle_seq (authentication may read the database)."""
    try:
        caller = svc.authenticate(api_key)
    except (UserError, HTTPException):  # Unauthorized, or InvalidToken
        return  # no valid key or token: it may not touch any run
    model_id, seq_id = address
    if status in RETRIED or status >= 500:
        svc.defer_seq(model_id, seq_id, caller)
    elif svc.reject_seq(model_id, seq_id, reason, caller):
        log.info("training run %s: seq_id %d consumed by a refused request (%d: %s)",
                 model_id, seq_id, status, reason)


class SeqRoute(APIRoute):
    """An APIRoute whose handler settles the seq_id of every request it refuses."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        proto = self.path.endswith("/forward_backward")

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                try:
                    await settle_seq(request, exc, proto=proto)
                except Exception:  # never hide the refusal itself
                    log.exception("settling the seq_id of a refused request failed")
                raise

        return guarded
