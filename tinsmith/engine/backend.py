"""The seam between the scheduler and an engine: a training backend and a sampling backend.

The scheduler (service, worker, playground) holds one of each per base model and calls only
the methods below, always from the model's worker thread, except `encode`/`decode` (any
thread) and `stats` (read by metrics from other threads). What crosses is plain data
(tinsmith/types.py, `TrainWork`, checkpoint files as `dict[str, bytes]`) plus one opaque
object: a `WeightsSnapshot`, which a training backend hands to the sampling backend built
with it in the same process, so a snapshot never goes through files there.

Today's exact CPU engine is one implementation (engine/local.py builds the pair); a sharded
trainer or an external sampler is another, built in the model's loading code. Nothing here
imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tinsmith.types import (
    ADAMW,
    DatumIn,
    FwdBwdOut,
    LoraSpec,
    OptimizerConfig,
    OptimSpec,
    SampleOut,
    SampleSpec,
)

# A run's weights frozen at one moment, from `TrainingBackend.snapshot`, for the sampling
# backend of the same process only: what it is belongs to the pair that exchanges it.
WeightsSnapshot = object
# Fetches a stored sampler checkpoint's files, for a sampling backend that does not hold them.
FilesLoader = Callable[[], Mapping[str, bytes]]
# Called once with a sampling request's output, or with the exception that failed it.
OnDone = Callable[[SampleOut | BaseException], None]


@dataclass(frozen=True)
class TrainWork:
    """One forward or forward_backward request of one run."""

    run_id: str
    data: Sequence[DatumIn]
    loss_fn: str
    config: Mapping[str, float]


@dataclass(frozen=True)
class TrainingStats:
    """Counters for metrics: where a backend's training runs live."""

    resident_runs: int  # runs whose weights are in memory (the rest are spilled)
    run_spills: int  # runs moved out of memory since start
    run_restores: int  # and back
    replica_runs: tuple[int, ...] = ()  # resident runs per engine replica (engine/replicas.py)
    replica_moves: int = 0  # runs moved between replicas since start


class TrainingBackend(Protocol):
    """Training runs of one base model: LoRA adapters with their gradients and optimizer
    state (AdamW or Dimuon, fixed per run: docs/optimizers.md)."""

    def create_run(self, run_id: str, spec: LoraSpec, optimizer: OptimizerConfig = ADAMW) -> None:
        """A new run with freshly initialised weights; a bad spec raises UserError."""
        ...

    def drop_run(self, run_id: str) -> None: ...

    def forward_backward_many(
        self, works: Sequence[TrainWork], *, forward_only: bool
    ) -> list[FwdBwdOut | Exception]:
        """Several runs' requests in one pass, at most one per run with gradients: a result,
        or the exception that failed that request alone, per work. Gradients accumulate
        until `optim_step`."""
        ...

    def forward_backward_chunked(
        self, work: TrainWork, *, forward_only: bool, budget: int
    ) -> Generator[None, None, FwdBwdOut]:
        """One request in micro-batches of at most `budget` padded tokens, yielding between
        them; the generator returns the result."""
        ...

    def optim_step(self, run_id: str, params: OptimSpec) -> dict[str, float]:
        """One step of the run's optimizer; params of the other family raise UserError."""
        ...

    def export_run(self, run_id: str, base_model: str, *, include_optimizer: bool) -> dict[str, bytes]:
        """The run's checkpoint files (engine/checkpoint.py's format)."""
        ...

    def load_run(self, run_id: str, files: Mapping[str, bytes], *, with_optimizer: bool,
                 optimizer: OptimizerConfig = ADAMW) -> LoraSpec:
        """Create (or replace) a run of family `optimizer` from checkpoint files; returns its
        LoRA spec. With `with_optimizer`, optimizer state of another family raises UserError."""
        ...

    def snapshot(self, run_id: str) -> WeightsSnapshot:
        """The run's current weights, frozen: later steps of the run do not change them."""
        ...

    def stats(self) -> TrainingStats: ...


class Stepper(Protocol):
    """A model's continuous work, which the worker advances between jobs."""

    @property
    def pending(self) -> bool:
        """True while requests are decoding: `step()` has work."""
        ...

    @property
    def rows(self) -> int:
        """Sequences the next `step()` advances."""
        ...

    def step(self) -> None:
        """One decoding step of every request in flight; it completes the ones it finishes."""
        ...


class SamplingBackend(Stepper, Protocol):
    """Sampling from one base model, bare or under sampler adapters named by key."""

    def put_snapshot(self, key: str, snapshot: WeightsSnapshot) -> None:
        """Serve `snapshot` (from the paired training backend) as sampler `key`. It has no
        stored files: the backend keeps it as long as it can."""
        ...

    def start_sample(
        self, key: str | None, spec: SampleSpec, load: FilesLoader | None, on_done: OnDone
    ) -> None:
        """Admit a request under sampler `key` (None = the base model; `load` fetches its
        files if the backend does not hold them). `on_done` gets the output or the exception,
        from this call or a later `step()`. Errors of the request itself raise here."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, as the SDK's tokenizer gives them."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of sampled tokens, special tokens left out."""
        ...
