"""Engine replicas: one base model served by M independent rank groups, each run living on one.

Several small runs gain nothing from sharding (docs/scale-out.md): what they need is more
engines. `ReplicatedTrainer` is a TrainingBackend over M `ShardedTrainer`s of the same base
model (each a rank group of `devices` ranks: one gloo process on a CPU per rank, or GPUs
[k*N, (k+1)*N) for replica k). The scheduler sees one backend and its one worker thread:

- **Placement**: `create_run` / `load_run` put a new run on the replica with the fewest
  resident runs (ties: the one with the least recent tokens, then the lowest index).
- **Passes**: `forward_backward_many` splits a packed pass's works by replica and runs each
  replica's share at the same time (one thread each: a replica's call only waits on its own
  pipes), then returns the results in the works' order. Every other call goes to the run's
  replica. Calls come from the model's single worker thread, which already keeps a run's
  requests in order; nothing here reorders them.
- **Moves**: each run's recent load is its tokens per pass, decayed by DECAY per pass. After
  a run's `optim_step` (its gradients are zero then, so nothing is lost that the checkpoint
  format does not hold) the run moves to the least-loaded replica when the two replicas'
  loads differ by more than `move_gap` of the total and moving it narrows the gap. A move is
  the spill format: `export_run(include_optimizer=True)` on the old replica, `load_run(
  with_optimizer=True)` on the new one, then a drop on the old one; a failed move leaves the
  run where it was.
- **Failure**: a replica whose rank dies fails its own share of the pass in flight
  (`GroupFailed`, a server error) and loses only its runs (the ShardedTrainer's "lost" 404s);
  the other replicas go on. The dead replica starts again on its next use (a new run placed
  on it: it has the fewest runs now, or a move to it).

Sampling stays in the coordinator as for the sharded engine (SnapshotSampler).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tinsmith.engine.backend import TrainingStats, TrainWork
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sharded.group import GroupFailed, GroupSpec, RankGroup
from tinsmith.engine.sharded.trainer import ShardedTrainer, SnapshotSampler, whole_pass
from tinsmith.types import ADAMW, FwdBwdOut, LoraSpec, NotFound, OptimizerConfig, OptimSpec

log = logging.getLogger("tinsmith.replicas")
DECAY = 0.9  # a run's recent-token load is multiplied by this after every pass (half-life ~6.6)
MOVE_GAP = 0.25  # move when two replicas' loads differ by more than this fraction of the total


class ReplicaGroup(RankGroup):
    """A rank group that knows its replica: it names its processes
    `tinsmith-replica-{k}-rank-{r}` (for operators and tests) and starts its ranks with
    `env` added to their environment: on a GPU CUDA_VISIBLE_DEVICES narrowed to the
    replica's devices (so rank r's `cuda:r` is the replica's r-th GPU), on a CPU
    OMP_NUM_THREADS sharing the cores among the replicas' ranks (M groups each using every
    core oversubscribe them: 3x slower on 2 cores, bench/replicas.py). The environment is
    process-wide, so a start that changes it holds ENV_LOCK (one for the whole process)."""

    ENV_LOCK = threading.Lock()

    def __init__(self, spec: GroupSpec, index: int, env: Mapping[str, str]) -> None:
        super().__init__(spec)
        self.index, self.env = index, dict(env)

    def start(self) -> None:
        if not self.env:
            super().start()
        else:
            with self.ENV_LOCK:
                old = {k: os.environ.get(k) for k in self.env}
                os.environ.update(self.env)
                try:
                    super().start()
                finally:
                    for k, v in old.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
        pids = self.pids()
        for p in multiprocessing.active_children():
            if p.pid in pids:
                p.name = f"tinsmith-replica-{self.index}-rank-{pids.index(p.pid)}"


def replica_env(spec: GroupSpec, replicas: int) -> list[dict[str, str]]:
    """Each replica's additions to its ranks' environment (ReplicaGroup)."""
    if spec.device_type == "cuda":
        return [{"CUDA_VISIBLE_DEVICES": v} for v in replica_devices(spec.world, replicas)]
    if "OMP_NUM_THREADS" in os.environ:  # the operator's choice stands
        return [{} for _ in range(replicas)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // (replicas * spec.world))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(replicas)]


def replica_devices(world: int, replicas: int) -> list[str]:
    """Each replica's CUDA_VISIBLE_DEVICES value: replica k gets devices [k*world,
    (k+1)*world) of the ones this process sees (the user's CUDA_VISIBLE_DEVICES respected)."""
    import torch

    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([d.strip() for d in seen.split(",") if d.strip()] if seen is not None
           else [str(i) for i in range(torch.cuda.device_count())])
    if world * replicas > len(ids):
        raise ValueError(f"--replicas {replicas} x --devices {world} asked for "
                         f"{world * replicas} CUDA devices, but only {len(ids)} are visible")
    return [",".join(ids[k * world:(k + 1) * world]) for k in range(replicas)]


class ReplicatedTrainer:
    """A TrainingBackend over M ShardedTrainers (replicas); one thread (the model's worker)
    calls it, `stats` may be read from others."""

    def __init__(self, spec: GroupSpec, replicas: int, *, move_gap: float = MOVE_GAP,
                 start: bool = True) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if spec.listen:
            raise ValueError("--replicas > 1 with a group that spans machines (--group-listen) "
                             "is not supported yet")
        self.replicas: list[ShardedTrainer] = []
        for k, env in enumerate(replica_env(spec, replicas)):
            self.replicas.append(ShardedTrainer(spec, start=False, group=ReplicaGroup(spec, k, env)))
        self.base_model = spec.name
        self.move_gap = move_gap
        self._home: dict[str, int] = {}  # run id -> its replica
        self._optimizer: dict[str, OptimizerConfig] = {}  # run id -> family (a move needs it)
        self._load: dict[str, float] = {}  # run id -> recent tokens (decayed per pass)
        self._moves = 0
        self._lock = threading.Lock()  # _home and _moves, read by stats() from other threads
        self._pool = ThreadPoolExecutor(max_workers=replicas, thread_name_prefix="tinsmith-replica")
        if start:
            try:
                list(self._pool.map(lambda r: r.group.start(), self.replicas))
            except BaseException:
                self.close()  # the replicas that did start
                raise

    # ----- placement -----------------------------------------------------------------------
    def _replica_loads(self) -> list[float]:
        loads = [0.0] * len(self.replicas)
        for run_id, k in self._home.items():
            loads[k] += self._load.get(run_id, 0.0)
        return loads

    def _least_loaded(self) -> int:
        counts = [r.stats().resident_runs for r in self.replicas]
        loads = self._replica_loads()
        return min(range(len(self.replicas)), key=lambda k: (counts[k], loads[k], k))

    def _of(self, run_id: str) -> ShardedTrainer:
        k = self._home.get(run_id)
        if k is None:
            raise NotFound(f"training run {run_id!r} is not loaded on this server")
        return self.replicas[k]

    def _place(self, run_id: str, k: int, optimizer: OptimizerConfig) -> None:
        old = self._home.get(run_id)
        if old is not None and old != k:  # replaced by a load elsewhere: free the old copy
            self.replicas[old].drop_run(run_id)
        with self._lock:
            self._home[run_id] = k
        self._optimizer[run_id] = optimizer
        self._load.setdefault(run_id, 0.0)

    # ----- TrainingBackend -----------------------------------------------------------------
    def create_run(self, run_id: str, spec: LoraSpec, optimizer: OptimizerConfig = ADAMW) -> None:
        k = self._least_loaded()
        self.replicas[k].create_run(run_id, spec, optimizer)
        self._place(run_id, k, optimizer)

    def drop_run(self, run_id: str) -> None:
        with self._lock:
            k = self._home.pop(run_id, None)
        self._optimizer.pop(run_id, None)
        self._load.pop(run_id, None)
        if k is not None:
            self.replicas[k].drop_run(run_id)

    def forward_backward_many(
        self, works: Sequence[TrainWork], *, forward_only: bool
    ) -> list[FwdBwdOut | Exception]:
        out: list[FwdBwdOut | Exception | None] = [None] * len(works)
        share: dict[int, list[int]] = {}  # replica -> indices of its works, in order
        for i, w in enumerate(works):
            k = self._home.get(w.run_id)
            if k is None:
                out[i] = NotFound(f"training run {w.run_id!r} is not loaded on this server")
            else:
                share.setdefault(k, []).append(i)

        def run(k: int) -> list[FwdBwdOut | Exception]:
            return self.replicas[k].forward_backward_many([works[i] for i in share[k]],
                                                          forward_only=forward_only)

        if len(share) == 1:  # the common case on a quiet server: no thread hop
            ((k, _),) = share.items()
            results = {k: run(k)}
        else:
            futures = {k: self._pool.submit(run, k) for k in share}
            results = {k: f.result() for k, f in futures.items()}
        for k, idx in share.items():
            for i, res in zip(idx, results[k]):
                out[i] = res
        for k, res in results.items():
            if any(isinstance(x, GroupFailed) for x in res):
                self._lost(k)
        for run_id in self._load:
            self._load[run_id] *= DECAY
        for w, res in zip(works, out):
            if not isinstance(res, Exception) and w.run_id in self._load:
                self._load[w.run_id] += sum(len(d.tokens) for d in w.data)
        return out  # type: ignore[return-value]

    def forward_backward_chunked(
        self, work: TrainWork, *, forward_only: bool, budget: int
    ) -> Generator[None, None, FwdBwdOut]:
        """On the run's replica, which computes it in one pass (see ShardedTrainer)."""
        return (yield from whole_pass(self, work, forward_only))

    def optim_step(self, run_id: str, params: OptimSpec) -> dict[str, float]:
        try:
            metrics = self._of(run_id).optim_step(run_id, params)
        except GroupFailed:
            self._lost(self._home[run_id])
            raise
        self._maybe_move(run_id)  # a safe point: the run's gradients were just consumed
        return metrics

    def export_run(self, run_id: str, base_model: str, *, include_optimizer: bool) -> dict[str, bytes]:
        return self._of(run_id).export_run(run_id, base_model, include_optimizer=include_optimizer)

    def load_run(self, run_id: str, files: Mapping[str, bytes], *, with_optimizer: bool,
                 optimizer: OptimizerConfig = ADAMW) -> LoraSpec:
        k = self._least_loaded()
        spec = self.replicas[k].load_run(run_id, files, with_optimizer=with_optimizer,
                                         optimizer=optimizer)
        self._place(run_id, k, optimizer)
        return spec

    def snapshot(self, run_id: str) -> tuple[LoraSpec, dict]:
        return self._of(run_id).snapshot(run_id)

    def stats(self) -> TrainingStats:
        per = tuple(r.stats().resident_runs for r in self.replicas)
        with self._lock:
            moves = self._moves
        return TrainingStats(sum(per), 0, 0, replica_runs=per, replica_moves=moves)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for r in self.replicas:
            r.close()

    # ----- moves ---------------------------------------------------------------------------
    def _lost(self, k: int) -> None:
        """Replica k's group failed: its runs are gone (the ShardedTrainer answers for them),
        so they weigh nothing in its load any more."""
        for run_id, home in self._home.items():
            if home == k:
                self._load[run_id] = 0.0

    def _maybe_move(self, run_id: str) -> None:
        """Move `run_id` to the least-loaded replica when loads are uneven (module docstring):
        the gap must exceed `move_gap` of the total, and the run's own load must be below the
        gap, so that the move narrows it (no run bounces back and forth)."""
        a = self._home[run_id]
        loads = self._replica_loads()
        b = min(range(len(loads)), key=lambda k: (loads[k], k))
        gap, mine = loads[a] - loads[b], self._load.get(run_id, 0.0)
        if b != a and gap > self.move_gap * sum(loads) and 0 < mine < gap:
            self.move(run_id, b)

    def move(self, run_id: str, to: int) -> bool:
        """Move a run (weights and optimizer state, no pending gradients) to replica `to`
        through the checkpoint format; False (the run unchanged) when that failed."""
        a = self._home[run_id]
        if a == to:
            return True
        src, dst = self.replicas[a], self.replicas[to]
        try:
            files = src.export_run(run_id, self.base_model, include_optimizer=True)
            dst.load_run(run_id, files, with_optimizer=True, optimizer=self._optimizer[run_id])
        except Exception as e:  # noqa: BLE001 - a move is an optimisation: the step succeeded
            log.warning("could not move training run %s from replica %d to %d: %s",
                        run_id, a, to, e)
            dst.drop_run(run_id)
            return False
        src.drop_run(run_id)
        with self._lock:
            self._home[run_id] = to
            self._moves += 1
        log.info("moved training run %s from replica %d to %d (recent tokens per replica: %s)",
                 run_id, a, to, [round(x) for x in self._replica_loads()])
        return True


def replicated_backends(
    spec: GroupSpec, replicas: int, sampler_runner: ModelRunner, tokenizer, *,
    max_sampler_adapters: int = 16, spill_dir: Path,
) -> tuple[ReplicatedTrainer, SnapshotSampler]:
    """The pair for one base model served by `replicas` rank groups of `spec.world` ranks:
    training in the groups, sampling in this process on `sampler_runner` (a full copy)."""
    if spec.world < 1:
        raise ValueError(f"devices must be >= 1, got {spec.world}")
    if sampler_runner.moe_blocks:
        raise ValueError(f"{spec.name}: mixture-of-experts models are not supported by engine "
                         "replicas yet; serve it with --replicas 1 --devices 1")
    trainer = ReplicatedTrainer(spec, replicas)
    return trainer, SnapshotSampler(sampler_runner, tokenizer, spill_dir, max_sampler_adapters)
