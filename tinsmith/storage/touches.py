"""Coalesced "last used" writes, off the hot path.

Every optim_step touches its run's `last_request_time`. Written at once, that is a write
transaction (about a millisecond of ORM work, plus a commit) on the engine worker's thread
between the step and its result, for each step of each run. `Touches` keeps the newest
time of each key in memory instead and a writer thread stores them all in one call, at
most once per `interval_s`: the worker only records a time.

A caller that reads what was touched calls `flush()` first, so readers of the same store
see every touch at once; another process reading the database sees it within
`interval_s`. `close()` writes what is pending. A failed write is logged and dropped: a
"last used" time is never worth failing a request for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

log = logging.getLogger("tinsmith.storage")


class Touches:
    def __init__(self, write: Callable[[dict[str, datetime]], None], interval_s: float = 1.0,
                 name: str = "touches") -> None:
        self._write = write  # stores {key: time}, one call for the whole batch
        self.interval_s = interval_s
        self._name = name
        self._lock = threading.Lock()  # guards _pending and _thread
        self._write_lock = threading.Lock()  # one batch written at a time, in order
        self._pending: dict[str, datetime] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self, key: str, at: datetime) -> None:
        """Record that `key` was used at `at` (no I/O)."""
        with self._lock:
            self._pending[key] = at
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write what is pending now (nothing to do, no cost)."""
        if not self._pending:
            return
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if batch:
                self._write(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.wait(self.interval_s):  # let touches gather: one write per interval
                return
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("writing last-used times failed; they are dropped")

    def close(self) -> None:
        """Stop the writer and write what is pending."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(10)
        self.flush()
