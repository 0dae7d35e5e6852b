"""The engine worker: one thread per base model that runs its jobs in arrival order.

Torch releases the GIL while it computes, so the HTTP event loop stays responsive while
a step runs. The worker starts the next job as soon as one is queued: there is no clock.
Each job is a callable that computes and completes its own future; the worker turns an
escaped exception into a failed future so that one bad job never stops the others.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tinsmith.scheduler.futures import FutureStore
from tinsmith.types import UserError

log = logging.getLogger("tinsmith.worker")


@dataclass
class _Job:
    request_id: str
    fn: Callable[[], object]
    label: str


class EngineWorker:
    def __init__(self, name: str, futures: FutureStore) -> None:
        self.name = name
        self._futures = futures
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, fn: Callable[[], object], label: str = "") -> None:
        """Queue `fn`; its return value becomes the future's result."""
        self._queue.put(_Job(request_id, fn, label))

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                value = job.fn()
            except UserError as e:
                self._futures.set_error(job.request_id, str(e), "user")
            except Exception as e:
                log.exception("job %s (%s) failed", job.request_id, job.label)
                self._futures.set_error(job.request_id, f"{type(e).__name__}: {e}", "server")
            else:
                self._futures.set_result(job.request_id, value)
