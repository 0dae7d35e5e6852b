"""The worker's linger (EngineWorker._linger): a small pass waits, briefly, for the runs that
were just in a pass of its kind and have nothing queued, so a round of concurrent runs shares
one pass; it never waits for a run it does not expect, never past its limit, and never with
the linger off (the CPU default).

The worker is driven directly with plain pass functions that record which items each pass
held: the packing decision is what is under test, not the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time

from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.worker import EngineWorker, Pack


class Passes:
    """Records the items of every pass the worker runs."""

    def __init__(self) -> None:
        self.held: list[list[str]] = []
        self.lock = threading.Lock()

    def run(self, items: list[object]) -> list[object]:
        with self.lock:
            self.held.append([str(i) for i in items])
        return [{"ok": i} for i in items]


def _submit(worker: EngineWorker, futures: FutureStore, passes: Passes, run: str, step: int) -> str:
    rid = futures.create("forward_backward")
    worker.submit(rid, None, "forward_backward", owner=run,
                  pack=Pack("forward_backward", 128, f"{run}:{step}", passes.run))
    return rid


def _round(worker: EngineWorker, futures: FutureStore, passes: Passes, step: int,
           late: dict[str, float]) -> None:
    """Every run submits its step; the ones in `late` only after that many seconds."""
    ids = []
    threads = []
    for run in ("a", "b", "c"):
        if run in late:
            def send(run=run) -> None:
                time.sleep(late[run])
                ids.append(_submit(worker, futures, passes, run, step))
            threads.append(threading.Thread(target=send))
            threads[-1].start()
        else:
            ids.append(_submit(worker, futures, passes, run, step))
    for t in threads:
        t.join()
    for rid in ids:
        done, _, error = asyncio.run(futures.wait(rid, 10))
        assert done and error is None


def _worker(linger_s: float) -> tuple[EngineWorker, FutureStore, Passes]:
    futures = FutureStore()
    return EngineWorker("m", futures, pass_tokens=4096, linger_s=linger_s), futures, Passes()


def test_a_late_run_joins_the_pass_it_was_expected_in() -> None:
    worker, futures, passes = _worker(linger_s=1.0)
    try:
        _round(worker, futures, passes, 0, {})  # all three seen in a pass
        passes.held.clear()
        _round(worker, futures, passes, 1, {"c": 0.1})  # c turns around 100 ms late
        assert passes.held == [["a:1", "b:1", "c:1"]]
    finally:
        worker.close()


def test_no_linger_when_off_or_for_unknown_runs() -> None:
    worker, futures, passes = _worker(linger_s=0.0)
    try:
        _round(worker, futures, passes, 0, {})
        passes.held.clear()
        _round(worker, futures, passes, 1, {"c": 0.1})
        assert ["c:1"] in passes.held and len(passes.held) == 2  # c had to take its own pass
    finally:
        worker.close()
    worker, futures, passes = _worker(linger_s=1.0)
    try:  # a fresh worker expects nobody: a lone request is not held back
        started = time.monotonic()
        rid = _submit(worker, futures, passes, "a", 0)
        assert asyncio.run(futures.wait(rid, 10))[0]
        assert time.monotonic() - started < 0.5  # well under the 1 s linger
    finally:
        worker.close()


def test_linger_is_bounded() -> None:
    worker, futures, passes = _worker(linger_s=0.15)
    try:
        _round(worker, futures, passes, 0, {})
        passes.held.clear()
        _round(worker, futures, passes, 1, {"c": 0.6})  # later than the linger allows
        assert passes.held == [["a:1", "b:1"], ["c:1"]]
    finally:
        worker.close()
