"""The exact local engine: a training and a sampling backend on one shared ModelRunner."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampling import LocalSampler
from tinsmith.engine.training import LocalTrainer


def local_backends(
    runner: ModelRunner, tokenizer, losses: LossRegistry, *, max_sampler_adapters: int = 16,
    spill_dir: Path | None = None, max_resident_runs: int = 1 << 30, kv_cache: str = "slab",
    prefill_chunk: int = 512, cuda_graphs: str = "auto",
) -> tuple[LocalTrainer, LocalSampler]:
    """The pair for one base model: a TrainingBackend and a SamplingBackend (backend.py),
    typed as the local classes so tests can look inside. Spilled runs and spilled unsaved
    samplers share `spill_dir` (default: a fresh folder in the system's temporary directory).
    `kv_cache`, `prefill_chunk` and `cuda_graphs` are the sampler's (sampler.Sampler,
    docs/sampling.md)."""
    spill_dir = spill_dir or Path(tempfile.gettempdir()) / f"tinsmith-spill-{uuid.uuid4().hex}"
    trainer = LocalTrainer(runner, losses, spill_dir, max_resident_runs)
    sampler = LocalSampler(runner, tokenizer, spill_dir, max_sampler_adapters,
                           kv_cache=kv_cache, prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs)
    return trainer, sampler

