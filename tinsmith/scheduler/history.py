"""Per-run training metrics over time, for the dashboard's loss and metric curves.

Every completed forward_backward and optim_step of a run adds one point: its kind, the
training step it belongs to, the wall-clock time and its metrics (e.g. `loss:sum`,
`grad_norm:mean`). A run's step is the number of optim_steps it has completed, so the
forward_backward calls that accumulate gradients for step n and that step's optim_step all
carry step n.

The history lives in memory only: it is lost when the server restarts, keeps the newest
`max_points` points of each run and the `max_runs` runs updated most recently.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MetricPoint:
    kind: str  # "forward_backward" | "optim_step"
    step: int
    time: float  # Unix seconds
    metrics: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class _RunHistory:
    points: deque[MetricPoint]
    steps: int = 0  # optim_steps completed
    total: int = 0  # points ever recorded, dropped ones included
    lock: threading.Lock = field(default_factory=threading.Lock)


class MetricHistory:
    def __init__(self, max_points: int = 10_000, max_runs: int = 1_000) -> None:
        self.max_points = max_points
        self.max_runs = max_runs
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _RunHistory] = OrderedDict()

    def _run(self, run_id: str) -> _RunHistory:
        with self._lock:
            h = self._runs.get(run_id)
            if h is None:
                h = self._runs[run_id] = _RunHistory(deque(maxlen=self.max_points))
                while len(self._runs) > self.max_runs:
                    self._runs.popitem(last=False)
            self._runs.move_to_end(run_id)
            return h

    def record(self, run_id: str, kind: str, metrics: Mapping[str, float]) -> None:
        """One completed request of `run_id`; an optim_step ends the run's current step."""
        values = {str(k): float(v) for k, v in metrics.items()}
        clean = {k: v for k, v in values.items() if math.isfinite(v)}  # JSON has no NaN
        h = self._run(run_id)
        with h.lock:
            h.points.append(MetricPoint(kind, h.steps, time.time(), clean))
            h.total += 1
            if kind == "optim_step":
                h.steps += 1

    def points(self, run_id: str) -> tuple[list[MetricPoint], int]:
        """The run's kept points, oldest first, and how many were ever recorded."""
        with self._lock:
            h = self._runs.get(run_id)
        if h is None:
            return [], 0
        with h.lock:
            return list(h.points), h.total

    def latest(self, run_id: str) -> tuple[int, dict[str, float] | None]:
        """The run's completed steps and its newest forward_backward metrics (None: none yet)."""
        with self._lock:
            h = self._runs.get(run_id)
        if h is None:
            return 0, None
        with h.lock:
            last = next((p for p in reversed(h.points) if p.kind == "forward_backward"), None)
            return h.steps, dict(last.metrics) if last else None
