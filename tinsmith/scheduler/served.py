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
from tinsmith.engine.device import placement
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sharded import GroupSpec, sharded_backends
from tinsmith.engine.vision import Vision
from tinsmith.models import resolve_model_dir
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.worker import EngineWorker

log = logging.getLogger("tinsmith.models")


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

    def close(self) -> None:
        """Stop the engine's own processes, if its backends have any (a sharded group)."""
        close = getattr(self.trainer, "close", None)
        if close is not None:
            close()
    vision: Vision | None = None  # a vision-language model's image checks (engine/vision.py)


def load_model(
    name: str, settings: ServerSettings, futures: FutureStore, losses: LossRegistry
) -> ModelHandle:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    model_dir = resolve_model_dir(name, settings.cache_dir)  # may convert once, with progress
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise in a server log
    runner = ModelRunner(model_dir, name, placement(settings.device, settings.dtype),
                         exact_packing=settings.exact_packing)
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
    free = free_memory_bytes(runner.model.device)
    resident = settings.max_resident_adapters or resident_runs_budget(
        adapter_layer_shapes(runner.layers.values()), free, 0.25)
    spill_dir = settings.data_dir / "spill" / name.replace("/", "--")
    shutil.rmtree(spill_dir, ignore_errors=True)  # a spill never outlives its server
    trainer: TrainingBackend
    sampler: SamplingBackend
    if settings.devices > 1:  # training sharded over a rank group; `runner` only samples
        trainer, sampler = sharded_backends(
            _group_spec(name, model_dir, settings, runner), runner, tokenizer,
            max_sampler_adapters=settings.max_sampler_adapters, spill_dir=spill_dir)
    else:
        trainer, sampler = local_backends(
            runner, tokenizer, losses, max_sampler_adapters=settings.max_sampler_adapters,
            spill_dir=spill_dir, max_resident_runs=resident, kv_cache=settings.sampler_kv_cache,
            prefill_chunk=settings.prefill_chunk_tokens)
    linger_ms = (settings.pack_linger_ms if settings.pack_linger_ms is not None
                 else 10.0 if runner.device.type == "cuda" else 0.0)
    fraction = settings.pass_memory_fraction or (0.5 if runner.device.type == "cuda" else 0.25)
    pass_tokens = settings.pass_tokens or pass_token_budget(
        runner.config, free, fraction, runner.device.type)
    runs = (f"training sharded over {settings.devices} rank processes (docs/scale-out.md)"
            if settings.devices > 1 else f"{resident} training runs stay resident")
    log.info("serving %s from %s on %s in %s (%s packing); a training pass holds up to %d "
             "tokens, %s", name, model_dir, runner.device, str(runner.dtype).removeprefix("torch."),
             "exact" if runner.exact_packing else "shared-GEMM", pass_tokens, runs)
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


def _group_spec(name: str, model_dir: Path, settings: ServerSettings, runner: ModelRunner) -> GroupSpec:
    """The rank group of a sharded model: `settings.devices` GPUs from cuda:0 when the
    server's device is a GPU, else as many CPU processes (docs/scale-out.md)."""
    import torch

    n = settings.devices
    on_gpu = runner.device.type == "cuda"
    if on_gpu and n > torch.cuda.device_count():
        raise ValueError(f"--devices {n} asked for, but only {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")
    return GroupSpec(world=n, model_dir=str(model_dir), name=name,
                     device_type="cuda" if on_gpu else "cpu",
                     dtype=str(runner.dtype).removeprefix("torch."),
                     exact_packing=settings.exact_packing, loss_modules=settings.loss_modules)
