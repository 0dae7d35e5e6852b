"""Sampling sessions and sampling requests."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response
from tinker.types import CreateSamplingSessionRequest, JoinSamplingSessionRequest, SampleRequest

from tinsmith.api.auth import CallerDep
from tinsmith.api.codecs import sample_spec
from tinsmith.api.deps import future_response, service

router = APIRouter(prefix="/api/v1")


@router.post("/create_sampling_session")
def create_sampling_session(
    req: CreateSamplingSessionRequest, request: Request, caller: CallerDep
) -> dict[str, object]:
    sid = service(request).create_sampling_session(
        session_id=req.session_id, sampling_session_seq_id=req.sampling_session_seq_id,
        base_model=req.base_model, model_path=req.model_path, caller=caller,
    )
    return {"sampling_session_id": sid, "type": "create_sampling_session"}


@router.post("/join_sampling_session")
def join_sampling_session(
    req: JoinSamplingSessionRequest, request: Request, caller: CallerDep
) -> dict[str, object]:
    """An unpickled SamplingClient's clone id (with `sample_join_sampling_session` on)."""
    clone = service(request).join_sampling_session(req.sampling_session_id, caller)
    return {"client_counter": clone, "type": "join_sampling_session"}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    return service(request).get_sampler_info(sampler_id, caller)


@router.post("/asample")
def asample(req: SampleRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    sampler_id = req.sampling_session_id
    if sampler_id is None:  # older clients name the model per request
        session_id = f"adhoc-{uuid.uuid4().hex[:12]}"
        if not caller.open:  # keyed callers sample in sessions of their own
            session_id = svc.create_session(tags=["adhoc"], user_metadata=None, display_name=None,
                                            project_id=None, sdk_version=None, caller=caller)
        sampler_id = svc.create_sampling_session(
            session_id=session_id, sampling_session_seq_id=0,
            base_model=req.base_model, model_path=req.model_path, caller=caller,
        )
    handle = svc.sampler(sampler_id, caller).handle
    spec = sample_spec(
        req.prompt, req.num_samples, req.sampling_params, eos_token_ids=handle.eos_token_ids,
        prompt_logprobs=bool(req.prompt_logprobs), prompt_logprobs_last_n=req.prompt_logprobs_last_n,
        topk_prompt_logprobs=req.topk_prompt_logprobs, topk_sample_logprobs=req.topk_sample_logprobs,
        target_prompt_logprobs=req.target_prompt_logprobs, prompt_alt_tokens_k=req.prompt_alt_tokens_k,
    )
    seq_id = req.seq_id if req.seq_id is not None else -uuid.uuid4().int % (1 << 62)
    rid, seq_ids = svc.sample(sampler_id, seq_id, spec,
                              record_stability_info=bool(req.record_stability_info))
    return future_response(rid, None, sample_sequence_ids=seq_ids)


# Sampling records (record_stability_info) read back, images included: the record names each
# image of its prompt by SHA-256 and the second route gives its bytes (content-addressed on
# the server: an image sent many times is stored once).
_IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


@router.get("/sampling_records/{sequence_id}")
def get_sampling_record(sequence_id: str, request: Request, caller: CallerDep) -> dict[str, object]:
    rec = service(request).sampling_record(sequence_id, caller)
    return {
        "sequence_id": rec.sequence_id,
        "prompt_tokens": rec.prompt.tolist(),  # -1 at image positions
        "tokens": rec.tokens.tolist(),
        "logprobs": rec.logprobs.tolist(),
        "images": [{"index": k, "sha256": im.sha256, "format": im.format, "offset": im.at,
                    "expected_tokens": im.length or None, "size_bytes": im.size,
                    "url": f"/api/v1/sampling_records/{sequence_id}/images/{k}"}
                   for k, im in enumerate(rec.images)],
    }


@router.get("/sampling_records/{sequence_id}/images/{index}")
def get_sampling_record_image(sequence_id: str, index: int, request: Request,
                              caller: CallerDep) -> Response:
    im, data = service(request).sampling_record_image(sequence_id, index, caller)
    return Response(data, media_type=_IMAGE_TYPES.get(im.format, "application/octet-stream"),
                    headers={"X-Content-SHA256": im.sha256})
