"""Per-training-run execution order by the client's `seq_id`, and how its gaps close.

The SDK numbers every request of one training client 1, 2, 3, ... (creation is 0) and
may deliver them out of order: the chunks of one forward_backward call are posted
concurrently with the first chunk last, and a failed POST is retried with the same
seq_id. The gate therefore
- releases jobs strictly in seq order, buffering early arrivals until the gap fills;
- answers a repeated seq_id with the request id it already issued (de-duplication);
- lets a rejected request consume its seq_id (`reject`), because the client moves on:
  every refusal the server gives to a request whose (model_id, seq_id) it could read
  consumes that seq_id (the api layer calls `Service.reject_seq`);
- closes a gap the client will never fill (the gap policy, below).

Gap policy. A seq_id the SDK numbered but never sent (its own client-side validation
failed after it reserved the id, a body too large or too broken to read, a retry budget
spent) would hold every later request of the run forever. So once requests wait behind a
missing seq_id and the run has had no new request for `GapPolicy.timeout_s` (the server
setting `seq_gap_timeout_s`, 10 s by default), every missing seq_id below the waiting
requests is skipped and they are released. The clock restarts at each arrival of any
request of the run, so a client still posting the chunks of a call is never cut short.
A refusal the SDK retries with the same seq_id (429, 5xx: `defer`) means that request is
in flight: no gap of the run is skipped until `retry_grace_s` (60 s, longer than the
SDK's 30 s longest back-off) has passed since the last such refusal. A request arriving
late for a skipped seq_id gets a 400 that says so. Gaps are closed by one sweeper thread
per process, so a held request is released even if the client sends nothing more.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tinsmith.types import UserError

Job = Callable[[], None]
RETRY_GRACE_S = 60.0
MAX_AHEAD = 1 << 20  # how far past the next expected seq_id a request may be numbered
_ISSUED_KEEP = 2048  # de-dup entries kept behind the head (retries come soon after a try)
_CLOSED_KEEP = 256  # skipped / rejected seq ranges remembered for their late arrivals
log = logging.getLogger("tinsmith.ordering")


def _call(job: Job) -> None:
    job()


@dataclass(frozen=True)
class GapPolicy:
    """When a gate gives up on a missing seq_id. `timeout_s` None: never (wait forever)."""

    timeout_s: float | None
    retry_grace_s: float = RETRY_GRACE_S
    name: str = "this training run"  # in messages: the run id
    on_skip: Callable[[list[range], float], None] | None = None  # seq_ids skipped, s waited


@dataclass
class SeqGate:
    next_seq: int = 1
    policy: GapPolicy = field(default_factory=lambda: GapPolicy(None))
    _buffer: dict[int, Job | None] = field(default_factory=dict)  # None: consumed, no job
    _issued: dict[int, str] = field(default_factory=dict)
    # (first, last + 1, why): seq_ids closed without a request that ran, newest last.
    _closed: deque[tuple[int, int, str]] = field(default_factory=lambda: deque(maxlen=_CLOSED_KEEP))
    _release: Callable[[Job], None] = _call
    _last_arrival: float = 0.0  # time.monotonic() of the run's latest request or refusal
    _last_retry: float | None = None  # ... of its latest refusal the SDK retries (429, 5xx)
    _blocked_since: float = 0.0  # when the buffer last went from empty to not empty
    _armed_at: float | None = None  # the sweeper's pending wake-up for this gate
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def issued(self, seq_id: int) -> str | None:
        """The request id already given to this seq_id, if any (a retry)."""
        with self._lock:
            return self._issued.get(seq_id)

    def check_new(self, seq_id: int) -> None:
        with self._lock:
            self._check_open(seq_id)

    def submit(
        self, seq_id: int, request_id: str, job: Job | None, release: Callable[[Job], None] = _call
    ) -> None:
        """Register a job (None = a consumed, rejected seq) and `release` every job that is
        now runnable, in seq order. Releasing under the lock keeps concurrent submitters
        (and the sweeper) from reordering jobs on their way to the worker queue. Raises
        UserError if the seq_id was closed meanwhile (skipped after check_new)."""
        with self._lock:
            self._check_open(seq_id)
            self._release = release
            self._issued[seq_id] = request_id
            self._add(seq_id, job)

    def reject(self, seq_id: int, reason: str, request_id: str | None = None) -> bool:
        """Consume `seq_id` for a request refused before it was queued, so later seq_ids do
        not wait for it. With `request_id` (a future holding the error), a retry gets that
        request back. False, and nothing changes, if the seq_id is already used or closed."""
        with self._lock:
            if (seq_id < self.next_seq or seq_id > self.next_seq + MAX_AHEAD
                    or seq_id in self._buffer or seq_id in self._issued):
                return False
            if request_id is not None:
                self._issued[seq_id] = request_id
            self._closed.append((seq_id, seq_id + 1, f"was rejected: {reason[:300]}"))
            self._add(seq_id, None)
            return True

    def defer(self, seq_id: int) -> None:
        """`seq_id` was refused with a status the SDK retries (429, 5xx): it will come again,
        so no gap of the run is skipped for `policy.retry_grace_s`."""
        with self._lock:
            if seq_id >= self.next_seq and seq_id not in self._issued:
                self._last_retry = self._last_arrival = time.monotonic()
                self._arm()

    def waiting(self) -> int:
        """Jobs held until the seq_ids before theirs arrive."""
        with self._lock:
            return sum(j is not None for j in self._buffer.values())

    def close_expired_gaps(self) -> list[range]:
        """Skip the missing seq_ids below the waiting requests if the policy says so now,
        releasing those requests; the sweeper calls it. Returns the seq_ids skipped."""
        skipped: list[range] = []
        with self._lock:
            self._armed_at = None
            if not self._buffer or self.policy.timeout_s is None:
                return skipped
            now = time.monotonic()
            if now < self._due():
                self._arm()
                return skipped
            waited = now - self._blocked_since
            why = (f"was skipped: requests after it had waited {waited:.1f} s for it "
                   f"(seq_gap_timeout_s={self.policy.timeout_s:g}), so it is refused now to "
                   "keep the run's order")
            while self._buffer:  # skip each missing run of seq_ids, release what follows it
                if self.next_seq not in self._buffer:
                    gap = range(self.next_seq, min(self._buffer))
                    self._closed.append((gap.start, gap.stop, why))
                    skipped.append(gap)
                    self.next_seq = gap.stop
                self._drain()
        if self.policy.on_skip is not None:
            self.policy.on_skip(skipped, waited)
        return skipped

    # ----- internals, called with the lock held -------------------------------------------
    def _check_open(self, seq_id: int) -> None:
        if seq_id < 1:
            raise UserError(f"seq_id {seq_id} is out of range: a training run's seq_ids start at 1")
        if seq_id > self.next_seq + MAX_AHEAD:
            raise UserError(f"seq_id {seq_id} is too far ahead of {self.policy.name} "
                            f"(next expected: {self.next_seq})")
        if seq_id in self._issued or (seq_id >= self.next_seq and seq_id not in self._buffer):
            return
        for lo, hi, why in reversed(self._closed):  # skipped, or rejected without a request id
            if lo <= seq_id < hi:
                raise UserError(f"seq_id {seq_id} of {self.policy.name} {why}")
        raise UserError(f"seq_id {seq_id} was already executed for {self.policy.name} "
                        f"(next expected: {self.next_seq})")

    def _add(self, seq_id: int, job: Job | None) -> None:
        now = time.monotonic()
        if not self._buffer:
            self._blocked_since = now
        self._last_arrival = now
        self._buffer[seq_id] = job
        self._drain()
        if self._buffer:
            self._arm()
        # Keep the de-dup map bounded: ids far behind the head cannot be retried any more.
        if len(self._issued) > 2 * _ISSUED_KEEP:
            for s in sorted(self._issued)[: len(self._issued) - _ISSUED_KEEP]:
                if s < self.next_seq:
                    del self._issued[s]

    def _drain(self) -> None:
        while self.next_seq in self._buffer:
            j = self._buffer.pop(self.next_seq)
            self.next_seq += 1
            if j is not None:
                self._release(j)

    def _due(self) -> float:
        """When the gap may be skipped: the run idle for timeout_s, and no retry pending."""
        assert self.policy.timeout_s is not None
        due = self._last_arrival + self.policy.timeout_s
        if self._last_retry is not None:
            due = max(due, self._last_retry + self.policy.retry_grace_s)
        return due

    def _arm(self) -> None:
        """Have the sweeper look at this gate when its gap may be due. One wake-up at a time:
        the due time only moves later, and an early wake-up re-arms for the new one."""
        if self._armed_at is None and self._buffer and self.policy.timeout_s is not None:
            self._armed_at = self._due()
            _SWEEPER.wake(self, self._armed_at)


class _Sweeper:
    """One daemon thread per process that wakes gates whose gaps may be due."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, weakref.ref[SeqGate]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def wake(self, gate: SeqGate, at: float) -> None:
        with self._cv:
            heapq.heappush(self._heap, (at, next(self._order), weakref.ref(gate)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="seq-gap-sweeper",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                ref = heapq.heappop(self._heap)[2]
            gate = ref()
            if gate is not None:
                try:
                    gate.close_expired_gaps()
                except Exception:  # a broken release or callback must not stop the sweeper
                    log.exception("closing a seq_id gap failed")


_SWEEPER = _Sweeper()
