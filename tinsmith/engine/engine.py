"""The engine of one base model: training runs and samplers as adapters on one runner.

Everything that touches tensors for a base model goes through here, always from the
model's single worker thread (the class is not thread-safe by design). Training runs and
sampler snapshots are separate adapters: a sampler never shares tensors with a live run,
so later training steps cannot change what an existing sampler returns.

Sampler adapters are cached (LRU, `max_sampler_adapters`); ones that came from a stored
checkpoint are reloaded on demand, ephemeral ones (from save_weights_and_get_sampling_client)
live only in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.losses import get_loss
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.types import (
    AdamSpec,
    DatumIn,
    FwdBwdOut,
    LoraSpec,
    NotFound,
    SampleOut,
    SampleSpec,
    UserError,
)

FilesLoader = Callable[[], Mapping[str, bytes]]


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, max_sampler_adapters: int = 16) -> None:
        self.runner = runner
        self.sampler = Sampler(runner, tokenizer)
        self._runs: dict[str, tuple[Adapter, int]] = {}
        self._samplers: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self._max_samplers = max_sampler_adapters

    # ----- training runs ----------------------------------------------------------------
    def create_run(self, run_id: str, spec: LoraSpec) -> None:
        try:
            adapter = Adapter.create(spec, self.runner.layers)
        except ValueError as e:
            raise UserError(str(e)) from e
        self._put_run(run_id, adapter)

    def _put_run(self, run_id: str, adapter: Adapter) -> None:
        self.drop_run(run_id)
        self._runs[run_id] = (adapter, self.runner.attach(adapter))

    def drop_run(self, run_id: str) -> None:
        old = self._runs.pop(run_id, None)
        if old is not None:
            self.runner.detach(old[1])

    def _run(self, run_id: str) -> tuple[Adapter, int]:
        entry = self._runs.get(run_id)
        if entry is None:
            raise NotFound(f"training run {run_id!r} is not loaded on this server")
        return entry

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[DatumIn],
        loss_fn: str,
        config: Mapping[str, float],
        *,
        forward_only: bool,
    ) -> FwdBwdOut:
        """Loss = sum over datums of the loss; gradients accumulate unless forward_only."""
        _, slot = self._run(run_id)
        loss_spec = get_loss(loss_fn)
        lps = self.runner.target_logprobs([(slot, d) for d in data], grad=not forward_only)
        total = torch.zeros(())
        metrics: dict[str, float] = {}
        with torch.set_grad_enabled(not forward_only):
            for d, lp in zip(data, lps):
                inputs = {
                    k: torch.as_tensor(v, dtype=torch.float32)
                    for k, v in d.inputs.items()
                    if k != "target_tokens"
                }
                loss, m = loss_spec.fn(lp, inputs, config)
                total = total + loss
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v
        if not forward_only and total.requires_grad:
            total.backward()
        metrics["loss:sum"] = float(total.detach())
        outputs = [{"logprobs": lp.detach().numpy().astype(np.float32, copy=False)} for lp in lps]
        return FwdBwdOut(outputs=outputs, metrics=metrics)

    def optim_step(self, run_id: str, adam: AdamSpec) -> dict[str, float]:
        adapter, _ = self._run(run_id)
        return adapter.optim_step(adam)

    def export_run(self, run_id: str, base_model: str, *, include_optimizer: bool) -> dict[str, bytes]:
        adapter, _ = self._run(run_id)
        return adapter_to_files(adapter, base_model, include_optimizer=include_optimizer)

    def load_run(self, run_id: str, files: Mapping[str, bytes], *, with_optimizer: bool) -> LoraSpec:
        """Create (or replace) a run from checkpoint files; returns its LoRA spec."""
        try:
            adapter = adapter_from_files(files, self.runner.layers, load_optimizer=with_optimizer)
        except ValueError as e:
            raise UserError(f"cannot load checkpoint: {e}") from e
        self._put_run(run_id, adapter)
        return adapter.spec

    # ----- samplers ---------------------------------------------------------------------
    def snapshot_sampler(self, key: str, run_id: str) -> None:
        """Freeze the run's current weights as sampler adapter `key` (in memory only)."""
        adapter, _ = self._run(run_id)
        self._put_sampler(key, adapter.clone_frozen())

    def _put_sampler(self, key: str, adapter: Adapter) -> None:
        old = self._samplers.pop(key, None)
        if old is not None:
            self.runner.detach(old[1])
        self._samplers[key] = (adapter, self.runner.attach(adapter))
        while len(self._samplers) > self._max_samplers:
            _, (_, slot) = self._samplers.popitem(last=False)
            self.runner.detach(slot)

    def _sampler_slot(self, key: str | None, load: FilesLoader | None) -> int | None:
        if key is None:
            return None
        entry = self._samplers.get(key)
        if entry is None:
            if load is None:
                raise NotFound(
                    f"sampler weights {key!r} are no longer in memory (ephemeral samplers are "
                    "evicted after newer ones); save them with save_weights_for_sampler(name) to keep them"
                )
            try:
                adapter = adapter_from_files(load(), self.runner.layers, load_optimizer=False)
            except ValueError as e:
                raise UserError(f"cannot load sampler weights: {e}") from e
            self._put_sampler(key, adapter.clone_frozen())
            entry = self._samplers[key]
        self._samplers.move_to_end(key)
        return entry[1]

    def sample(self, key: str | None, spec: SampleSpec, load: FilesLoader | None = None) -> SampleOut:
        """Sample with sampler adapter `key` (None = base model); `load` fetches its files
        if it is not cached."""
        return self.sampler.sample(self._sampler_slot(key, load), spec)
