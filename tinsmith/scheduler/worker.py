"""The engine worker: one thread per base model that runs its jobs in arrival order.

Torch releases the GIL while it computes, so the HTTP event loop stays responsive while
a step runs. The worker starts the next job as soon as one is queued: there is no clock.
Each job is a callable that computes and completes its own future; the worker turns an
escaped exception into a failed future so that one bad job never stops the others.
With `ServerMetrics` attached, each job's latency, outcome, tokens and busy time are
recorded before its future completes, so a client that saw the result sees it counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.telemetry import Outcome, ServerMetrics
from tinsmith.types import UserError

log = logging.getLogger("tinsmith.worker")


@dataclass
class _Job:
    request_id: str
    fn: Callable[[], object]
    label: str
    tokens: int | Callable[[object], int] = 0
    submitted: float = field(default_factory=time.monotonic)


class EngineWorker:
    def __init__(
        self, name: str, futures: FutureStore) -> None:
        self.name = name
        self._futures = futures
        self._metrics: ServerMetrics | None = None  # see attach_metrics
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def attach_metrics(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        metrics.add_model(self.name)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Jobs waiting in the queue (not counting the one running)."""
        return self._queue.qsize()

    def submit(
        self, request_id: str, fn: Callable[[], object], label: str = "",
        tokens: int | Callable[[object], int] = 0,
    ) -> None:
        """Queue `fn`; its return value becomes the future's result. `tokens` (a count, or a
        function of the result) is what the job processes, for the tokens metric."""
        self._queue.put(_Job(request_id, fn, label, tokens))

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            started = time.monotonic()
            if self._metrics is not None:
                self._metrics.job_started(self.name, started)
            try:
                value = job.fn()
            except UserError as e:
                self._record(job, started, "user_error", None)
                self._futures.set_error(job.request_id, str(e), "user")
            except Exception as e:
                log.exception("job %s (%s) failed", job.request_id, job.label)
                self._record(job, started, "server_error", None)
                self._futures.set_error(job.request_id, f"{type(e).__name__}: {e}", "server")
            else:
                self._record(job, started, "ok", value)
                self._futures.set_result(job.request_id, value)

    def _record(self, job: _Job, started: float, outcome: Outcome, value: object) -> None:
        if self._metrics is None:
            return
        finished = time.monotonic()
        try:
            tokens = 0
            if outcome == "ok":
                tokens = job.tokens(value) if callable(job.tokens) else job.tokens
            self._metrics.job_finished(self.name, job.label, outcome, submitted=job.submitted,
                                       started=started, finished=finished, tokens=tokens)
        except Exception:  # metrics must never fail a job
            log.exception("recording metrics of job %s failed", job.request_id)
