"""Per-key limits: concurrent requests, tokens per request and stored checkpoint bytes.

Each API key may carry its own limits (columns of its row, `tinsmith keys limits`; 0
there means unlimited); what it leaves unset (NULL), and every caller of an open server,
gets the server-wide defaults (ServerSettings). None means unlimited. A request over a limit is refused at once with a
4xx that names the limit and the amount, before anything is queued, so it costs the other
keys nothing:

- concurrent requests: the key's futures not yet completed (queued, held or running) ->
  429. Counted by FutureStore per owner. The SDK retries a 429 (training calls for up to
  5 minutes with backoff, sampling until it goes through), which makes the limit act as
  backpressure on that key alone.
- tokens per request: a forward/forward_backward's tokens over all its datums, or a
  sample's prompt tokens + max_tokens * num_samples -> 413.
- stored bytes: the sizes of the key's checkpoints. A save is refused at submission (413)
  when the key is already at its limit, and its future fails (category "user") without
  writing anything when the new checkpoint would take it past the limit: the size is
  known before the files are written. `StoredBytes` reserves the bytes of saves in flight
  so two concurrent saves cannot both slip under the limit.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tinsmith.config import DEFAULT_MAX_REQUEST_TOKENS
from tinsmith.types import UserError


@dataclass(frozen=True)
class Limits:
    """One key's effective limits; None: unlimited."""

    max_concurrent: int | None = None
    max_request_tokens: int | None = DEFAULT_MAX_REQUEST_TOKENS
    max_stored_bytes: int | None = None

    def overridden(self, max_concurrent: int | None, max_request_tokens: int | None,
                   max_stored_bytes: int | None) -> Limits:
        """These limits with a key's own values in their place, as its row stores them:
        None keeps the default, 0 means unlimited."""
        return Limits(_own(max_concurrent, self.max_concurrent),
                      _own(max_request_tokens, self.max_request_tokens),
                      _own(max_stored_bytes, self.max_stored_bytes))


def _own(value: int | None, default: int | None) -> int | None:
    if value is None:
        return default
    return value or None


class TooManyRequests(UserError):
    """Over the concurrent-request limit: HTTP 429."""

    def __init__(self, limit: int, count: int) -> None:
        super().__init__(
            f"too many concurrent requests for this API key: {count} not yet completed, "
            f"limit max_concurrent={limit}; wait for some to finish", status_code=429)


class TooLarge(UserError):
    """Over a size limit: HTTP 413."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=413)


def check_request_tokens(tokens: int, limits: Limits, what: str) -> None:
    limit = limits.max_request_tokens
    if limit is not None and tokens > limit:
        raise TooLarge(f"{what} is {tokens} tokens, over this API key's limit "
                       f"max_request_tokens={limit}; split it into smaller requests")


def check_stored_room(stored: int, limits: Limits) -> None:
    """At submission: refuse a save when the key already holds its limit."""
    limit = limits.max_stored_bytes
    if limit is not None and stored >= limit:
        raise TooLarge(f"this API key stores {stored} bytes of checkpoints, at its limit "
                       f"max_stored_bytes={limit}; delete checkpoints to save more")


class StoredBytes:
    """Bytes of checkpoint saves in flight, per owner, on top of what the database lists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[str | None] = Counter()

    @contextmanager
    def reserve(self, owner: str | None, size: int, stored: int, limits: Limits) -> Iterator[None]:
        """Hold `size` bytes for a save while it writes; TooLarge if `stored` (the key's
        listed bytes, less a checkpoint being overwritten) + saves in flight + `size` is over."""
        limit = limits.max_stored_bytes
        with self._lock:
            total = stored + self._pending[owner] + size
            if limit is not None and total > limit:
                raise TooLarge(
                    f"this checkpoint is {size} bytes; with the {stored + self._pending[owner]} "
                    f"bytes this API key already stores it would be {total}, over its limit "
                    f"max_stored_bytes={limit}; delete checkpoints to save more")
            self._pending[owner] += size
        try:
            yield
        finally:
            with self._lock:
                self._pending[owner] -= size
                if self._pending[owner] <= 0:
                    del self._pending[owner]
