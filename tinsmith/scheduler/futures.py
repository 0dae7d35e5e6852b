"""The futures store: every long operation's result, awaited by long-polling clients.

A future is created on the event loop when a request is accepted, completed from the
engine's worker thread, and read by `retrieve_future` polls that may arrive many times
(poll iterations, retries after a client time-out). Results therefore stay readable for
`keep_after_delivery_s` after their first delivery and `keep_undelivered_s` otherwise.
Expired entries are dropped when a request is created, from two queues in time order (by
delivery, and by creation for the undelivered ones), so creating a request looks only at
what expired, never at every entry kept.

Thread safety: all state is guarded by one lock; waiters are asyncio futures woken with
`call_soon_threadsafe`, so completion from any thread wakes the loop at once (no polling).

Futures live in memory only. Every request id carries the store's boot id, a random token
made when the server starts (`req-<boot>-<n>`), so an id issued before a restart is never
mistaken for a new one, and `wait` says it was lost (`LostRequest`) instead of merely unknown.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tinsmith.scheduler.limits import TooManyRequests

ErrorCategory = Literal["user", "server"]


class Viewer(Protocol):
    """Who polls (tinsmith.scheduler.access.Caller)."""

    def sees(self, owner: str | None) -> bool: ...


@dataclass
class FutureError:
    message: str
    category: ErrorCategory


@dataclass
class _Entry:
    kind: str
    created: float
    done: bool = False
    value: object = None
    error: FutureError | None = None
    delivered_at: float | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    owner: str | None = None  # the API key whose run or sampler it belongs to


class LostRequest(KeyError):
    """A request id from an earlier run of the server: its future died with that process."""


class FutureStore:
    def __init__(self, keep_after_delivery_s: float = 300.0, keep_undelivered_s: float = 3600.0):
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count(1)
        self.boot_id = secrets.token_hex(4)
        self._prefix = f"req-{self.boot_id}-"
        self._keep_after_delivery_s = keep_after_delivery_s
        self._keep_undelivered_s = keep_undelivered_s
        self._pending: Counter[str | None] = Counter()  # owner -> futures not yet completed
        # Expiry bookkeeping (see _purge_locked), both in time order:
        self._by_delivery: deque[tuple[float, str]] = deque()  # (first delivery, id)
        self._undelivered: OrderedDict[str, float] = OrderedDict()  # id -> created, oldest first
        self._overdue: set[str] = set()  # pending past keep_undelivered_s: dropped once done

    def create(self, kind: str, owner: str | None = None, max_pending: int | None = None) -> str:
        """A new pending request, retrievable by `owner` (an API key id) or an admin.
        Raises TooManyRequests (429) if `owner` already has `max_pending` pending ones."""
        with self._lock:
            if max_pending is not None and self._pending[owner] >= max_pending:
                raise TooManyRequests(max_pending, self._pending[owner])
            self._pending[owner] += 1
            self._purge_locked(time.monotonic())
            rid = f"{self._prefix}{next(self._ids)}"
            created = time.monotonic()
            self._entries[rid] = _Entry(kind=kind, created=created, owner=owner)
            self._undelivered[rid] = created
            return rid

    def set_result(self, rid: str, value: object) -> None:
        self._complete(rid, value, None)

    def set_error(self, rid: str, message: str, category: ErrorCategory = "server") -> None:
        self._complete(rid, None, FutureError(message, category))

    def _complete(self, rid: str, value: object, error: FutureError | None) -> None:
        with self._lock:
            e = self._entries.get(rid)
            if e is None or e.done:
                return
            e.done, e.value, e.error = True, value, error
            self._pending[e.owner] -= 1
            if self._pending[e.owner] <= 0:
                del self._pending[e.owner]
            waiters, e.waiters = e.waiters, []
        for w in waiters:
            w.get_loop().call_soon_threadsafe(_wake, w)

    async def wait(
        self, rid: str, timeout: float, viewer: Viewer | None = None
    ) -> tuple[bool, object, FutureError | None]:
        """Wait up to `timeout` s. Returns (done, value, error); raises LostRequest for an id
        of an earlier boot, KeyError if unknown or if `viewer` may not see it (someone else's
        request reads as an unknown one)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            e = self._entries.get(rid)
            if e is None and _is_request_id(rid) and not rid.startswith(self._prefix):
                raise LostRequest(rid)
            if e is None or (viewer is not None and not viewer.sees(e.owner)):
                raise KeyError(rid)
            if not e.done:
                waiter: asyncio.Future[None] = loop.create_future()
                e.waiters.append(waiter)
            else:
                waiter = None  # type: ignore[assignment]
        if waiter is not None:
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                with self._lock:
                    if waiter in e.waiters:
                        e.waiters.remove(waiter)
                return False, None, None
        with self._lock:
            if e.delivered_at is None:
                e.delivered_at = time.monotonic()
                self._by_delivery.append((e.delivered_at, rid))
                if e.delivered_at + self._keep_after_delivery_s <= e.created + self._keep_undelivered_s:
                    self._undelivered.pop(rid, None)  # it expires by delivery first
            return True, e.value, e.error

    def _purge_locked(self, now: float) -> None:
        """Drop the completed entries past their keep time: `keep_after_delivery_s` after
        their first delivery, or `keep_undelivered_s` after their creation. A pending entry
        never expires; one pending past `keep_undelivered_s` goes once it completes."""
        by_delivery, undelivered = self._by_delivery, self._undelivered
        while by_delivery and now - by_delivery[0][0] > self._keep_after_delivery_s:
            rid = by_delivery.popleft()[1]
            self._entries.pop(rid, None)
            undelivered.pop(rid, None)
        while undelivered:
            rid, created = next(iter(undelivered.items()))
            if now - created <= self._keep_undelivered_s:
                break
            del undelivered[rid]
            e = self._entries.get(rid)
            if e is not None and e.done:
                del self._entries[rid]
            elif e is not None:
                self._overdue.add(rid)
        if self._overdue:
            for rid in [r for r in self._overdue if r not in self._entries or self._entries[r].done]:
                self._overdue.discard(rid)
                self._entries.pop(rid, None)

    def fail_all_pending(self, message: str) -> None:
        with self._lock:
            pending = [rid for rid, e in self._entries.items() if not e.done]
        for rid in pending:
            self.set_error(rid, message, "server")


def _is_request_id(rid: str) -> bool:
    """Shaped like an id some FutureStore issued (`req-<boot>-<n>`; before boot ids existed,
    `req-<5 digits>-<n>`)."""
    parts = rid.split("-")
    return len(parts) == 3 and parts[0] == "req" and parts[1].isalnum() and parts[2].isdigit()


def _wake(w: asyncio.Future[None]) -> None:
    if not w.done():
        w.set_result(None)
