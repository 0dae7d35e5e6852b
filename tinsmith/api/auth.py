"""Authentication: the caller of each request, from its `X-API-Key` header.

Every router but the health probes depends on `current_caller` (see app.py), so a request
without a valid key never reaches a handler once the server has keys; handlers that act on
something take `caller: CallerDep` and hand it to the service, which decides what the
caller may see (tinsmith.scheduler.access).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from tinsmith.api.deps import service
from tinsmith.scheduler.access import HEADER, Caller


def current_caller(request: Request) -> Caller:
    """A plain `def`: a key the cache does not hold is read from the database, so FastAPI
    runs this in its threadpool, off the event loop."""
    return service(request).authenticate(request.headers.get(HEADER))


CallerDep = Annotated[Caller, Depends(current_caller)]
