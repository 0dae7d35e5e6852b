"""Per-training-run execution order by the client's `seq_id`.

The SDK numbers every request of one training client 1, 2, 3, ... (creation is 0) and
may deliver them out of order: the chunks of one forward_backward call are posted
concurrently with the first chunk last, and a failed POST is retried with the same
seq_id. The gate therefore
- releases jobs strictly in seq order, buffering early arrivals until the gap fills;
- answers a repeated seq_id with the request id it already issued (de-duplication);
- lets a rejected request consume its seq_id (`skip`), because the client moves on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tinsmith.types import UserError

Job = Callable[[], None]


@dataclass
class SeqGate:
    next_seq: int = 1
    _buffer: dict[int, Job | None] = field(default_factory=dict)
    _issued: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def issued(self, seq_id: int) -> str | None:
        """The request id already given to this seq_id, if any (a retry)."""
        with self._lock:
            return self._issued.get(seq_id)

    def check_new(self, seq_id: int) -> None:
        with self._lock:
            if seq_id < self.next_seq and seq_id not in self._issued:
                raise UserError(
                    f"seq_id {seq_id} was already executed for this training run "
                    f"(next expected: {self.next_seq})"
                )
            if seq_id < 1:
                raise UserError(f"seq_id must be >= 1, got {seq_id}")

    def submit(
        self, seq_id: int, request_id: str, job: Job | None, release: Callable[[Job], None]
    ) -> None:
        """Register a job (None = a consumed, rejected seq) and `release` every job that is
        now runnable, in seq order. Releasing under the lock keeps concurrent submitters
        from reordering jobs on their way to the worker queue."""
        with self._lock:
            self._issued[seq_id] = request_id
            self._buffer[seq_id] = job
            while self.next_seq in self._buffer:
                j = self._buffer.pop(self.next_seq)
                self.next_seq += 1
                if j is not None:
                    release(j)
            # Keep the de-dup map bounded: ids far behind the head cannot be retried any more.
            if len(self._issued) > 4096:
                for s in sorted(self._issued)[: len(self._issued) - 2048]:
                    if s < self.next_seq:
                        del self._issued[s]

    def waiting(self) -> int:
        with self._lock:
            return len(self._buffer)
