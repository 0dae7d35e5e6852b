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

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.losses import LossBatch, LossRegistry
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
    def __init__(
        self, runner: ModelRunner, tokenizer, losses: LossRegistry, max_sampler_adapters: int = 16
    ) -> None:
        self.runner = runner
        self.losses = losses
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
        """One loss over the whole request; gradients accumulate unless forward_only.

        `data` was validated against the loss at submission (validation.check_data), and
        carries any server-side inputs (recorded sampler logprobs) the loss needs.
        """
        _, slot = self._run(run_id)
        spec = self.losses.get(loss_fn)
        active = [spec.grad_positions(d.inputs) if spec.grad_positions else None for d in data]
        lps = self.runner.target_logprobs([(slot, d) for d in data], grad=not forward_only, active=active)
        with torch.set_grad_enabled(not forward_only):
            keys = {*spec.required_inputs, *spec.optional_inputs, *spec.server_inputs}
            inputs = [
                {k: torch.as_tensor(v, dtype=lp.dtype) for k, v in d.inputs.items() if k in keys}
                for d, lp in zip(data, lps)
            ]
            loss, metrics = spec.fn(LossBatch.from_datums(lps, inputs), {**spec.config, **config})
        if loss.dim() != 0:
            raise RuntimeError(f"loss {loss_fn!r} returned shape {list(loss.shape)}, not a scalar")
        bad = [k for k in metrics if k.count(":") != 1]
        if bad:
            raise RuntimeError(f"loss {loss_fn!r} returned metric keys {bad}; use 'name:reduction'")
        value = float(loss.detach())
        if not math.isfinite(value):
            # Nothing was backpropagated, so the run's accumulated gradients are intact.
            raise UserError(
                f"loss {loss_fn!r} is not finite ({value}) for this batch: check the inputs "
                "(e.g. sampler logprobs far below the learner's make exp(lp - logprobs) overflow)"
            )
        if not forward_only and loss.requires_grad:
            loss.backward()
        metrics = {**metrics, "loss:sum": value}
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
