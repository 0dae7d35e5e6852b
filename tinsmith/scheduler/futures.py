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

Cancellation (`cancel`): a future created `cancellable` whose work has not begun (the
engine calls `begin` right before running it) is completed at once with a "cancelled"
error, and its work is skipped when its turn comes; one that has begun runs to the end.

Completion feeds (`completions`): a future created with a `feed` key also appends a
(cursor, request id, failed) event to that feed when it completes, so one long poll
(/retrieve_futures) learns of many completions. Cursors grow across restarts (they start
from the clock), so a client's cursor from an earlier boot never hides a new event.

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
CancelOutcome = Literal["cancelled", "running", "done"]
CANCELLED = "cancelled by the client (cancel_future) before it started"
_FEED_EVENTS = 1 << 16  # completions one feed keeps for a client that stopped acknowledging
_FEED_IDLE_S = 3600.0  # unacknowledged events, and feeds without polls, are kept this long


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
    cancellable: bool = False  # cancel() may stop it until begin() is called
    started: bool = False  # begin() was called: its work runs, cancel() cannot stop it
    feed: str | None = None  # the completion feed it reports to


@dataclass
class _Feed:
    """One completion feed: events after the client's last acknowledged cursor."""

    # (cursor, request id, failed, time.monotonic() of the completion), oldest first
    events: deque[tuple[int, str, bool, float]] = field(
        default_factory=lambda: deque(maxlen=_FEED_EVENTS))
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


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
        self._feeds: dict[str, _Feed] = {}
        self._cursor = 0  # the last feed cursor handed out
        self._feeds_swept = time.monotonic()

    def create(
        self, kind: str, owner: str | None = None, max_pending: int | None = None, *,
        cancellable: bool = False, feed: str | None = None,
    ) -> str:
        """A new pending request, retrievable by `owner` (an API key id) or an admin.
        Raises TooManyRequests (429) if `owner` already has `max_pending` pending ones.
        `cancellable`: cancel() may stop it until its work calls begin(). `feed`: its
        completion is also reported to that completion feed."""
        with self._lock:
            if max_pending is not None and self._pending[owner] >= max_pending:
                raise TooManyRequests(max_pending, self._pending[owner])
            self._pending[owner] += 1
            self._purge_locked(time.monotonic())
            rid = f"{self._prefix}{next(self._ids)}"
            created = time.monotonic()
            self._entries[rid] = _Entry(kind=kind, created=created, owner=owner,
                                        cancellable=cancellable, feed=feed)
            self._undelivered[rid] = created
            if feed is not None:
                self._feeds.setdefault(feed, _Feed()).last_used = created
            return rid

    def begin(self, rid: str) -> bool:
        """The engine is about to run `rid`'s work: False if it was cancelled (or has
        otherwise completed) meanwhile, and the work must be skipped. From now on
        cancel() answers "running"."""
        with self._lock:
            e = self._entries.get(rid)
            if e is None or e.done:
                return False
            e.started = True
            return True

    def cancel(self, rid: str, viewer: Viewer | None = None) -> CancelOutcome:
        """Cancel `rid` if its work has not begun: it fails at once with a "cancelled"
        error (category user) and its work is skipped. "running" if it has begun (or is
        not cancellable), "done" if it had completed. Raises as `wait` does for an id that
        is unknown, of an earlier boot, or not the viewer's."""
        with self._lock:
            e = self._lookup_locked(rid, viewer)
            if e.done:
                return "done"
            if e.started or not e.cancellable:
                return "running"
        if self._complete(rid, None, FutureError(CANCELLED, "user"), only_unstarted=True):
            return "cancelled"
        return "done" if not e.started else "running"  # it began or finished just now

    def release(self, rids: list[str], viewer: Viewer | None = None) -> None:
        """The client has its results of `rids`: forget the completed ones it may see."""
        with self._lock:
            for rid in rids:
                e = self._entries.get(rid)
                if e is not None and e.done and (viewer is None or viewer.sees(e.owner)):
                    del self._entries[rid]
                    self._undelivered.pop(rid, None)
                    self._overdue.discard(rid)

    async def completions(
        self, feed: str, prev_cursor: int, timeout: float
    ) -> tuple[list[tuple[str, bool]], int]:
        """The events of `feed` after `prev_cursor`, as (request id, failed), and the cursor
        to pass next; waits up to `timeout` s for one if there is none yet. Events at or
        before `prev_cursor` were seen by the client and are dropped."""
        loop = asyncio.get_running_loop()
        with self._lock:
            f = self._feeds.setdefault(feed, _Feed())
            f.last_used = time.monotonic()
            while f.events and f.events[0][0] <= prev_cursor:
                f.events.popleft()
            waiter: asyncio.Future[None] | None = None
            if not f.events and timeout > 0:
                waiter = loop.create_future()
                f.waiters.append(waiter)
        if waiter is not None:
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    if waiter in f.waiters:
                        f.waiters.remove(waiter)
        with self._lock:
            f.last_used = time.monotonic()
            events = [(rid, failed) for cursor, rid, failed, _ in f.events if cursor > prev_cursor]
            cursor = f.events[-1][0] if events else prev_cursor
        return events, cursor

    def _lookup_locked(self, rid: str, viewer: Viewer | None) -> _Entry:
        e = self._entries.get(rid)
        if e is None and _is_request_id(rid) and not rid.startswith(self._prefix):
            raise LostRequest(rid)
        if e is None or (viewer is not None and not viewer.sees(e.owner)):
            raise KeyError(rid)
        return e

    def set_result(self, rid: str, value: object) -> None:
        self._complete(rid, value, None)

    def set_error(self, rid: str, message: str, category: ErrorCategory = "server") -> None:
        self._complete(rid, None, FutureError(message, category))

    def _complete(self, rid: str, value: object, error: FutureError | None,
                  only_unstarted: bool = False) -> bool:
        """Complete `rid` (False if it already was; with `only_unstarted`, also if its work
        has begun: the check and the completion are one step under the lock)."""
        with self._lock:
            e = self._entries.get(rid)
            if e is None or e.done or (only_unstarted and e.started):
                return False
            e.done, e.value, e.error = True, value, error
            self._pending[e.owner] -= 1
            if self._pending[e.owner] <= 0:
                del self._pending[e.owner]
            waiters, e.waiters = e.waiters, []
            if e.feed is not None:
                f = self._feeds.setdefault(e.feed, _Feed())
                # Cursors from the clock (microseconds), strictly increasing: see the docstring.
                self._cursor = max(self._cursor + 1, time.time_ns() // 1000)
                f.events.append((self._cursor, rid, error is not None, time.monotonic()))
                waiters += f.waiters
                f.waiters = []
        for w in waiters:
            w.get_loop().call_soon_threadsafe(_wake, w)
        return True

    async def wait(
        self, rid: str, timeout: float, viewer: Viewer | None = None
    ) -> tuple[bool, object, FutureError | None]:
        """Wait up to `timeout` s. Returns (done, value, error); raises LostRequest for an id
        of an earlier boot, KeyError if unknown or if `viewer` may not see it (someone else's
        request reads as an unknown one)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            e = self._lookup_locked(rid, viewer)
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
        if now - self._feeds_swept > 60.0:  # events nobody acknowledged, feeds nobody uses
            self._feeds_swept = now
            for key, f in list(self._feeds.items()):
                while f.events and now - f.events[0][3] > _FEED_IDLE_S:
                    f.events.popleft()
                if not f.waiters and not f.events and now - f.last_used > _FEED_IDLE_S:
                    del self._feeds[key]

    def owner(self, rid: str) -> str | None:
        """The API key a request belongs to (None: made while open, or unknown)."""
        with self._lock:
            e = self._entries.get(rid)
            return None if e is None else e.owner

    def outstanding(self) -> list[str]:
        """A line per future not yet delivered (pending, or done and never fetched) and per
        feed with unacknowledged events or waiting polls: what a stuck client waits on."""
        now = time.monotonic()
        with self._lock:
            out = [f"{rid} {e.kind}: {'done' if e.done else 'started' if e.started else 'queued'}"
                   f"{' (failed)' if e.error else ''}, {now - e.created:.1f} s old, feed {e.feed}, "
                   f"{len(e.waiters)} waiting"
                   for rid, e in self._entries.items() if not e.done or e.delivered_at is None]
            out += [f"feed {key}: events {[(c, rid) for c, rid, _, _ in f.events]}, "
                    f"{len(f.waiters)} polls waiting"
                    for key, f in self._feeds.items() if f.events or f.waiters]
        return out

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
