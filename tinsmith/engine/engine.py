"""The engine of one base model: training runs and samplers as adapters on one runner.

Everything that touches tensors for a base model goes through here, always from the
model's single worker thread (the class is not thread-safe by design). Training runs and
sampler snapshots are separate adapters: a sampler never shares tensors with a live run,
so later training steps cannot change what an existing sampler returns.

Training runs live in a RunPool (pool.py): beyond `max_resident_runs`, idle runs are spilled
to disk bit-exactly and restored on use. Sampler adapters are cached (LRU,
`max_sampler_adapters`); ones that came from a stored checkpoint are reloaded on demand,
ephemeral ones (from save_weights_and_get_sampling_client) are spilled to disk when evicted
and restored from there (the newest MAX_SPILLED_SAMPLERS of them). Sampling is continuous
(see sampler.py): `start_sample` admits a request and `step` advances every request in
flight; a slot stays attached while a request decodes with it (pinned), even if the cache
evicts or replaces its key meanwhile.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.budget import micro_batches
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.losses import LossBatch, LossRegistry, LossSpec
from tinsmith.engine.pool import RunPool, read_spill, write_spill
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
# Unsaved samplers (save_weights_and_get_sampling_client) evicted from memory are kept on disk
# up to this many, newest first; at rank 32 on the bundled model that is about 1.3 GB.
MAX_SPILLED_SAMPLERS = 64


@dataclass(frozen=True)
class TrainWork:
    """One forward or forward_backward request of one run."""

    run_id: str
    data: Sequence[DatumIn]
    loss_fn: str
    config: Mapping[str, float]


class Engine:
    def __init__(
        self, runner: ModelRunner, tokenizer, losses: LossRegistry, max_sampler_adapters: int = 16,
        *, spill_dir: Path | None = None, max_resident_runs: int = 1 << 30,
    ) -> None:
        self.runner = runner
        self.losses = losses
        self.sampler = Sampler(runner, tokenizer)
        spill_dir = spill_dir or Path(tempfile.gettempdir()) / f"tinsmith-spill-{uuid.uuid4().hex}"
        self.runs = RunPool(runner, spill_dir, max_resident_runs)  # made at the first spill
        self._samplers: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self._max_samplers = max_sampler_adapters
        self._ephemeral: set[str] = set()  # sampler keys with no stored files (snapshots)
        self._spilled: OrderedDict[str, Path] = OrderedDict()  # ephemeral samplers moved to disk
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
        self.runs.put(run_id, adapter)

    def drop_run(self, run_id: str) -> None:
        self.runs.drop(run_id)

    def _run(self, run_id: str) -> tuple[Adapter, int]:
        return self.runs.get(run_id)

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
        with self.runs.pinned(w.run_id for w in works):  # all resident through the backward
            return self._forward_backward_many(works, forward_only=forward_only)

    def _forward_backward_many(
        self, works: Sequence[TrainWork], *, forward_only: bool
    ) -> list[FwdBwdOut | Exception]:
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
                active.append(spec.active(d.inputs))
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

    def forward_backward_chunked(
        self, work: TrainWork, *, forward_only: bool, budget: int
    ) -> Generator[None, None, FwdBwdOut]:
        """One request too big for a pass, in micro-batches of at most `budget` padded tokens
        (budget.micro_batches), yielding after each one so other work runs in between; the
        generator's return value is the result. Exact for any loss, however it couples datums:
        1. each micro-batch's forward, without autograd, gives the request's logprobs;
        2. the loss over all of them, with those logprobs as leaves, gives d loss / d logprob;
        3. each micro-batch's forward again, with autograd, backpropagates its share of those.
        One forward more than an unsplit pass; memory holds one micro-batch's activations. If
        step 3 fails part-way, the run's gradients are put back as they were."""
        with self.runs.pinned([work.run_id]):  # resident from the first micro-batch to the last
            return (yield from self._chunked(work, forward_only=forward_only, budget=budget))

    def _chunked(
        self, work: TrainWork, *, forward_only: bool, budget: int
    ) -> Generator[None, None, FwdBwdOut]:
        spec = self.losses.get(work.loss_fn)
        data = work.data
        parts = micro_batches([len(d.tokens) for d in data], budget)
        lps: list[torch.Tensor] = []
        for part in parts:
            slot = self._run(work.run_id)[1]
            lps += self.runner.target_logprobs([(slot, data[i]) for i in part], grad=False)
            yield
        leaves = [lp.detach().requires_grad_(not forward_only) for lp in lps]
        loss, out = self._loss(work, spec, leaves, forward_only)
        if forward_only or not loss.requires_grad:
            return out
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        adapter = self._run(work.run_id)[0]
        before = [None if p.grad is None else p.grad.clone() for p in adapter.parameters()]
        try:
            for part in parts:
                adapter, slot = self._run(work.run_id)
                piece = self.runner.target_logprobs([(slot, data[i]) for i in part], grad=True,
                                                    active=[spec.active(data[i].inputs) for i in part])
                mine = [(i, lp) for i, lp in zip(part, piece)
                        if grads[i] is not None and lp.requires_grad]
                if mine:
                    torch.autograd.backward([lp for _, lp in mine], [grads[i] for i, _ in mine])
                yield
        except BaseException:
            for p, g in zip(adapter.parameters(), before):
                p.grad = g
            raise
        return out

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
        self._ephemeral.add(key)
        self._put_sampler(key, adapter.clone_frozen())

    def _put_sampler(self, key: str, adapter: Adapter) -> None:
        old = self._samplers.pop(key, None)
        if old is not None:
            self._release(old[1])
        self._samplers[key] = (adapter, self.runner.attach(adapter))
        while len(self._samplers) > self._max_samplers:
            old_key, (old_adapter, slot) = self._samplers.popitem(last=False)
            if old_key in self._ephemeral:  # nothing to reload it from: keep it on disk
                files = adapter_to_files(old_adapter, self.runner.name, include_optimizer=False)
                self._spilled[old_key] = write_spill(self.runs.spill_dir, files)
                while len(self._spilled) > MAX_SPILLED_SAMPLERS:
                    gone, folder = self._spilled.popitem(last=False)
                    self._ephemeral.discard(gone)
                    shutil.rmtree(folder, ignore_errors=True)
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
        if entry is None and key in self._spilled:
            load = partial(read_spill, self._spilled.pop(key))
        if entry is None:
            if load is None:
                raise NotFound(
                    f"sampler weights {key!r} are gone (the server keeps the newest "
                    f"{self._max_samplers + MAX_SPILLED_SAMPLERS} unsaved samplers); save them "
                    "with save_weights_for_sampler(name) to keep them"
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
