"""FutureStore: long-poll waits, completion from another thread wakes the waiter at once,
results stay readable for repeated polls, errors carry their category."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tinsmith.scheduler.futures import FutureStore


def test_wait_times_out_then_wakes_on_completion_from_a_thread() -> None:
    store = FutureStore()
    rid = store.create("forward_backward")

    async def main() -> tuple:
        t0 = time.perf_counter()
        done, _, _ = await store.wait(rid, 0.05)
        waited = time.perf_counter() - t0
        threading.Timer(0.1, store.set_result, args=(rid, {"x": 1})).start()
        t1 = time.perf_counter()
        result = await store.wait(rid, 10.0)
        return done, waited, result, time.perf_counter() - t1

    done, waited, result, woke_after = asyncio.run(main())
    assert not done and waited >= 0.05
    assert result == (True, {"x": 1}, None)
    assert woke_after < 2.0  # woken by the completion, not by the 10 s timeout


def test_results_survive_repeated_polls_and_errors_have_categories() -> None:
    store = FutureStore()
    ok, bad = store.create("a"), store.create("b")
    store.set_result(ok, 42)
    store.set_error(bad, "boom", "user")

    async def main() -> list:
        return [await store.wait(ok, 1), await store.wait(ok, 1), await store.wait(bad, 1)]

    first, second, err = asyncio.run(main())
    assert first == second == (True, 42, None)
    assert err[0] and err[2].message == "boom" and err[2].category == "user"
    with pytest.raises(KeyError):
        asyncio.run(store.wait("req-unknown", 0.01))


def test_delivered_results_expire() -> None:
    store = FutureStore(keep_after_delivery_s=0.0)
    rid = store.create("a")
    store.set_result(rid, 1)
    asyncio.run(store.wait(rid, 1))
    time.sleep(0.01)
    store.create("b")  # creation purges expired entries
    with pytest.raises(KeyError):
        asyncio.run(store.wait(rid, 0.01))


def test_undelivered_results_expire_but_pending_ones_wait_until_done() -> None:
    store = FutureStore(keep_after_delivery_s=3600.0, keep_undelivered_s=0.0)
    finished, pending = store.create("a"), store.create("b")
    store.set_result(finished, 1)
    time.sleep(0.01)
    store.create("c")  # purges: `finished` was never delivered and is past its keep time
    with pytest.raises(KeyError):
        asyncio.run(store.wait(finished, 0.01))
    assert asyncio.run(store.wait(pending, 0.01)) == (False, None, None)  # pending: kept
    store.set_result(pending, 2)
    store.create("d")  # done now, and long past its keep time
    with pytest.raises(KeyError):
        asyncio.run(store.wait(pending, 0.01))


def test_expiry_bookkeeping_holds_only_what_is_kept() -> None:
    store = FutureStore(keep_after_delivery_s=0.0)

    async def cycles() -> None:
        for i in range(500):
            rid = store.create("a")
            store.set_result(rid, i)
            assert await store.wait(rid, 1) == (True, i, None)

    asyncio.run(cycles())
    time.sleep(0.01)
    last = store.create("z")
    # Delivered results left both the store and its expiry queues; only `last` remains.
    assert list(store._entries) == [last]
    assert not store._by_delivery and list(store._undelivered) == [last]
