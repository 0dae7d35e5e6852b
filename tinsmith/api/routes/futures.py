"""retrieve_future: long-poll until a result is ready, or answer try_again.

Never answer "not ready" at once: the SDK re-polls immediately, so an instant answer
would be a hot loop. A result is JSON, or protobuf for ForwardBackwardOutput and
SampleResponse (the SDK accepts only protobuf for those).

An id from before a server restart is answered 404 (the SDK raises on it at once; 410
would make it resubmit) with a body that says the request was lost and how to resume.

retrieve_futures is the batched form the SDK uses for sampling when /client/config says
`sample_use_retrieve_futures`: one long poll per sampling client reports which of its
requests finished or failed (JSON), and the client then fetches each payload with
retrieve_future. cancel_future stops a request that has not started (see
tinsmith.scheduler.futures); the SDK sends it for abandoned samples and ignores the answer.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from tinker.types import FutureRetrieveRequest, FuturesRetrieveRequest

from tinsmith.api.auth import CallerDep
from tinsmith.api.codecs import encode_forward_backward, encode_sample
from tinsmith.api.deps import service
from tinsmith.scheduler.futures import LostRequest
from tinsmith.scheduler.sampler_ops import feed_key
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
    except KeyError as e:
        raise _unknown(req.request_id, e) from None
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


def _unknown(request_id: str, e: KeyError) -> NotFound:
    if isinstance(e, LostRequest):
        return NotFound(
            f"request {request_id!r} was lost: the server restarted after accepting it, "
            "so its result is gone. Resume from your last checkpoint "
            "(ServiceClient.create_training_client_from_state(<path>)) and go on from there"
        )
    return NotFound(f"unknown or expired request_id {request_id!r}")


@router.post("/retrieve_futures")
async def retrieve_futures(
    req: FuturesRetrieveRequest, request: Request, caller: CallerDep
) -> dict[str, object]:
    svc = service(request)
    target = req.target
    await run_in_threadpool(svc.sampler, target.sampling_session_id, caller)  # NotFound if not theirs
    svc.futures.release(req.retrieved_request_ids, caller)
    long_poll = svc.settings.long_poll_s
    timeout = long_poll if req.timeout is None else min(max(req.timeout, 0.0), long_poll)
    events, cursor = await svc.futures.completions(
        feed_key(target.sampling_session_id, target.cloned_sampler_id), req.prev_cursor, timeout)
    return {"completions": [{"state": "failed" if failed else "finished", "request_id": rid}
                            for rid, failed in events],
            "cursor": cursor}


class CancelFutureRequest(BaseModel):
    request_id: str


@router.post("/cancel_future")
def cancel_future(req: CancelFutureRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    """state "cancelled": it had not started and never will (a retrieve_future of it says
    so); "running": it has started and runs to the end; "done": it had finished."""
    try:
        state = service(request).futures.cancel(req.request_id, caller)
    except KeyError as e:
        raise _unknown(req.request_id, e) from None
    return {"request_id": req.request_id, "state": state, "cancelled": state == "cancelled"}
