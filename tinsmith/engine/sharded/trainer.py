"""The sharded training backend: a TrainingBackend (engine/backend.py) whose base model and
LoRA state are sharded over a group of rank processes, and its pairing with a sampler.

The server process is the coordinator: it holds no shard of the trained model; every method
sends one command to all ranks (group.py) and returns rank 0's answer. When a rank dies the
call in flight raises `GroupFailed` (a server error: the SDK's future fails with category
"server" and the message below), every run of that group is lost, and the next call starts
a fresh group, into which runs are resumed from their checkpoints (load_run: the SDK's
create_training_client_from_state[_with_optimizer]). A request naming a lost run gets a
404 that says so.

Sampling stays in the coordinator: `sharded_backends` pairs the trainer with today's
LocalSampler on a full copy of the base model there, and a snapshot is the run's gathered
factors from rank 0 made into a frozen Adapter (docs/scale-out.md says why).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import TrainingStats, TrainWork
from tinsmith.engine.lora import LoraWeights
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampling import LocalSampler
from tinsmith.engine.sharded.group import GroupFailed, GroupSpec, GroupState, RankGroup
from tinsmith.types import (
    ADAMW,
    FwdBwdOut,
    LoraSpec,
    NotFound,
    OptimizerConfig,
    OptimSpec,
)

log = logging.getLogger("tinsmith.sharded")
LOST = ("training run {run!r} was lost when the sharded engine's rank group failed; resume it "
        "from its last save_state (create_training_client_from_state_with_optimizer)")


class ShardedTrainer:
    """A TrainingBackend over a RankGroup; one thread (the model's worker) calls it."""

    def __init__(self, spec: GroupSpec, *, start: bool = True, group: RankGroup | None = None) -> None:
        self.group = group or RankGroup(spec)  # `group`: a RankGroup subclass (replicas.py)
        self._runs: set[str] = set()  # runs of the live group
        self._lost: set[str] = set()  # runs of a group that failed, until replaced or dropped
        self._lock = threading.Lock()  # stats() reads from other threads
        if start:
            self.group.start()

    # ----- plumbing --------------------------------------------------------------------
    def _call(self, method: str, *args: object) -> object:
        if not self.group.alive:
            log.warning("starting the sharded engine's rank group again (for %s)", method)
        try:
            return self.group.call(method, *args)
        except GroupFailed:
            with self._lock:
                self._lost |= self._runs
                self._runs.clear()
            log.error("the sharded engine's rank group failed; %d training run(s) lost",
                      len(self._lost))
            raise

    def _known(self, run_id: str) -> None:
        if run_id in self._lost:
            raise NotFound(LOST.format(run=run_id))

    def _adopt(self, run_id: str) -> None:
        with self._lock:
            self._lost.discard(run_id)
            self._runs.add(run_id)

    # ----- TrainingBackend ---------------------------------------------------------------
    def create_run(self, run_id: str, spec: LoraSpec, optimizer: OptimizerConfig = ADAMW) -> None:
        self._call("create_run", run_id, spec, optimizer)
        self._adopt(run_id)

    def drop_run(self, run_id: str) -> None:
        with self._lock:
            self._lost.discard(run_id)
            known = run_id in self._runs
            self._runs.discard(run_id)
        if known and self.group.alive:
            self._call("drop_run", run_id)

    def forward_backward_many(
        self, works: Sequence[TrainWork], *, forward_only: bool
    ) -> list[FwdBwdOut | Exception]:
        lost = [w.run_id in self._lost for w in works]
        if all(lost):
            return [NotFound(LOST.format(run=w.run_id)) for w in works]
        keep = [w for w, gone in zip(works, lost) if not gone]
        try:
            outs = iter(self._call("forward_backward_many", keep, forward_only))  # type: ignore[call-overload]
        except GroupFailed as e:  # each request in flight fails with it (not retried one by one)
            return [e for _ in works]
        return [NotFound(LOST.format(run=w.run_id)) if gone else next(outs)
                for w, gone in zip(works, lost)]

    def forward_backward_chunked(
        self, work: TrainWork, *, forward_only: bool, budget: int
    ) -> Generator[None, None, FwdBwdOut]:
        """Not split into micro-batches here: the group computes the request in one pass, each
        rank holding about 1/N of its rows (docs/scale-out.md)."""
        return (yield from whole_pass(self, work, forward_only))

    def optim_step(self, run_id: str, params: OptimSpec) -> dict[str, float]:
        self._known(run_id)
        return self._call("optim_step", run_id, params)  # type: ignore[return-value]

    def export_run(self, run_id: str, base_model: str, *, include_optimizer: bool) -> dict[str, bytes]:
        self._known(run_id)
        return self._call("export_run", run_id, base_model, include_optimizer)  # type: ignore[return-value]

    def load_run(self, run_id: str, files: Mapping[str, bytes], *, with_optimizer: bool,
                 optimizer: OptimizerConfig = ADAMW) -> LoraSpec:
        spec = self._call("load_run", run_id, dict(files), with_optimizer, optimizer)
        self._adopt(run_id)
        return spec  # type: ignore[return-value]

    def snapshot(self, run_id: str) -> tuple[LoraSpec, dict]:
        """The run's factors on the host (for `SnapshotSampler.put_snapshot`)."""
        self._known(run_id)
        return self._call("snapshot", run_id)  # type: ignore[return-value]

    def stats(self) -> TrainingStats:
        with self._lock:
            return TrainingStats(len(self._runs), 0, 0)

    def group_state(self) -> GroupState:
        """The rank group's state, for /readyz (any thread)."""
        return self.group.state()

    def close(self) -> None:
        self.group.close()


class SnapshotSampler(LocalSampler):
    """The coordinator's LocalSampler, taking the sharded trainer's snapshots (host factors)."""

    def put_snapshot(self, key: str, snapshot: object) -> None:
        super().put_snapshot(key, snapshot_adapter(snapshot, self.runner.device))


def whole_pass(backend, work: TrainWork, forward_only: bool) -> Generator[None, None, FwdBwdOut]:
    """`forward_backward_chunked` of a backend that does not split requests: one
    `forward_backward_many` pass of the whole request, never yielding."""
    (out,) = backend.forward_backward_many([work], forward_only=forward_only)
    if isinstance(out, Exception):
        raise out
    return out
    yield  # a generator


def snapshot_adapter(snapshot: object, device: object = "cpu") -> Adapter:
    """A training snapshot as a frozen Adapter on `device`: a rank group's snapshot is
    `(LoraSpec, {layer path: (A, B)})` on the host; a local trainer's already is an Adapter."""
    if isinstance(snapshot, Adapter):
        return snapshot
    spec, factors = snapshot  # type: ignore[misc]
    scale = spec.alpha / spec.rank
    return Adapter(spec, {p: LoraWeights(a.to(device), b.to(device), scale)
                          for p, (a, b) in factors.items()})


def sharded_backends(
    spec: GroupSpec, sampler_runner: ModelRunner, tokenizer, *, max_sampler_adapters: int = 16,
    spill_dir: Path,
) -> tuple[ShardedTrainer, SnapshotSampler]:
    """The pair for one base model served by a rank group: training in the group, sampling
    in this process on `sampler_runner` (a full copy of the base)."""
    if spec.world < 1:
        raise ValueError(f"devices must be >= 1, got {spec.world}")
    if sampler_runner.moe_blocks:
        raise ValueError(f"{spec.name}: mixture-of-experts models are not supported by the "
                         "sharded engine yet; serve it with --devices 1")
    trainer = ShardedTrainer(spec)
    return trainer, SnapshotSampler(sampler_runner, tokenizer, spill_dir, max_sampler_adapters)
