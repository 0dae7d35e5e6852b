"""Who is calling, and what they may see: API keys, callers and ownership.

A server whose database holds no API key is *open*: every request acts as `OPEN`, which
sees everything (the behaviour before keys existed). Once any key has been created
(revoked ones count, so revoking the last key locks the server rather than opening it),
every request needs a valid `X-API-Key`.

Every session, training run, sampler, checkpoint and future records the key id that made
it (`owner`; None when made while the server was open). A caller sees what it owns; an
admin key sees everything. What a caller may not see answers exactly as what does not
exist: the same NotFound, with the same message, so nothing leaks that it exists.
The one exception is a published checkpoint (`public`): every caller sees it (`sees`), and
reads and loads it, but only its owner or an admin may change it (`owned`; others get 403).

Keys are `tml-` + 43 random URL-safe characters (256 bits), the form the SDK requires;
only their SHA-256 is stored, so a key is shown once, when it is made.

A key may expire (`expires_at`): from then on it is refused exactly as a revoked one.
Each key carries optional limits (tinsmith.scheduler.limits); `limits(key_id)` resolves
them over the server's defaults.

A server remembers a good key (and "no keys exist") for `cache_s` (1 s), which keeps the
database off the per-request path: a key revoked or created by another process (the CLI)
takes effect within that time; one revoked through this object at once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from tinsmith.scheduler.limits import Limits
from tinsmith.storage.db import ApiKeyRow, MetadataStore
from tinsmith.types import NotFound, UserError

log = logging.getLogger("tinsmith.access")
KEY_PREFIX = "tml-"
HEADER = "X-API-Key"


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request."""

    key_id: str | None  # None: the server is open (no keys)
    admin: bool = False
    name: str | None = None

    @property
    def open(self) -> bool:
        return self.key_id is None

    @property
    def owner(self) -> str | None:
        """What is recorded as the owner of what this caller makes."""
        return self.key_id

    def sees(self, owner: str | None) -> bool:
        return self.admin or (self.key_id is not None and owner == self.key_id)

    @property
    def listing_owner(self) -> str | None:
        """The owner listings are restricted to; None: everything."""
        return None if self.admin else self.key_id


OPEN = Caller(None, admin=True, name="open")


class Owned(Protocol):
    @property
    def owner(self) -> str | None: ...


T = TypeVar("T", bound=Owned)


def owns(caller: Caller | None, thing: Owned | None) -> bool:
    """Whether `caller` may change `thing`: its own (an admin: anything); no caller (the
    server itself) owns everything."""
    return thing is not None and (caller is None or caller.sees(thing.owner))


def sees(caller: Caller | None, thing: Owned | None) -> bool:
    """Whether `thing` exists for `caller`: it owns it, or `thing` is published (a
    checkpoint whose `public` is set: every caller may read and load it, not change it)."""
    return owns(caller, thing) or bool(getattr(thing, "public", False))


def visible(thing: T | None, caller: Caller | None, missing: str) -> T:
    """`thing` if `caller` may see it, else NotFound(`missing`): what a caller may not see
    answers exactly as what does not exist."""
    if thing is None or not sees(caller, thing):
        raise NotFound(missing)
    return thing


def owned(thing: T | None, caller: Caller | None, what: str, action: str) -> T:
    """`thing` (called `what`, e.g. "checkpoint tinker://...") if `caller` may change it
    (`action`, e.g. "delete it"). NotFound("<what> does not exist") if it may not even see
    it; 403 if it sees it only because it is published."""
    thing = visible(thing, caller, f"{what} does not exist")
    if not owns(caller, thing):
        raise UserError(f"{what} is published by another API key: only its owner may {action}",
                        status_code=403)
    return thing


class Unauthorized(UserError):
    """No usable API key: HTTP 401."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=401)


MISSING_KEY = (f"this server requires an API key: send it in the {HEADER} header "
               "(set TINKER_API_KEY=tml-...); an operator makes one with `tinsmith keys create`")
BAD_KEY = "the API key is invalid or has been revoked"


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str  # the secret itself: shown once, never stored
    name: str | None
    admin: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """API keys in the metadata store, and authentication of a request's key."""

    def __init__(self, db: MetadataStore, cache_s: float = 1.0,
                 defaults: Limits | None = None) -> None:
        self.db = db
        self.defaults = defaults or Limits()
        self._limits: dict[str, tuple[Limits, float]] = {}  # key id -> (limits, valid until)
        self._enabled = False  # once true it stays true: keys are revoked, never deleted
        self._cache_s = cache_s
        self._open_until = 0.0  # "no keys exist" holds until then
        self._good: dict[str, tuple[Caller, float]] = {}  # key hash -> (caller, valid until)

    def create(self, name: str | None = None, *, admin: bool = False,
               expires_at: datetime | None = None, **limits: int | None) -> NewKey:
        """`limits`: max_concurrent, max_request_tokens, max_stored_bytes (None: default)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key-" + secrets.token_hex(6)
        self.db.add_api_key(key_id, key_hash=hash_key(key), hint=key[:10], name=name,
                            is_admin=admin, expires_at=expires_at, **limits)
        self._open_until = 0.0
        return NewKey(key_id, key, name, admin)

    def list(self) -> list[ApiKeyRow]:
        return self.db.list_api_keys()

    def revoke(self, key_id: str) -> bool:
        found = self.db.revoke_api_key(key_id)
        self._good.clear()
        return found

    def set_limits(self, key_id: str, **limits: int | None) -> bool:
        found = self.db.set_api_key_limits(key_id, **limits)
        self._limits.pop(key_id, None)
        return found

    def limits(self, key_id: str | None) -> Limits:
        """The limits of the key `key_id` (None: made while open: the defaults)."""
        if key_id is None:
            return self.defaults
        now = time.monotonic()
        hit = self._limits.get(key_id)
        if hit is not None and now < hit[1]:
            return hit[0]
        return self._remember_limits(key_id, self.db.get_api_key(key_id), now)

    def _remember_limits(self, key_id: str, row: ApiKeyRow | None, now: float) -> Limits:
        limits = self.defaults if row is None else self.defaults.overridden(
            row.max_concurrent, row.max_request_tokens, row.max_stored_bytes)
        if len(self._limits) > 4096:
            self._limits.clear()
        self._limits[key_id] = (limits, now + self._cache_s)
        return limits

    def enabled(self) -> bool:
        """Whether requests need a key: any key was ever created."""
        if self._enabled or time.monotonic() < self._open_until:
            return self._enabled
        if self.db.has_api_keys():
            self._enabled = True
            if self._open_until:  # it was open a moment ago
                log.warning("an API key was created: every request now needs a valid %s", HEADER)
        else:
            self._open_until = time.monotonic() + self._cache_s
        return self._enabled

    def cached(self, key: str | None) -> Caller | None:
        """What `authenticate(key)` answers when that takes no database read: the caller
        from the cache, or None when only `authenticate` can tell (it may read the database,
        or refuse). Never blocks, never raises: the event loop asks this first."""
        now = time.monotonic()
        if not self._enabled:
            return OPEN if now < self._open_until else None
        if not key or not key.startswith(KEY_PREFIX):
            return None
        hit = self._good.get(hash_key(key))
        return hit[0] if hit is not None and now < hit[1] else None

    def authenticate(self, key: str | None) -> Caller:
        """The caller a request's key stands for; raises Unauthorized (401)."""
        if not self.enabled():
            return OPEN
        if not key:
            raise Unauthorized(MISSING_KEY)
        if not key.startswith(KEY_PREFIX):
            raise Unauthorized(BAD_KEY)
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._good.get(digest)
        if hit is not None and now < hit[1]:
            return hit[0]
        row = self.db.api_key_by_hash(digest)
        left = _seconds_left(row.expires_at) if row is not None else 0.0
        if row is None or row.revoked_at is not None or left <= 0:
            self._good.pop(digest, None)
            raise Unauthorized(BAD_KEY)  # an expired key reads exactly as a revoked one
        caller = Caller(row.key_id, admin=row.is_admin, name=row.name)
        if len(self._good) > 4096:
            self._good.clear()
        self._good[digest] = (caller, now + min(self._cache_s, left))
        self._remember_limits(row.key_id, row, now)  # the row at hand: no second read for them
        return caller


def _seconds_left(expires_at: datetime | None) -> float:
    if expires_at is None:
        return float("inf")
    return (expires_at - datetime.now(UTC)).total_seconds()
