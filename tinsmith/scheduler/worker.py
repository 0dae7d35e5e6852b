"""The engine worker: one thread per base model that runs its jobs in arrival order,
packs the training work of different runs into shared passes, and keeps the model's
continuous work (sampling requests decoding) moving between jobs.

Torch releases the GIL while it computes, so the HTTP event loop stays responsive while
a step runs. There is no clock: the worker runs the next job as soon as one is queued, and
while requests are decoding it alternates queued jobs with decoding steps:
- a plain job (`submit`) is a callable that returns its result; the worker completes its
  future, and turns an escaped exception into a failed future, so one bad job never stops
  the others;
- a packable job (`submit(..., pack=Pack(...))`, a forward or forward_backward) is taken
  together with the other queued jobs of its kind, at most one per run and never one that
  waits behind an earlier job of its run, up to `pass_tokens` tokens, and all are computed by
  one call of `Pack.run`. Taking at most one job per run per pass also makes the runs take
  turns: a run with many queued requests cannot keep the others out of a pass. A job bigger
  than `pass_tokens` is split (`Pack.split`) into micro-batches, and between two of them
  the next job of another run gets its turn, so one huge request cannot hold the model;
- a sampling job (`submit_sample`) only admits its request; the request's future completes
  later, from whichever decoding step finishes it. Queued admissions are taken before the
  next step (up to ADMISSIONS_PER_STEP), so requests that arrive together decode together;
  any other job is followed by one step, so training and sampling interleave instead of one
  starving the other.
Jobs carry their run (`owner`): a run's jobs reach this queue in seq_id order (the service's
SeqGate), and the worker never reorders two jobs of one run.
With `ServerMetrics` attached, each job's latency, outcome, tokens and busy time are
recorded before its future completes, so a client that saw the result sees it counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from tinsmith.engine.backend import Stepper
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.telemetry import Outcome, ServerMetrics
from tinsmith.types import UserError

log = logging.getLogger("tinsmith.worker")

# A sampling job's start: admits the request and arranges for `done` to be called once,
# with the result or the exception, from this call or a later decoding step.
Start = Callable[[Callable[[object], None]], None]
# (model, label, run id or None, request id, tokens, result) of a job that finished well.
UsageHook = Callable[[str, str, str | None, str, int, object], None]


# Admissions (each a prefill) taken back to back before a decoding step: requests that arrive
# together decode together, and a burst of new requests cannot stall the decoding ones long.
ADMISSIONS_PER_STEP = 32
# A run counts as expected by a lingering pass (EngineWorker._linger) this long after its
# last pass of that kind.
RECENT_S = 2.0


@dataclass(frozen=True)
class Pack:
    """How a job may share an engine pass with other queued jobs of the same `kind`."""

    kind: str  # e.g. "forward_backward"; only equal kinds share a pass
    tokens: int  # what the job adds to a pass, against the worker's `pass_tokens`
    item: object  # the job's work, handed to `run`
    run: Callable[[list[object]], list[object]]  # one pass: a result or exception per item
    # A job bigger than the pass budget: `split(item, budget)` computes it in micro-batches,
    # yielding after each, and returns its result (see TrainingBackend.forward_backward_chunked).
    split: Callable[[object, int], Generator[None, None, object]] | None = None


@dataclass
class _Job:
    request_id: str
    fn: Callable[[], object] | None  # a plain job
    start: Start | None  # a sampling job
    label: str
    tokens: int | Callable[[object], int] = 0
    owner: str | None = None  # the training run whose order this job keeps
    pack: Pack | None = None
    submitted: float = field(default_factory=time.monotonic)
    chunks: Generator[None, None, object] | None = None  # a split job under way
    started: float | None = None  # when its first chunk ran


class EngineWorker:
    def __init__(
        self, name: str, futures: FutureStore, stepper: Stepper | None = None,
        pass_tokens: int = 1024, linger_s: float = 0.0,
    ) -> None:
        self.name = name
        self._futures = futures
        self._stepper = stepper
        self.pass_tokens = pass_tokens
        # How long a small pass may wait for runs that were just in a pass of its kind and
        # have nothing queued (they are most likely between their result and their next
        # request); 0 = never wait. See _linger.
        self.linger_s = linger_s
        self._recent: dict[str, dict[str | None, float]] = {}  # kind -> run -> last pass time
        self._metrics: ServerMetrics | None = None  # see attach_metrics
        self.on_done: UsageHook | None = None  # meters finished jobs (scheduler/accounting.py)
        self._jobs: deque[_Job | None] = deque()  # None = close
        self._cv = threading.Condition()
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
        """Jobs waiting in the queue (not counting the ones running)."""
        with self._cv:
            return len(self._jobs)

    def submit(
        self, request_id: str, fn: Callable[[], object] | None, label: str = "",
        tokens: int | Callable[[object], int] = 0, *, owner: str | None = None,
        pack: Pack | None = None,
    ) -> None:
        """Queue `fn` (or, with `pack`, the packable work); its return value becomes the
        future's result. `tokens` (a count, or a function of the result) is what the job
        processes, for the tokens metric; `owner` is the run whose order it keeps."""
        self._put(_Job(request_id, fn, None, label, tokens, owner, pack))

    def submit_sample(
        self, request_id: str, start: Start, tokens: int | Callable[[object], int] = 0
    ) -> None:
        """Queue a sampling admission; the future completes when `start`'s `done` is called."""
        self._put(_Job(request_id, None, start, "sample", tokens))

    def _put(self, job: _Job | None) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        self._put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        admitted = 0  # admissions since the last decoding step
        while True:
            decoding = self._stepper is not None and self._stepper.pending
            with self._cv:
                while not self._jobs and not decoding:
                    self._cv.wait()
                jobs = self._take() if self._jobs else []
                if self.linger_s > 0 and len(jobs) >= 1 and jobs[0] is not None \
                        and jobs[0].pack is not None and jobs[0].chunks is None:
                    self._linger(jobs)  # type: ignore[arg-type]
            if jobs and jobs[0] is None:
                return
            if len(jobs) > 1:
                self._run_pass(jobs)  # type: ignore[arg-type]
            elif jobs:
                self._run(jobs[0])  # type: ignore[arg-type]
                if jobs[0].start is not None:  # type: ignore[union-attr]
                    admitted += 1
                    if admitted < ADMISSIONS_PER_STEP:
                        continue  # take queued admissions before the next step
            if self._stepper is not None and self._stepper.pending:
                self._step()
            admitted = 0

    def _take(self) -> list[_Job | None]:
        """The next job, with the queued jobs that can share its pass (call with the lock)."""
        first = self._jobs.popleft()
        if first is None or first.pack is None or first.chunks is not None:
            return [first]
        if first.pack.tokens > self.pass_tokens and first.pack.split is not None:
            first.chunks = first.pack.split(first.pack.item, self.pass_tokens)
            return [first]
        taken = [first]
        self._fill(taken)
        return taken

    def _fill(self, taken: list[_Job]) -> None:
        """Move the queued jobs that can join the pass `taken` into it (call with the lock):
        same kind, within the budget, at most one per run, never one that waits behind an
        earlier queued job of its run."""
        kind = taken[0].pack.kind  # type: ignore[union-attr]
        budget = self.pass_tokens - sum(j.pack.tokens for j in taken)  # type: ignore[union-attr]
        owners = {j.owner for j in taken}  # runs in the pass or still waiting ahead in the queue
        for job in list(self._jobs):
            if job is None:
                break
            fits = (job.pack is not None and job.chunks is None
                    and job.pack.kind == kind and job.pack.tokens <= budget)
            if fits and job.owner not in owners:
                self._jobs.remove(job)
                taken.append(job)
                budget -= job.pack.tokens  # type: ignore[union-attr]
            if job.owner is not None:
                owners.add(job.owner)

    def _linger(self, taken: list[_Job]) -> None:
        """Let a small pass wait, at most `linger_s`, for the runs that were in a pass of its
        kind within the last RECENT_S and have nothing queued now: on a GPU a small pass
        costs about the same whatever it holds, and a client turns its previous result into
        its next request within milliseconds, so a short wait saves a whole pass. Never
        waits for a run that is not expected, or once the pass is half its budget; other
        queued work keeps its order (call with the lock; the wait releases it)."""
        kind = taken[0].pack.kind  # type: ignore[union-attr]
        recent = self._recent.setdefault(kind, {})
        now = time.monotonic()
        for owner, seen in list(recent.items()):
            if now - seen > RECENT_S:
                del recent[owner]
        deadline = now + self.linger_s
        while True:
            present = {j.owner for j in taken} | {j.owner for j in self._jobs if j is not None}
            tokens = sum(j.pack.tokens for j in taken)  # type: ignore[union-attr]
            left = deadline - time.monotonic()
            if not set(recent) - present or tokens * 2 >= self.pass_tokens or left <= 0:
                break
            self._cv.wait(left)
            if any(j is None for j in self._jobs):  # closing: go now
                break
            self._fill(taken)
        now = time.monotonic()
        for j in taken:
            recent[j.owner] = now

    def _run_pass(self, jobs: list[_Job]) -> None:
        """Compute packed jobs in one `Pack.run` call; if the shared pass itself fails, each
        job is computed alone so that only the one at fault fails."""
        started = time.monotonic()
        if self._metrics is not None:
            self._metrics.job_started(self.name, started)
        pack = jobs[0].pack
        assert pack is not None
        if self._metrics is not None:
            self._metrics.packed(self.name, jobs[0].label, len(jobs))
        try:
            values = pack.run([j.pack.item for j in jobs])  # type: ignore[union-attr]
        except Exception:
            log.exception("a shared pass of %d %s jobs failed; computing them one by one",
                          len(jobs), pack.kind)
            values = []
            for j in jobs:
                try:
                    values += pack.run([j.pack.item])  # type: ignore[union-attr]
                except Exception as e:
                    values.append(e)
        if self._metrics is not None:
            self._metrics.busy(self.name, started, time.monotonic())
        for job, value in zip(jobs, values):
            self._complete(job, value)

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        if self._metrics is not None:
            self._metrics.job_started(self.name, started)
        if job.start is not None:
            try:
                job.start(lambda value: self._complete(job, value))
            except Exception as e:  # the admission itself failed: no done will come
                self._complete(job, e)
            if self._metrics is not None:
                self._metrics.busy(self.name, started, time.monotonic())
            return
        if job.chunks is not None:
            self._run_chunk(job, started)
            return
        try:
            if job.pack is not None:
                if self._metrics is not None:
                    self._metrics.packed(self.name, job.label, 1)
                (value,) = job.pack.run([job.pack.item])
            else:
                assert job.fn is not None
                value = job.fn()
        except Exception as e:
            value = e
        self._complete(job, value, started)

    def _run_chunk(self, job: _Job, started: float) -> None:
        """One micro-batch of a split job. Unfinished, the job goes back to the queue behind
        the next job of another run (never behind a later job of its own run), so a huge
        request shares the model with the others instead of holding it to the end."""
        assert job.chunks is not None
        if job.started is None:
            job.started = started
            if self._metrics is not None:
                self._metrics.packed(self.name, job.label, 1)
        done, value = False, None
        try:
            next(job.chunks)
        except StopIteration as stop:
            done, value = True, stop.value
        except Exception as e:
            done, value = True, e
        if self._metrics is not None:  # each chunk's own compute; the request's latency at the end
            self._metrics.busy(self.name, started, time.monotonic())
        if done:
            self._complete(job, value)
            return
        with self._cv:
            ahead = self._jobs and self._jobs[0] is not None and self._jobs[0].owner != job.owner
            self._jobs.insert(1 if ahead else 0, job)

    def _step(self) -> None:
        assert self._stepper is not None
        started = time.monotonic()
        if self._metrics is not None:
            self._metrics.job_started(self.name, started)
        if self._metrics is not None:
            self._metrics.decoded(self.name, self._stepper.rows)
        try:
            self._stepper.step()  # completes (or fails) the requests it finishes
        except Exception:
            log.exception("decoding step of %s failed", self.name)
        if self._metrics is not None:
            self._metrics.busy(self.name, started, time.monotonic())

    def _complete(self, job: _Job, value: object, started: float | None = None) -> None:
        """Finish a job's future with `value` (an exception fails it). `started` is given for
        a plain job, whose compute is recorded with it; a sampling job's is recorded per step."""
        if isinstance(value, UserError):
            outcome: Outcome = "user_error"
        elif isinstance(value, BaseException):
            outcome = "server_error"
            log.error("job %s (%s) failed", job.request_id, job.label, exc_info=value)
        else:
            outcome = "ok"
        self._record(job, started, outcome, value)
        if isinstance(value, UserError):
            self._futures.set_error(job.request_id, str(value), "user")
        elif isinstance(value, BaseException):
            self._futures.set_error(job.request_id, f"{type(value).__name__}: {value}", "server")
        else:
            self._futures.set_result(job.request_id, value)

    def _record(self, job: _Job, started: float | None, outcome: Outcome, value: object) -> None:
        if self._metrics is None:
            return
        finished = time.monotonic()
        try:
            tokens = 0
            if outcome == "ok":
                tokens = job.tokens(value) if callable(job.tokens) else job.tokens
                if self.on_done is not None:
                    self.on_done(self.name, job.label, job.owner, job.request_id, tokens, value)
            if started is not None:
                self._metrics.job_finished(self.name, job.label, outcome, submitted=job.submitted,
                                           started=started, finished=finished, tokens=tokens)
            else:
                self._metrics.request_done(self.name, job.label, outcome, submitted=job.submitted,
                                           finished=finished, tokens=tokens)
        except Exception:  # metrics must never fail a job
            log.exception("recording metrics of job %s failed", job.request_id)
