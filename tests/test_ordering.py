"""SeqGate: strict seq order with early arrivals buffered, retries de-duplicated, and
rejected requests consuming their seq_id."""

from __future__ import annotations

import pytest

from tinsmith.scheduler.ordering import SeqGate
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
    assert ran == [2] and gate.next_seq == 3
