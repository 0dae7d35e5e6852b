"""SeqGate: strict seq order with early arrivals buffered, retries de-duplicated,
rejected requests consuming their seq_id, and the gap policy closing gaps the client will
never fill (skipped after a timeout, later for a seq_id the SDK is retrying)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tinsmith.scheduler.ordering import MAX_AHEAD, GapPolicy, SeqGate
from tinsmith.types import UserError


def test_out_of_order_arrivals_run_in_seq_order() -> None:
    gate, ran = SeqGate(), []
    for seq in (3, 2, 5):  # chunks arrive early, the first one last
        gate.submit(seq, f"r{seq}", lambda s=seq: ran.append(s), lambda j: j())
    assert ran == [] and gate.waiting() == 3
    gate.submit(1, "r1", lambda: ran.append(1), lambda j: j())
    assert ran == [1, 2, 3] and gate.waiting() == 1  # 5 waits for 4
    gate.submit(4, "r4", lambda: ran.append(4), lambda j: j())
    assert ran == [1, 2, 3, 4, 5] and gate.next_seq == 6


def test_retry_returns_same_request_and_old_seq_is_rejected() -> None:
    gate = SeqGate()
    gate.submit(1, "first", lambda: None, lambda j: j())
    assert gate.issued(1) == "first"
    assert gate.issued(2) is None
    gate.check_new(2)
    with pytest.raises(UserError, match="seq_id 0"):
        gate.check_new(0)
    gate2 = SeqGate(next_seq=10)
    with pytest.raises(UserError, match="already executed"):
        gate2.check_new(3)


def test_rejected_request_consumes_its_seq() -> None:
    gate, ran = SeqGate(), []
    gate.submit(2, "r2", lambda: ran.append(2), lambda j: j())
    gate.submit(1, "r1", None, lambda j: j())  # seq 1 was rejected at submission
    assert ran == [2] and gate.next_seq == 3 and gate.issued(1) == "r1"


# --- the gap policy: real time and the real sweeper thread, with short timeouts ------------

def _gate(timeout_s: float | None, retry_grace_s: float = 60.0) -> tuple[SeqGate, list[int], list[list[range]]]:
    skips: list[list[range]] = []
    policy = GapPolicy(timeout_s, retry_grace_s=retry_grace_s, name="run-x",
                       on_skip=lambda seqs, _: skips.append(seqs))
    return SeqGate(policy=policy), [], skips


def _job(ran: list[int], seq: int) -> Callable[[], None]:
    return lambda: ran.append(seq)


def _until(cond: Callable[[], bool], limit_s: float = 10.0) -> float:
    """Seconds until `cond()` holds (fails past `limit_s`)."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < limit_s, "condition never held"
        time.sleep(0.01)
    return time.monotonic() - start


def test_out_of_order_arrivals_within_the_timeout_are_reordered_not_skipped() -> None:
    gate, ran, skips = _gate(timeout_s=1.0)
    for seq in (4, 3, 2):  # 1.2 s in all, but each arrival restarts the clock
        gate.submit(seq, f"r{seq}", _job(ran, seq))
        time.sleep(0.4)
    gate.submit(1, "r1", _job(ran, 1))
    assert ran == [1, 2, 3, 4] and skips == [] and gate.next_seq == 5
    time.sleep(1.2)  # nothing waits: nothing to skip later either
    assert skips == [] and gate.next_seq == 5


def test_a_gap_is_skipped_after_the_timeout_without_any_new_request() -> None:
    gate, ran, skips = _gate(timeout_s=0.3)
    gate.submit(1, "r1", _job(ran, 1))
    start = time.monotonic()
    for seq in (3, 6, 7):  # seq_ids 2, 4 and 5 never come
        gate.submit(seq, f"r{seq}", _job(ran, seq))
    assert ran == [1] and gate.waiting() == 3
    _until(lambda: ran == [1, 3, 6, 7])  # released by the sweeper thread ...
    assert time.monotonic() - start >= 0.3  # ... not before the timeout
    assert skips == [[range(2, 3), range(4, 6)]] and gate.next_seq == 8
    for late in (2, 5):  # a late arrival is told it was skipped, not "already executed"
        with pytest.raises(UserError, match=f"seq_id {late} of run-x was skipped.*seq_gap_timeout_s=0.3"):
            gate.check_new(late)
    with pytest.raises(UserError, match="was skipped"):
        gate.submit(4, "r4", _job(ran, 4))
    assert gate.issued(3) == "r3"  # one that ran is still a retry
    gate.submit(8, "r8", _job(ran, 8))  # the run goes on
    assert ran[-1] == 8


def test_a_seq_refused_with_429_is_not_skipped_while_the_sdk_retries_it() -> None:
    gate, ran, skips = _gate(timeout_s=0.2, retry_grace_s=1.5)
    gate.defer(1)  # seq_id 1 got a 429: the SDK will send it again after a back-off
    gate.submit(2, "r2", _job(ran, 2))
    time.sleep(0.8)  # four times the timeout
    assert ran == [] and skips == []
    gate.submit(1, "r1", _job(ran, 1))  # the retry
    assert ran == [1, 2] and skips == []
    # A retry that never comes: skipped once the retry grace is over.
    gate.defer(3)
    start = time.monotonic()
    gate.submit(4, "r4", _job(ran, 4))
    _until(lambda: ran == [1, 2, 4])
    assert time.monotonic() - start >= 1.3 and skips == [[range(3, 4)]]


def test_a_rejected_seq_is_consumed_once_and_named_on_return() -> None:
    gate, ran, _ = _gate(timeout_s=None)
    gate.submit(3, "r3", _job(ran, 3))
    assert gate.reject(2, "bad optimizer") and not gate.reject(2, "again")
    assert not gate.reject(3, "already has a request") and gate.waiting() == 1
    gate.submit(1, "r1", _job(ran, 1))
    assert ran == [1, 3]
    with pytest.raises(UserError, match="seq_id 2 of run-x was rejected: bad optimizer"):
        gate.check_new(2)
    assert not gate.reject(1, "old") and not gate.reject(MAX_AHEAD + 10, "far ahead")
    with pytest.raises(UserError, match="too far ahead"):
        gate.check_new(gate.next_seq + MAX_AHEAD + 1)
    # A request refused after it got a request id keeps it: a retry gets the same request.
    assert gate.reject(4, "invalid", request_id="r4")
    assert gate.issued(4) == "r4" and gate.next_seq == 5


def test_without_a_timeout_a_gap_waits_for_the_client() -> None:
    gate, ran, _ = _gate(timeout_s=None)
    gate.submit(2, "r2", _job(ran, 2))
    assert gate.close_expired_gaps() == [] and ran == []
    time.sleep(0.3)
    assert ran == [] and gate.waiting() == 1
