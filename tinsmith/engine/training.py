"""The exact local training backend: runs as LoRA adapters on one ModelRunner.

Training runs live in a RunPool (pool.py): beyond `max_resident_runs`, idle runs are spilled
to disk bit-exactly and restored on use. Everything here runs on the model's single worker
thread (the class is not thread-safe by design), except `stats`, which metrics read.
Results cross to the CPU once, as NumPy arrays, in `_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import TrainingStats, TrainWork
from tinsmith.engine.budget import micro_batches
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.losses import LossBatch, LossRegistry, LossSpec
from tinsmith.engine.moe_routing import (
    ENGINE_CONFIG,
    Routing,
    RoutingStats,
    aux_probs_grad,
    check_dense,
    moe_terms,
    wants_aux,
)
from tinsmith.engine.pool import RunPool
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.vision import model_length
from tinsmith.types import ADAMW, FwdBwdOut, LoraSpec, OptimizerConfig, OptimSpec, UserError


class LocalTrainer:
    """A TrainingBackend (backend.py) on a runner shared with the LocalSampler."""

    def __init__(
        self, runner: ModelRunner, losses: LossRegistry, spill_dir: Path,
        max_resident_runs: int = 1 << 30,
    ) -> None:
        self.runner = runner
        self.losses = losses
        self.runs = RunPool(runner, spill_dir, max_resident_runs)  # spill_dir made at the first spill

    def create_run(self, run_id: str, spec: LoraSpec, optimizer: OptimizerConfig = ADAMW) -> None:
        try:
            adapter = Adapter.create(spec, self.runner.layers, optimizer)
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
        routing = (RoutingStats(probs_grad=wants_aux(works[i].config for i in live))  # MoE: per-row
                   if self.runner.moe_blocks else None)
        lps = (self.runner.target_logprobs(rows, grad=not forward_only, active=active, parts=owner,
                                           routing=routing)
               if rows else [])
        losses: list[torch.Tensor] = []
        idle: list[torch.Tensor] = []  # gradless parameters of runs with no loss to backpropagate
        start = 0
        for i in live:  # each work's rows are consecutive in `rows`, hence in `lps`
            mine = lps[start : start + len(works[i].data)]
            first, start = start, start + len(works[i].data)
            try:
                loss, out = self.work_loss(works[i], specs[i], mine, forward_only)
                loss = self._moe(loss, out, works[i].config, routing, range(first, start))
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
        # Model-input lengths: images count as the tokens they decode to (vision.py).
        parts = micro_batches([model_length(d.tokens, d.images, self.runner.vision) for d in data], budget)
        lps: list[torch.Tensor] = []
        moe = bool(self.runner.moe_blocks)
        total: Routing | None = None  # MoE: the request's routing, over its micro-batches
        for part in parts:
            slot = self._run(work.run_id)[1]
            rs = RoutingStats() if moe else None
            lps += self.runner.target_logprobs([(slot, data[i]) for i in part], grad=False, routing=rs)
            if rs is not None:
                r = rs.request(range(len(part)))
                total = r if total is None else total + r
            yield
        leaves = [lp.detach().requires_grad_(not forward_only) for lp in lps]
        loss, out = self.work_loss(work, spec, leaves, forward_only)
        loss = self._moe(loss, out, work.config, total, None)
        aux_grad = aux_probs_grad(total, work.config) if total is not None else None
        if forward_only or not loss.requires_grad:
            return out
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        adapter = self._run(work.run_id)[0]
        before = [None if p.grad is None else p.grad.clone() for p in adapter.parameters()]
        try:
            for part in parts:
                adapter, slot = self._run(work.run_id)
                rs = RoutingStats(probs_grad=True) if aux_grad is not None else None
                piece = self.runner.target_logprobs([(slot, data[i]) for i in part], grad=True,
                                                    active=[spec.active(data[i].inputs) for i in part],
                                                    routing=rs)
                mine = [(i, lp) for i, lp in zip(part, piece)
                        if grads[i] is not None and lp.requires_grad]
                outs, outs_grads = [lp for _, lp in mine], [grads[i] for i, _ in mine]
                if rs is not None:  # the aux loss's share of this micro-batch (exact)
                    outs.append(rs.request(range(len(part))).probs)
                    outs_grads.append(aux_grad)
                if outs:
                    torch.autograd.backward(outs, outs_grads)
                yield
        except BaseException:
            for p, g in zip(adapter.parameters(), before):
                p.grad = g
            raise
        return out

    @staticmethod
    def _moe(loss: torch.Tensor, out: FwdBwdOut, config: Mapping[str, object],
             routing: RoutingStats | Routing | None, rows: range | None) -> torch.Tensor:
        """On a MoE model, the request's load-balance metrics into `out` and its loss plus
        the auxiliary term it asks for (moe_routing.py); a dense model refuses that term."""
        if routing is None:
            try:
                check_dense(config)
            except ValueError as e:
                raise UserError(str(e)) from e
            return loss
        r = routing.request(rows) if isinstance(routing, RoutingStats) else routing
        loss, metrics = moe_terms(loss, r, config)
        out.metrics.update(metrics)
        return loss

    @staticmethod
    def work_loss(
        work: TrainWork, spec: LossSpec, lps: list[torch.Tensor], forward_only: bool
    ) -> tuple[torch.Tensor, FwdBwdOut]:
        """A work's loss (a scalar, still in the graph) and its result, from its logprobs."""
        with torch.set_grad_enabled(not forward_only):
            keys = {*spec.required_inputs, *spec.optional_inputs, *spec.server_inputs}
            # On the host per datum; LossBatch moves each concatenated input over once.
            inputs = [
                {k: torch.as_tensor(v, dtype=lp.dtype) for k, v in d.inputs.items() if k in keys}
                for d, lp in zip(work.data, lps)
            ]
            config = {k: v for k, v in work.config.items() if k not in ENGINE_CONFIG}  # engine's keys
            loss, metrics = spec.fn(LossBatch.from_datums(lps, inputs), {**spec.config, **config})
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
        # The one crossing to the CPU (one copy for the whole request, not one per datum):
        # float32 logprobs, wherever and in whatever dtype they were.
        flat = (torch.cat([lp.detach().reshape(-1) for lp in lps]).float().cpu().numpy()
                if lps else np.zeros(0, np.float32))
        ends = np.cumsum([lp.numel() for lp in lps])
        outputs = [{"logprobs": part.reshape(tuple(lp.shape))}
                   for part, lp in zip(np.split(flat, ends[:-1]), lps)]
        return loss, FwdBwdOut(outputs=outputs, metrics=metrics)

    def optim_step(self, run_id: str, params: OptimSpec) -> dict[str, float]:
        adapter, _ = self._run(run_id)
        try:
            return adapter.optim_step(params)
        except ValueError as e:  # params of the other optimizer family
            raise UserError(str(e)) from e

    def export_run(self, run_id: str, base_model: str, *, include_optimizer: bool) -> dict[str, bytes]:
        adapter, _ = self._run(run_id)
        return adapter_to_files(adapter, base_model, include_optimizer=include_optimizer)

    def load_run(self, run_id: str, files: Mapping[str, bytes], *, with_optimizer: bool,
                 optimizer: OptimizerConfig = ADAMW) -> LoraSpec:
        """Create (or replace) a run of optimizer family `optimizer` from checkpoint files;
        returns its LoRA spec. Optimizer state of another family is refused (UserError)."""
        try:
            adapter = adapter_from_files(files, self.runner.layers, load_optimizer=with_optimizer,
                                         optimizer=optimizer)
        except ValueError as e:
            raise UserError(f"cannot load checkpoint: {e}") from e
        self._put_run(run_id, adapter)
        return adapter.spec

    def snapshot(self, run_id: str) -> Adapter:
        """The run's current weights as a detached adapter (no grad, no optimizer)."""
        adapter, _ = self._run(run_id)
        return adapter.clone_frozen()

    def stats(self) -> TrainingStats:
        return TrainingStats(self.runs.resident, self.runs.spills, self.runs.restores)
