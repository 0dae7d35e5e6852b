"""What every query mixin of MetadataStore stands on: one short session (and transaction)
per call, and the store's clock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

_clock_lock = threading.Lock()
_last_now = datetime.min.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """UTC now, strictly increasing within the process so "newest first" never ties."""
    global _last_now
    with _clock_lock:
        t = datetime.now(UTC)
        if t <= _last_now:
            t = _last_now + timedelta(microseconds=1)
        _last_now = t
        return t


class StoreBase:
    """The engine and its sessions. The store is shared by several threads (the asyncio API
    thread, the engine worker), so each method opens its own short session and returns rows
    detached from it (tinsmith.storage.models)."""

    _engine: Engine
    _sessions: sessionmaker[Session]

    def _attach(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        with self._sessions.begin() as s:
            if write:
                s.connection(execution_options={"tinsmith_write": True})
            yield s

    def _update(self, model: type, key: str, **values: Any) -> bool:
        """Set columns of one row by primary key; False if there is no such row."""
        with self._tx(write=True) as s:
            obj = s.get(model, key)
            if obj is None:
                return False
            for name, value in values.items():
                setattr(obj, name, value)
            return True
