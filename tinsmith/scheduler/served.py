"""Served base models: each one loaded once, with its training and sampling backends
(tinsmith/engine/backend.py) and its worker thread."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tinsmith.config import ServerSettings
from tinsmith.engine.backend import SamplingBackend, TrainingBackend
from tinsmith.engine.budget import (
    adapter_layer_shapes,
    free_memory_bytes,
    pass_token_budget,
    resident_runs_budget,
)
from tinsmith.engine.device import Placement, placement
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.replicas import replicated_backends
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sharded import GroupSpec, sharded_backends
from tinsmith.engine.vision import Vision
from tinsmith.models import resolve_model_dir
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.worker import EngineWorker

log = logging.getLogger("tinsmith.models")
SHAPES_ONLY = "%s: this process holds the model's shapes only; rank processes train, vLLM samples"


@dataclass
class ModelHandle:
    name: str
    model_dir: Path
    trainer: TrainingBackend
    sampler: SamplingBackend
    worker: EngineWorker
    vocab_size: int
    max_context: int
    arch: str
    eos_token_ids: tuple[int, ...]
    vision: Vision | None = None  # a vision-language model's image checks (engine/vision.py)

    def close(self) -> None:
        """Stop the engine's own processes, if its backends have any (a sharded group, a
        vLLM server)."""
        for backend in (self.trainer, self.sampler):
            close = getattr(backend, "close", None)
            if close is not None:
                close()


def load_model(
    name: str, settings: ServerSettings, futures: FutureStore, losses: LossRegistry
) -> ModelHandle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    model_dir = resolve_model_dir(name, settings.cache_dir)  # may convert once, with progress
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise in a server log
    place = placement(settings.device, settings.dtype)
    grouped = settings.devices > 1 or settings.sharded or settings.replicas != 1
    # Rank groups train and vLLM samples: this process needs the model's shapes only, so a
    # base too big for one device is never loaded whole here (docs/scale-out.md, Sampling).
    shapes_only = grouped and settings.sampler == "vllm"
    runner = ModelRunner(model_dir, name,
                         place.shapes_only() if shapes_only else place,
                         exact_packing=settings.exact_packing,
                         compile_passes="inductor" if settings.compile_passes and not grouped else None)
    if shapes_only:
        log.info(SHAPES_ONLY, name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos: set[int] = set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    try:
        gen_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        gen_eos = None
    if gen_eos is not None:
        eos.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    free = free_memory_bytes(place.device)
    resident = settings.max_resident_adapters or resident_runs_budget(
        adapter_layer_shapes(runner.layers.values()), free, 0.25)
    spill_dir = settings.data_dir / "spill" / name.replace("/", "--")
    shutil.rmtree(spill_dir, ignore_errors=True)  # a spill never outlives its server
    trainer: TrainingBackend
    sampler: SamplingBackend
    if settings.replicas != 1:  # M rank groups, each run on one (docs/scale-out.md, Replicas)
        trainer, sampler = replicated_backends(
            _group_spec(name, model_dir, settings, place), settings.replicas, runner, tokenizer,
            max_sampler_adapters=settings.max_sampler_adapters, spill_dir=spill_dir)
    elif grouped:  # training sharded over a rank group; `runner` only samples
        trainer, sampler = sharded_backends(
            _group_spec(name, model_dir, settings, place), runner, tokenizer,
            max_sampler_adapters=settings.max_sampler_adapters, spill_dir=spill_dir)
    else:
        trainer, sampler = local_backends(
            runner, tokenizer, losses, max_sampler_adapters=settings.max_sampler_adapters,
            spill_dir=spill_dir, max_resident_runs=resident, kv_cache=settings.sampler_kv_cache,
            prefill_chunk=settings.prefill_chunk_tokens, cuda_graphs=settings.sampler_cuda_graphs)
    if settings.sampler == "vllm":  # training stays native; sampling goes to vLLM
        sampler = _vllm_sampler(name, model_dir, settings, runner, place, tokenizer)
    elif settings.sampler != "native":
        raise ValueError(f"sampler must be 'native' or 'vllm', not {settings.sampler!r}")
    linger_ms = (settings.pack_linger_ms if settings.pack_linger_ms is not None
                 else 10.0 if place.on_gpu else 0.0)
    fraction = settings.pass_memory_fraction or (0.5 if place.on_gpu else 0.25)
    pass_tokens = settings.pass_tokens or pass_token_budget(
        runner.config, free, fraction, place.device.type)
    runs = (f"training sharded over {settings.devices} rank processes (docs/scale-out.md)"
            if grouped else f"{resident} training runs stay resident")
    if settings.replicas > 1:
        runs = (f"training on {settings.replicas} engine replicas of {settings.devices} rank "
                "process(es) each (docs/scale-out.md)")
    log.info("serving %s from %s on %s in %s (%s packing); a training pass holds up to %d "
             "tokens, %s", name, model_dir, place.device, str(place.dtype).removeprefix("torch."),
             "exact" if runner.exact_packing else
             "shared-GEMM, compiled" if runner.compiled is not None else "shared-GEMM", pass_tokens, runs)
    return ModelHandle(
        name=name,
        model_dir=model_dir,
        trainer=trainer,
        sampler=sampler,
        worker=EngineWorker(name, futures, sampler, pass_tokens=pass_tokens, linger_s=linger_ms / 1e3),
        vocab_size=runner.vocab_size,
        max_context=runner.max_context,
        arch=runner.arch,
        eos_token_ids=tuple(sorted(eos)),
        vision=runner.vision and runner.vision.set_limits(settings.max_image_bytes, settings.max_image_pixels),
    )


def _group_spec(name: str, model_dir: Path, settings: ServerSettings, place: Placement) -> GroupSpec:
    """The rank group of a sharded model: `settings.devices` GPUs from cuda:0 when the
    server's device is a GPU, else as many CPU processes (docs/scale-out.md)."""
    import torch

    n = settings.devices
    here = settings.local_ranks if settings.group_listen else n  # the rest join from workers
    on_gpu = place.on_gpu
    if on_gpu and here > torch.cuda.device_count():
        raise ValueError(f"{here} local rank(s) asked for, but only {torch.cuda.device_count()} "
                         "CUDA device(s) are visible")
    return GroupSpec(world=n, model_dir=str(model_dir), name=name,
                     device_type="cuda" if on_gpu else "cpu",
                     dtype=str(place.dtype).removeprefix("torch."),
                     exact_packing=settings.exact_packing, loss_modules=settings.loss_modules,
                     listen=settings.group_listen, local_ranks=settings.local_ranks,
                     token=settings.group_token, join_timeout_s=settings.group_join_timeout_s)


def _vllm_sampler(name: str, model_dir: Path, settings: ServerSettings, runner: ModelRunner,
                  place: Placement, tokenizer) -> SamplingBackend:
    """The vLLM sampling backend (engine/vllm_sampler.py) of a model, whatever its trainer
    (local, a rank group, replicas): snapshots reach it as PEFT folders under
    <data_dir>/vllm-adapters."""
    from tinsmith.engine.checkpoint import adapter_to_files
    from tinsmith.engine.sharded.trainer import snapshot_adapter
    from tinsmith.engine.vllm_sampler import VllmLimits, vllm_sampler

    safe = name.replace("/", "--")
    limits = VllmLimits(vocab_size=runner.vocab_size, max_context=runner.max_context,
                        max_adapters=settings.max_sampler_adapters,
                        max_lora_rank=settings.vllm_max_lora_rank,
                        max_logprobs=settings.vllm_max_logprobs)
    return vllm_sampler(
        name=name, model_dir=model_dir, tokenizer=tokenizer, limits=limits,
        adapter_dir=(settings.data_dir / "vllm-adapters" / safe).resolve(),
        # A local trainer's snapshot is an Adapter, a rank group's its host factors.
        snapshot_files=lambda snap: adapter_to_files(snapshot_adapter(snap), name, include_optimizer=False),
        url=settings.vllm_url, python=settings.vllm_python,
        dtype=str(place.dtype).removeprefix("torch."),
        eager=not place.on_gpu, tensor_parallel=settings.vllm_tensor_parallel,
        log_file=(settings.data_dir / f"vllm-{safe}.log").resolve())
