"""Health checks and Prometheus metrics of one server.

`ServerMetrics` owns a per-server `CollectorRegistry` (several servers may share one
process, so never the global default registry) and the metric objects. The engine workers
report every job they run (`job_started` / `job_finished`; a sampling request, which decodes
over many steps shared with others, reports its compute per step with `busy` and its end
with `request_done`); the service reports requests it rejects before they reach a worker
(`rejected`). Values that are cheap to read at scrape time
(queue depths, run and sampler counts, the sliding-window busy fraction) come from a
snapshot callback and a custom collector, so nothing has to keep them up to date.

`readiness` runs the readiness checks of `GET /readyz`: every served base model is loaded,
its engine worker thread is alive, a sharded model's rank group is up or can start without
waiting for workers to join (docs/scale-out.md), and the metadata database answers a trivial
query.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Outcome = Literal["ok", "user_error", "server_error"]

# Worker job labels as the service passes them, folded into a few request kinds.
_KINDS = {"create_model", "forward_backward", "forward", "optim_step", "sample"}
# Queue wait + compute of one job: from milliseconds (tiny models) to minutes (big saves).
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            120.0, 300.0, 600.0)


def request_kind(label: str) -> str:
    """The `kind` label of a worker job label: save_* -> save, load_* -> load."""
    if label.startswith("save"):
        return "save"
    if label.startswith("load"):
        return "load"
    return label if label in _KINDS else "other"


@dataclass(frozen=True)
class ModelSnapshot:
    """What the service reports about one base model at scrape time."""

    queued: int  # jobs in the engine worker's queue
    held: int  # training jobs held back by their run's SeqGate, waiting for their seq turn
    training_runs: int
    sampling_sessions: int
    resident_runs: int = 0  # training runs whose adapter is in memory (the rest are spilled)
    run_spills: int = 0  # idle runs moved out to disk since start
    run_restores: int = 0  # and back
    replica_runs: tuple[int, ...] = ()  # resident runs per engine replica (--replicas > 1)
    replica_moves: int = 0  # runs moved between replicas since start


class _BusyWindow:
    """Busy intervals of one worker over the last `window_s` seconds (monotonic clock)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.created = time.monotonic()
        self.intervals: deque[tuple[float, float]] = deque()
        self.current: float | None = None  # start of the job running now

    def add(self, start: float, end: float) -> None:
        self.current = None
        self.intervals.append((start, end))
        self._prune(end - self.window_s)  # bounded even if nobody scrapes

    def _prune(self, lo: float) -> None:
        while self.intervals and self.intervals[0][1] <= lo:
            self.intervals.popleft()

    def fraction(self, now: float) -> float:
        lo = now - self.window_s
        self._prune(lo)
        busy = sum(end - max(start, lo) for start, end in self.intervals)
        if self.current is not None:
            busy += now - max(self.current, lo)
        span = min(self.window_s, now - self.created)
        return min(1.0, max(0.0, busy / span)) if span > 0 else 0.0


class ServerMetrics:
    def __init__(
        self, snapshot: Callable[[], Mapping[str, ModelSnapshot]] | None = None,
        busy_window_s: float = 60.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.busy_window_s = busy_window_s
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._windows: dict[str, _BusyWindow] = {}
        r = self.registry
        self.request_seconds = Histogram(
            "tinsmith_request_seconds",
            "Seconds from a job's submission to its engine worker until it finished "
            "(queue wait + compute)", ["model", "kind"], buckets=_BUCKETS, registry=r)
        self.requests = Counter(
            "tinsmith_requests", "Requests by kind and outcome (ok, user_error, server_error)",
            ["model", "kind", "outcome"], registry=r)
        self.tokens = Counter(
            "tinsmith_tokens", "Tokens processed: model-input tokens of the datums for "
            "forward/forward_backward, prompt x num_samples + generated tokens for sample",
            ["model", "kind"], registry=r)
        # Batching: how many requests share each training pass, how many rows each decode step.
        self.pass_requests = Histogram(
            "tinsmith_pass_requests", "Requests computed together in one training pass",
            ["model", "kind"], buckets=_SIZES, registry=r)
        self.decode_rows = Histogram(
            "tinsmith_decode_rows", "Sequences advanced together by one decoding step",
            ["model"], buckets=_SIZES, registry=r)
        self.busy_seconds = Counter(
            "tinsmith_engine_busy_seconds", "Seconds the engine worker spent running jobs",
            ["model"], registry=r)
        r.register(_ScrapeCollector(self))

    def _window(self, model: str) -> _BusyWindow:
        """The model's busy window, created on first use (call with the lock held)."""
        w = self._windows.get(model)
        if w is None:
            w = self._windows[model] = _BusyWindow(self.busy_window_s)
        return w

    def add_model(self, model: str) -> None:
        """Make a model's series visible (at zero) before its first job."""
        with self._lock:
            self._window(model)
        self.busy_seconds.labels(model=model)

    def job_started(self, model: str, started: float) -> None:
        with self._lock:
            self._window(model).current = started

    def job_finished(
        self, model: str, label: str, outcome: Outcome, *, submitted: float, started: float,
        finished: float, tokens: int = 0,
    ) -> None:
        """Record one job the worker ran start to end; times are `time.monotonic()` values."""
        self.busy(model, started, finished)
        self.request_done(model, label, outcome, submitted=submitted, finished=finished, tokens=tokens)

    def busy(self, model: str, started: float, finished: float) -> None:
        """The worker computed from `started` to `finished` (a job, or a decoding step)."""
        with self._lock:
            self._window(model).add(started, finished)
        self.busy_seconds.labels(model=model).inc(max(0.0, finished - started))

    def request_done(
        self, model: str, label: str, outcome: Outcome, *, submitted: float, finished: float,
        tokens: int = 0,
    ) -> None:
        """A request's latency, outcome and tokens (its compute is recorded by `busy`)."""
        kind = request_kind(label)
        self.request_seconds.labels(model=model, kind=kind).observe(max(0.0, finished - submitted))
        self.requests.labels(model=model, kind=kind, outcome=outcome).inc()
        if tokens > 0:
            self.tokens.labels(model=model, kind=kind).inc(tokens)

    def packed(self, model: str, label: str, requests: int) -> None:
        """A training pass computed `requests` requests of kind `label` together."""
        self.pass_requests.labels(model=model, kind=request_kind(label)).observe(requests)

    def decoded(self, model: str, rows: int) -> None:
        """A decoding step advanced `rows` sequences."""
        self.decode_rows.labels(model=model).observe(rows)

    def rejected(self, model: str, label: str) -> None:
        """A request refused with a user error before it reached the engine worker."""
        self.requests.labels(model=model, kind=request_kind(label), outcome="user_error").inc()

    def busy_fraction(self, model: str) -> float:
        with self._lock:
            w = self._windows.get(model)
            return w.fraction(time.monotonic()) if w is not None else 0.0

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this server."""
        return generate_latest(self.registry)


class _ScrapeCollector(Collector):
    """Gauges computed when /metrics is scraped."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        busy = GaugeMetricFamily(
            "tinsmith_engine_busy_fraction",
            f"Fraction of the last {m.busy_window_s:g} s the engine worker spent running jobs",
            labels=["model"])
        with m._lock:
            models = sorted(m._windows)
        for model in models:
            busy.add_metric([model], m.busy_fraction(model))
        yield busy
        peak = GaugeMetricFamily(
            "tinsmith_device_memory_peak_bytes",
            "Peak GPU memory allocated by this server process since it started "
            "(torch.cuda.max_memory_allocated summed over its GPUs; 0 on a CPU)",
            labels=["model"])
        peak_bytes = device_memory_peak_bytes()
        for model in models:
            peak.add_metric([model], peak_bytes)
        yield peak
        if m._snapshot is None:
            return
        snap = m._snapshot()
        depth = GaugeMetricFamily(
            "tinsmith_queue_depth", "Jobs waiting: state=queued in the engine worker's queue, "
            "state=held by a run's seq_id gate until earlier seq_ids arrive",
            labels=["model", "state"])
        runs = GaugeMetricFamily("tinsmith_training_runs", "Training runs loaded in memory",
                                 labels=["model"])
        samplers = GaugeMetricFamily("tinsmith_sampling_sessions",
                                     "Sampling sessions loaded in memory", labels=["model"])
        resident = GaugeMetricFamily("tinsmith_resident_runs",
                                     "Training runs whose adapter is in memory", labels=["model"])
        moves = CounterMetricFamily("tinsmith_run_moves", "Idle training runs spilled to disk "
                                    "(direction=out) and restored (direction=in)",
                                    labels=["model", "direction"])
        replica = GaugeMetricFamily("tinsmith_replica_resident_runs", "Training runs resident "
                                    "on each engine replica (--replicas > 1)",
                                    labels=["model", "replica"])
        replica_moves = CounterMetricFamily("tinsmith_replica_moves", "Training runs moved "
                                            "between engine replicas", labels=["model"])
        for model, s in sorted(snap.items()):
            for k, n in enumerate(s.replica_runs):
                replica.add_metric([model, str(k)], n)
            if s.replica_runs:
                replica_moves.add_metric([model], s.replica_moves)
            depth.add_metric([model, "queued"], s.queued)
            depth.add_metric([model, "held"], s.held)
            runs.add_metric([model], s.training_runs)
            samplers.add_metric([model], s.sampling_sessions)
            resident.add_metric([model], s.resident_runs)
            moves.add_metric([model, "out"], s.run_spills)
            moves.add_metric([model, "in"], s.run_restores)
        yield from (depth, runs, samplers, resident, moves, replica, replica_moves)


def device_memory_peak_bytes() -> int:
    """torch.cuda.max_memory_allocated of this process, summed over its GPUs; 0 when it has
    not used CUDA (a CPU server). Never imports torch or initialises CUDA itself."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


class _Worker(Protocol):
    @property
    def alive(self) -> bool: ...


class _Served(Protocol):
    @property
    def worker(self) -> _Worker: ...


def readiness(names: Iterable[str], models: Mapping[str, _Served],
              probe_db: Callable[[], object]) -> dict[str, Check]:
    """The readiness checks by name: `model:<name>` and `engine_worker:<name>` for each of
    the `names` the server should serve (`models`: those loaded), and `database`
    (`probe_db` runs a trivial query)."""
    checks: dict[str, Check] = {}
    for name in names:
        h = models.get(name)
        checks[f"model:{name}"] = (Check(True, "loaded") if h is not None
                                   else Check(False, "not loaded"))
        if h is not None:
            alive = h.worker.alive
            checks[f"engine_worker:{name}"] = Check(
                alive, "thread alive" if alive else "engine worker thread is not running")
            group = getattr(h.trainer, "group_state", None)  # a sharded model's rank group
            if group is not None:
                g = group()
                checks[f"rank_group:{name}"] = Check(g.ready, g.describe())
    try:
        probe_db()
        checks["database"] = Check(True, "answers queries")
    except Exception as e:  # noqa: BLE001 - whatever the failure, the server is not ready
        checks["database"] = Check(False, f"{type(e).__name__}: {e}"[:500])
    return checks
