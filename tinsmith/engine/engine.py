"""The engine of one base model: training runs and samplers as adapters on one runner.

Everything that touches tensors for a base model goes through here, always from the
model's single worker thread (the class is not thread-safe by design). Training runs and
sampler snapshots are separate adapters: a sampler never shares tensors with a live run,
so later training steps cannot change what an existing sampler returns.

Sampler adapters are cached (LRU, `max_sampler_adapters`); ones that came from a stored
checkpoint are reloaded on demand, ephemeral ones (from save_weights_and_get_sampling_client)
live only in memory. Sampling is continuous (see sampler.py): `start_sample` admits a request
and `step` advances every request in flight; a slot stays attached while a request decodes
with it (pinned), even if the cache evicts or replaces its key meanwhile.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.losses import LossBatch, LossRegistry, LossSpec
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import OnDone, Sampler
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


@dataclass(frozen=True)
class TrainWork:
    """One forward or forward_backward request of one run."""

    run_id: str
    data: Sequence[DatumIn]
    loss_fn: str
    config: Mapping[str, float]


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
        self._pins: Counter[int] = Counter()  # sampler slot -> requests decoding with it
        self._unpinned_detach: set[int] = set()  # slots to detach once their last request ends

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

    def forward_backward_many(
        self, works: Sequence[TrainWork], *, forward_only: bool
    ) -> list[FwdBwdOut | Exception]:
        """Several requests in one pass of the base model: each its own run's adapter, its own
        loss over its own datums, its own result (or the exception that failed it alone).

        Every work's `data` was validated against its loss at submission
        (validation.check_data) and carries any server-side inputs the loss needs. With
        gradients, the works must belong to different runs: the works' losses are summed and
        backpropagated once, and since a row depends only on its own run's adapter, each run
        receives exactly its own loss's gradient. A work that fails (unknown run, a loss that
        raises or is not finite) is left out of the sum and its run's gradients are untouched.
        """
        results: list[FwdBwdOut | Exception | None] = [None] * len(works)
        slots: dict[int, int] = {}
        specs: dict[int, LossSpec] = {}
        for i, w in enumerate(works):
            try:
                slots[i] = self._run(w.run_id)[1]
                specs[i] = self.losses.get(w.loss_fn)
            except Exception as e:
                results[i] = e
        live = [i for i in range(len(works)) if i in specs]
        assert forward_only or len({works[i].run_id for i in live}) == len(live), "one work per run"
        rows, active, owner = [], [], []
        for i in live:
            spec = specs[i]
            for d in works[i].data:
                rows.append((slots[i], d))
                active.append(spec.grad_positions(d.inputs) if spec.grad_positions else None)
                owner.append(i)
        lps = (self.runner.target_logprobs(rows, grad=not forward_only, active=active, parts=owner)
               if rows else [])
        losses: list[torch.Tensor] = []
        idle: list[torch.Tensor] = []  # gradless parameters of runs with no loss to backpropagate
        start = 0
        for i in live:  # each work's rows are consecutive in `rows`, hence in `lps`
            mine = lps[start : start + len(works[i].data)]
            start += len(works[i].data)
            try:
                loss, out = self._loss(works[i], specs[i], mine, forward_only)
                results[i] = out
            except Exception as e:
                results[i] = e
                loss = None
            if forward_only:
                continue
            if loss is not None and loss.requires_grad:
                losses.append(loss)
            else:
                idle += [p for p in self._run(works[i].run_id)[0].parameters() if p.grad is None]
        if losses:
            # One backward for every run in the pass. Other runs' losses send exact zeros to a
            # run's rows, so each run's gradient is its own loss's.
            torch.autograd.backward(losses)
            for p in idle:  # a zero-filled grad would still move AdamW's moments and decay
                p.grad = None
        return results  # type: ignore[return-value]

    @staticmethod
    def _loss(
        work: TrainWork, spec: LossSpec, lps: list[torch.Tensor], forward_only: bool
    ) -> tuple[torch.Tensor, FwdBwdOut]:
        """A work's loss (a scalar, still in the graph) and its result, from its logprobs."""
        with torch.set_grad_enabled(not forward_only):
            keys = {*spec.required_inputs, *spec.optional_inputs, *spec.server_inputs}
            inputs = [
                {k: torch.as_tensor(v, dtype=lp.dtype) for k, v in d.inputs.items() if k in keys}
                for d, lp in zip(work.data, lps)
            ]
            loss, metrics = spec.fn(LossBatch.from_datums(lps, inputs), {**spec.config, **work.config})
        name = work.loss_fn
        if loss.dim() != 0:
            raise RuntimeError(f"loss {name!r} returned shape {list(loss.shape)}, not a scalar")
        bad = [k for k in metrics if k.count(":") != 1]
        if bad:
            raise RuntimeError(f"loss {name!r} returned metric keys {bad}; use 'name:reduction'")
        value = float(loss.detach())
        if not math.isfinite(value):
            # Left out of the backward, so the run's accumulated gradients stay intact.
            raise UserError(
                f"loss {name!r} is not finite ({value}) for this batch: check the inputs "
                "(e.g. sampler logprobs far below the learner's make exp(lp - logprobs) overflow)"
            )
        metrics = {**metrics, "loss:sum": value}
        outputs = [{"logprobs": lp.detach().numpy().astype(np.float32, copy=False)} for lp in lps]
        return loss, FwdBwdOut(outputs=outputs, metrics=metrics)

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
            self._release(old[1])
        self._samplers[key] = (adapter, self.runner.attach(adapter))
        while len(self._samplers) > self._max_samplers:
            _, (_, slot) = self._samplers.popitem(last=False)
            self._release(slot)

    def _release(self, slot: int) -> None:
        """Detach a sampler slot now, or when the last request decoding with it ends."""
        if self._pins[slot] > 0:
            self._unpinned_detach.add(slot)
        else:
            self.runner.detach(slot)

    def _unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] <= 0:
            del self._pins[slot]
            if slot in self._unpinned_detach:
                self._unpinned_detach.discard(slot)
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

    def start_sample(
        self, key: str | None, spec: SampleSpec, load: FilesLoader | None, on_done: OnDone
    ) -> None:
        """Admit a sampling request with sampler adapter `key` (None = base model; `load`
        fetches its files if it is not cached). `on_done` gets the output, or the exception,
        from this call or a later `step()`. Errors of the request itself raise here."""
        slot = self._sampler_slot(key, load)
        if slot is None:
            self.sampler.admit(None, spec, on_done)
            return
        self._pins[slot] += 1

        def finish(out: SampleOut | BaseException) -> None:
            self._unpin(slot)
            on_done(out)

        try:
            self.sampler.admit(slot, spec, finish)
        except BaseException:
            self._unpin(slot)
            raise

    @property
    def pending(self) -> bool:
        """True while sampling requests are decoding: `step()` has work."""
        return self.sampler.pending

    @property
    def rows(self) -> int:
        """Sequences decoding: what the next `step()` advances."""
        return self.sampler.live_rows

    def step(self) -> None:
        """One decoding step of every sampling request in flight."""
        self.sampler.step()
