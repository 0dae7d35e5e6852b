"""Request bodies sent with `Content-Encoding: zstd` (the SDK's `proto_compress_fwdbwd`),
decompressed before the routes see them, under the same size limit as plain bodies.

A pure ASGI middleware inside BodyLimit, which bounds the compressed bytes as they arrive.
A zstd body is read whole, then decompressed through a reader that stops after
`max_bytes + 1` output bytes, so a small "zstd bomb" never expands in memory past the limit:
it becomes a 413. The route then sees a plain body (Content-Encoding dropped, Content-Length
set to the decompressed size). A refusal (413 over the limit, 400 for a corrupt frame, 415
for any other encoding) is raised from the route's first body read, as BodyLimit does for a
chunked body, so the training routes' SeqRoute still settles the request's seq_id: on a 413
the first decompressed bytes are left in the scope under BODY_PREFIX for it to read the
request's model_id and seq_id from (tinsmith.api.seq_guard).
"""

from __future__ import annotations

import zstandard
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_PREFIX = "tinsmith.body_prefix"  # scope key: the start of a refused decompressed body
_PREFIX_BYTES = 4096  # enough for the leading fields (model_id, seq_id) of any request
_READ = 1 << 20  # decompressed bytes per read


class ZstdBody:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        encoding = dict(headers).get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if encoding in ("", "identity"):
            await self.app(scope, receive, send)
            return
        kept = [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]
        scope = dict(scope, headers=kept)
        body, error = b"", None
        if encoding != "zstd":
            error = HTTPException(415, f"request bodies with Content-Encoding {encoding!r} are not "
                                       "supported; send the body as it is, or zstd-compressed")
        else:
            try:
                compressed = await _read_all(receive)
            except HTTPException as e:  # BodyLimit: the compressed body alone is over the limit
                error = e
            else:
                body, error = await run_in_threadpool(_decompress, compressed, self.max_bytes)
                if error is not None and error.status_code == 413:
                    scope[BODY_PREFIX] = body
                    body = b""
        if error is None:
            kept.append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if error is not None:
                raise error
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)


async def _read_all(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _decompress(data: bytes, limit: int) -> tuple[bytes, HTTPException | None]:
    """(the decompressed body, None), or (its first bytes, a 413) once it passes `limit`,
    or (b"", a 400) for data that is not zstd. Never holds more than `limit` + one read."""
    parts: list[bytes] = []
    size = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        while chunk := reader.read(_READ):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                prefix = b"".join(parts)[:_PREFIX_BYTES]
                return prefix, HTTPException(413, (
                    f"the zstd-compressed request body ({len(data)} bytes) decompresses to more "
                    f"than this server's limit of {limit} bytes"))
    except zstandard.ZstdError as e:
        return b"", HTTPException(400, f"the request body is not valid zstd data ({e})")
    return b"".join(parts), None
