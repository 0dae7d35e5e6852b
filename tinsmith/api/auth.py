"""Authentication: the caller of each request, from its `X-API-Key` header.

Every router but the health probes depends on `current_caller` (see app.py), so a request
without a valid key never reaches a handler once the server has keys; handlers that act on
something take `caller: CallerDep` and hand it to the service, which decides what the
caller may see (tinsmith.scheduler.access).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from tinsmith.api.deps import service
from tinsmith.scheduler.access import HEADER, Caller
from tinsmith.scheduler.tokens import TOKEN_PREFIX


async def current_caller(request: Request) -> Caller:
    """On the event loop when the key cache answers (nearly always: every request of a
    training step needs this, and a threadpool hop would add two thread switches to each);
    a key the cache does not hold is read from the database in the threadpool."""
    svc = service(request)
    key = request.headers.get(HEADER)
    caller = svc.keys.cached(key)
    if caller is not None:
        return caller
    if key and key.startswith(TOKEN_PREFIX):  # a token from /auth/token (scheduler/tokens.py)
        caller = svc.tokens.cached(key)
        if caller is not None:
            return caller
    return await run_in_threadpool(svc.authenticate, key)


CallerDep = Annotated[Caller, Depends(current_caller)]
