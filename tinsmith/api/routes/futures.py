"""retrieve_future: long-poll until a result is ready, or answer try_again.

Never answer "not ready" at once: the SDK re-polls immediately, so an instant answer
would be a hot loop. A result is JSON, or protobuf for ForwardBackwardOutput and
SampleResponse (the SDK accepts only protobuf for those).

An id from before a server restart is answered 404 (the SDK raises on it at once; 410
would make it resubmit) with a body that says the request was lost and how to resume.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from tinker.types import FutureRetrieveRequest

from tinsmith.api.auth import CallerDep
from tinsmith.api.codecs import encode_forward_backward, encode_sample
from tinsmith.api.deps import service
from tinsmith.scheduler.futures import LostRequest
from tinsmith.types import FwdBwdOut, NotFound, SampleOut

router = APIRouter(prefix="/api/v1")
PROTO = "application/x-protobuf"


@router.post("/retrieve_future", response_model=None)
async def retrieve_future(
    req: FutureRetrieveRequest, request: Request, caller: CallerDep
) -> Response | dict[str, object]:
    svc = service(request)
    try:  # someone else's request reads as an unknown one
        done, value, error = await svc.futures.wait(req.request_id, svc.settings.long_poll_s, caller)
    except LostRequest:
        raise NotFound(
            f"request {req.request_id!r} was lost: the server restarted after accepting it, "
            "so its result is gone. Resume from your last checkpoint "
            "(ServiceClient.create_training_client_from_state(<path>)) and go on from there"
        ) from None
    except KeyError:
        raise NotFound(f"unknown or expired request_id {req.request_id!r}") from None
    if not done:
        return {"type": "try_again", "request_id": req.request_id, "queue_state": "active"}
    if error is not None:
        return {"error": error.message, "category": error.category}
    if isinstance(value, FwdBwdOut):
        return Response(encode_forward_backward(value), media_type=PROTO)
    if isinstance(value, SampleOut):
        return Response(encode_sample(value), media_type=PROTO)
    assert isinstance(value, dict)
    return value
