"""Refuse request bodies over `ServerSettings.max_body_bytes` with a 413, before parsing.

A pure ASGI middleware: a Content-Length over the limit is answered at once, without
reading the body; a body without one (chunked) is counted as it streams in, and the read
that crosses the limit raises a 413 HTTPException, which FastAPI passes through its body
parsing and answers as JSON. Nothing over the limit is ever held in memory.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large(size: str, limit: int) -> str:
    return f"request body of {size} bytes is over this server's limit of {limit} bytes"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": _too_large(length.decode(), self.max_bytes)},
                                    status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _too_large(f"more than {self.max_bytes}", self.max_bytes))
            return message

        await self.app(scope, limited, send)
