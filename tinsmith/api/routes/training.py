"""Training runs: create, info, forward/backward, optimizer steps, save and load."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from tinker.types import (
    AdamParams,
    CreateModelRequest,
    DimuonParams,
    GetInfoRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
)

from tinsmith.api.auth import CallerDep
from tinsmith.api.codecs import decode_forward_backward
from tinsmith.api.deps import future_response, service
from tinsmith.api.seq_guard import SeqRoute
from tinsmith.types import AdamSpec, DimuonSpec, LoraSpec, OptimizerConfig, OptimSpec, UserError

# Every refusal of a request that names (model_id, seq_id) consumes that seq_id (seq_guard).
router = APIRouter(prefix="/api/v1", route_class=SeqRoute)


@router.post("/create_model")
def create_model(req: CreateModelRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    optimizer = _optimizer_config(req.optimizer_config)
    lc = req.lora_config
    lora = LoraSpec() if lc is None else LoraSpec(
        rank=lc.rank, seed=lc.seed, train_mlp=lc.train_mlp, train_attn=lc.train_attn,
        train_unembed=lc.train_unembed,
    )
    svc = service(request)
    rid, model_id = svc.create_model(
        session_id=req.session_id, model_seq_id=req.model_seq_id, base_model=req.base_model,
        lora=lora, user_metadata=req.user_metadata, caller=caller, optimizer=optimizer,
    )
    return future_response(rid, model_id)


def _optimizer_config(config: BaseModel) -> OptimizerConfig:
    """The SDK's AdamOptimizerConfig / DimuonOptimizerConfig (or any `type` it may send):
    an unknown type, version or field is a 400, never a silent AdamW."""
    return OptimizerConfig.from_json(config.model_dump())


@router.post("/get_info")
def get_info(req: GetInfoRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    return service(request).get_info(req.model_id, caller)


@router.post("/forward_backward")
async def forward_backward(request: Request, caller: CallerDep) -> dict[str, object]:
    if request.headers.get("content-encoding", "").lower() not in ("", "identity"):
        raise UserError("compressed /forward_backward bodies are not supported by this server", 415)
    fb = decode_forward_backward(await request.body())
    rid = await run_in_threadpool(
        service(request).forward_backward, fb.model_id, fb.seq_id, fb.data, fb.loss_fn,
        fb.loss_fn_config, forward_only=fb.forward_only, caller=caller,
    )
    return future_response(rid, fb.model_id)


@router.post("/optim_step")
def optim_step(req: OptimStepRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    params = _optim_spec(req.optim_params)
    svc = service(request)
    rid = svc.optim_step(req.model_id, _seq(req.seq_id), params, caller)
    return future_response(rid, req.model_id)


def _optim_spec(p: BaseModel) -> OptimSpec:
    """AdamParams (`adam_params`) or DimuonParams (`optimizer_params`, which the SDK's union
    decodes as a bare OptimParamsBase: checked here against DimuonParams' own schema)."""
    if isinstance(p, AdamParams):
        return AdamSpec(p.learning_rate, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm)
    fields = p.model_dump()
    if fields.get("type") != "dimuon":
        raise UserError(f"unknown optimizer params type {fields.get('type')!r}: this server takes "
                        "AdamParams (adamw runs) and DimuonParams (dimuon runs)")
    try:
        d = DimuonParams.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(f"bad DimuonParams: {problems}") from e
    return DimuonSpec(d.learning_rate, d.grad_clip_norm, d.beta1)


@router.post("/save_weights")
def save_weights(req: SaveWeightsRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    rid = svc.save(
        req.model_id, _seq(req.seq_id), kind="weights", name=req.path or "", ttl_seconds=req.ttl_seconds,
        overwrite=req.overwrite, user_metadata=req.user_metadata, caller=caller,
    )
    return future_response(rid, req.model_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    req: SaveWeightsForSamplerRequest, request: Request, caller: CallerDep
) -> dict[str, object]:
    """Named: a sampler checkpoint (always a snapshot). Unnamed: a new sampling session over
    the current weights, kind "snapshot" (fixed) or "inflight" (the run's shared target)."""
    svc = service(request)
    if req.path is None:
        if req.sampling_session_seq_id is None:
            raise UserError("save_weights_for_sampler needs a name (path) or a sampling_session_seq_id")
        rid = svc.save_ephemeral_sampler(req.model_id, _seq(req.seq_id), req.sampling_session_seq_id,
                                         caller, kind=req.kind)
    elif req.kind != "snapshot":
        raise UserError(f"kind={req.kind!r} is for save_weights_and_get_sampling_client (no name); "
                        "a named save_weights_for_sampler is always a snapshot")
    else:
        rid = svc.save(
            req.model_id, _seq(req.seq_id), kind="sampler_weights", name=req.path,
            ttl_seconds=req.ttl_seconds, overwrite=True, user_metadata=req.user_metadata,
            caller=caller,
        )
    return future_response(rid, req.model_id)


@router.post("/load_weights")
def load_weights(req: LoadWeightsRequest, request: Request, caller: CallerDep) -> dict[str, object]:
    svc = service(request)
    rid, model_id = svc.load_weights(
        path=req.path, optimizer=req.optimizer, session_id=req.session_id,
        model_seq_id=req.model_seq_id, model_id=req.model_id, seq_id=req.seq_id,
        base_model=req.base_model, user_metadata=req.user_metadata, caller=caller,
        optimizer_config=None if req.optimizer_config is None else _optimizer_config(req.optimizer_config),
    )
    return future_response(rid, model_id)


@router.post("/save_weights_external")
def save_weights_external(
    req: SaveWeightsExternalRequest, request: Request, caller: CallerDep
) -> dict[str, object]:
    """A PEFT adapter folder, tinker://<run>/external_weights/<name>: its files download
    through get_external_weights_urls (tinsmith.api.routes.downloads)."""
    if req.age_encryption_recipients:
        raise UserError("age_encryption_recipients is not supported by this server")
    rid = service(request).save(
        req.model_id, _seq(req.seq_id), kind="external_weights", name=req.path,
        ttl_seconds=req.ttl_seconds, overwrite=True, user_metadata=None, caller=caller,
    )
    return future_response(rid, req.model_id)


def _seq(seq_id: int | None) -> int:
    if seq_id is None:
        raise UserError("seq_id is required")
    return seq_id
