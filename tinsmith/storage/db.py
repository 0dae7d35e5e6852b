"""Metadata store of the server: sessions, training runs, checkpoints and samplers.

SQLAlchemy 2 ORM over a database URL: a SQLite file by default
(``sqlite:////abs/path/tinsmith.db``, WAL mode), PostgreSQL by URL. Only portable SQL is
used (JSON columns through ``sqlalchemy.JSON``). All datetimes are timezone-aware UTC.

The store is shared by several threads (the asyncio API thread, the engine worker), so
each method opens its own short session and returns frozen dataclasses that are detached
from any session. Everything written survives a restart: a new ``MetadataStore`` on the
same URL sees the same rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

_clock_lock = threading.Lock()
_last_now = datetime.min.replace(tzinfo=UTC)


def _now() -> datetime:
    """UTC now, strictly increasing within the process so "newest first" never ties."""
    global _last_now
    with _clock_lock:
        now = datetime.now(UTC)
        if now <= _last_now:
            now = _last_now + timedelta(microseconds=1)
        _last_now = now
        return now


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class _Session(Base):
    __tablename__ = "sessions"
    session_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    tags: Mapped[list[str]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(JSON)
    display_name: Mapped[str | None] = mapped_column(String(1024))
    project_id: Mapped[str | None] = mapped_column(String(255))
    sdk_version: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finish_reason: Mapped[str | None] = mapped_column(String(1024))


class _Run(Base):
    __tablename__ = "training_runs"
    training_run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(255), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_request_time: Mapped[datetime] = mapped_column(UTCDateTime)


class _Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("training_run_id", "checkpoint_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    training_run_id: Mapped[str] = mapped_column(String(255), index=True)
    checkpoint_id: Mapped[str] = mapped_column(String(255))
    checkpoint_type: Mapped[str] = mapped_column(String(16))
    tinker_path: Mapped[str] = mapped_column(String(1024), unique=True)
    storage_key: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    base_model: Mapped[str] = mapped_column(String(255))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)


class _Sampler(Base):
    __tablename__ = "samplers"
    sampler_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(255), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    model_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    created_at: datetime
    last_heartbeat_at: datetime
    tags: list[str]
    user_metadata: dict[str, Any]
    display_name: str | None
    project_id: str | None
    sdk_version: str | None
    finished_at: datetime | None
    finish_reason: str | None


@dataclass(frozen=True)
class RunRow:
    training_run_id: str
    session_id: str
    base_model: str
    lora: dict[str, Any]
    user_metadata: dict[str, Any] | None
    created_at: datetime
    last_request_time: datetime


@dataclass(frozen=True)
class CheckpointRow:
    training_run_id: str
    checkpoint_id: str
    checkpoint_type: str
    tinker_path: str
    storage_key: str
    size_bytes: int
    created_at: datetime
    expires_at: datetime | None
    user_metadata: dict[str, Any] | None
    base_model: str
    lora: dict[str, Any]


@dataclass(frozen=True)
class SamplerRow:
    sampler_id: str
    session_id: str
    base_model: str
    model_path: str | None
    created_at: datetime


_R = TypeVar("_R")


def _row(cls: type[_R], obj: Any) -> _R:
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})  # type: ignore[arg-type]


class MetadataStore:
    """Thread-safe metadata store; one short session (and transaction) per call."""

    def __init__(self, url: str) -> None:
        u = make_url(url)
        self._sqlite = u.get_backend_name() == "sqlite"
        kw: dict[str, Any] = {}
        if self._sqlite:
            kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if u.database in (None, "", ":memory:"):
                kw["poolclass"] = StaticPool  # one shared connection, else each one is a new DB
            else:
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = create_engine(u, **kw)
        if self._sqlite:
            self._setup_sqlite()
        Base.metadata.create_all(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def _setup_sqlite(self) -> None:
        # pysqlite's own BEGIN is deferred: a read-then-write transaction can then fail
        # with "database is locked" at once instead of waiting. Writers emit BEGIN
        # IMMEDIATE themselves (SQLAlchemy's documented recipe), so they queue on the lock.
        @event.listens_for(self._engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(self._engine, "begin")
        def _begin(conn: Any) -> None:
            write = conn.get_execution_options().get("tinsmith_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        with self._sessions.begin() as s:
            if write:
                s.connection(execution_options={"tinsmith_write": True})
            yield s

    def close(self) -> None:
        self._engine.dispose()

    # --- sessions -------------------------------------------------------------------

    def add_session(self, session_id: str, *, tags: list[str], user_metadata: dict[str, Any],
                    display_name: str | None = None, project_id: str | None = None,
                    sdk_version: str | None = None) -> SessionRow:
        now = _now()
        obj = _Session(session_id=session_id, created_at=now, last_heartbeat_at=now,
                       tags=list(tags), user_metadata=dict(user_metadata),
                       display_name=display_name, project_id=project_id,
                       sdk_version=sdk_version, finished_at=None, finish_reason=None)
        with self._tx(write=True) as s:
            s.add(obj)
        return _row(SessionRow, obj)

    def _update(self, model: type, key: str, **values: Any) -> bool:
        """Set columns of one row by primary key; False if there is no such row."""
        with self._tx(write=True) as s:
            obj = s.get(model, key)
            if obj is None:
                return False
            for name, value in values.items():
                setattr(obj, name, value)
            return True

    def heartbeat(self, session_id: str) -> bool:
        return self._update(_Session, session_id, last_heartbeat_at=_now())

    def finish_session(self, session_id: str, reason: str) -> None:
        self._update(_Session, session_id, finished_at=_now(), finish_reason=reason)

    def get_session(self, session_id: str) -> SessionRow | None:
        with self._tx() as s:
            obj = s.get(_Session, session_id)
            return None if obj is None else _row(SessionRow, obj)

    def list_sessions(self, limit: int = 20, offset: int = 0) -> list[SessionRow]:
        q = select(_Session).order_by(_Session.created_at.desc()).limit(limit).offset(offset)
        with self._tx() as s:
            return [_row(SessionRow, o) for o in s.scalars(q)]

    # --- training runs --------------------------------------------------------------

    def add_run(self, training_run_id: str, *, session_id: str, base_model: str,
                lora: dict[str, Any], user_metadata: dict[str, Any] | None = None) -> RunRow:
        now = _now()
        obj = _Run(training_run_id=training_run_id, session_id=session_id,
                   base_model=base_model, lora=dict(lora),
                   user_metadata=None if user_metadata is None else dict(user_metadata),
                   created_at=now, last_request_time=now)
        with self._tx(write=True) as s:
            s.add(obj)
        return _row(RunRow, obj)

    def touch_run(self, training_run_id: str) -> None:
        self._update(_Run, training_run_id, last_request_time=_now())

    def get_run(self, training_run_id: str) -> RunRow | None:
        with self._tx() as s:
            obj = s.get(_Run, training_run_id)
            return None if obj is None else _row(RunRow, obj)

    def list_runs(self, limit: int = 20, offset: int = 0) -> tuple[list[RunRow], int]:
        q = select(_Run).order_by(_Run.created_at.desc()).limit(limit).offset(offset)
        with self._tx() as s:
            total = s.scalar(select(func.count()).select_from(_Run)) or 0
            return [_row(RunRow, o) for o in s.scalars(q)], total

    def runs_of_session(self, session_id: str) -> list[str]:
        q = (select(_Run.training_run_id).where(_Run.session_id == session_id)
             .order_by(_Run.created_at))
        with self._tx() as s:
            return list(s.scalars(q))

    # --- checkpoints ----------------------------------------------------------------

    def upsert_checkpoint(self, training_run_id: str, checkpoint_id: str, *,
                          checkpoint_type: str, tinker_path: str, storage_key: str,
                          size_bytes: int, base_model: str, lora: dict[str, Any],
                          user_metadata: dict[str, Any] | None = None,
                          expires_at: datetime | None = None) -> CheckpointRow:
        """Insert, or replace the whole row (fresh created_at) if the key already exists."""
        if checkpoint_type not in ("training", "sampler"):
            raise ValueError(f"checkpoint_type must be 'training' or 'sampler', "
                             f"not {checkpoint_type!r}")
        values = dict(training_run_id=training_run_id, checkpoint_id=checkpoint_id,
                      checkpoint_type=checkpoint_type, tinker_path=tinker_path,
                      storage_key=storage_key, size_bytes=size_bytes, expires_at=expires_at,
                      user_metadata=None if user_metadata is None else dict(user_metadata),
                      base_model=base_model, lora=dict(lora))
        try:
            return self._replace_checkpoint(values)
        except IntegrityError:
            # A concurrent upsert of the same key won the race (only possible off SQLite,
            # where writers are serialized by BEGIN IMMEDIATE): replace its row in turn.
            return self._replace_checkpoint(values)

    def _replace_checkpoint(self, values: dict[str, Any]) -> CheckpointRow:
        obj = _Checkpoint(created_at=_now(), **values)
        same = or_(and_(_Checkpoint.training_run_id == obj.training_run_id,
                        _Checkpoint.checkpoint_id == obj.checkpoint_id),
                   _Checkpoint.tinker_path == obj.tinker_path)
        with self._tx(write=True) as s:
            for old in s.scalars(select(_Checkpoint).where(same)):
                s.delete(old)
            s.flush()  # the DELETEs must reach the database before the INSERT
            s.add(obj)
        return _row(CheckpointRow, obj)

    def get_checkpoint(self, training_run_id: str, checkpoint_id: str) -> CheckpointRow | None:
        q = select(_Checkpoint).where(_Checkpoint.training_run_id == training_run_id,
                                      _Checkpoint.checkpoint_id == checkpoint_id)
        with self._tx() as s:
            obj = s.scalars(q).first()
            return None if obj is None else _row(CheckpointRow, obj)

    def get_checkpoint_by_path(self, tinker_path: str) -> CheckpointRow | None:
        with self._tx() as s:
            obj = s.scalars(select(_Checkpoint).where(_Checkpoint.tinker_path == tinker_path)
                            ).first()
            return None if obj is None else _row(CheckpointRow, obj)

    def list_checkpoints(self, training_run_id: str) -> list[CheckpointRow]:
        q = (select(_Checkpoint).where(_Checkpoint.training_run_id == training_run_id)
             .order_by(_Checkpoint.created_at, _Checkpoint.id))
        with self._tx() as s:
            return [_row(CheckpointRow, o) for o in s.scalars(q)]

    def list_all_checkpoints(self, limit: int = 100,
                             offset: int = 0) -> tuple[list[CheckpointRow], int]:
        q = (select(_Checkpoint).order_by(_Checkpoint.created_at.desc(), _Checkpoint.id.desc())
             .limit(limit).offset(offset))
        with self._tx() as s:
            total = s.scalar(select(func.count()).select_from(_Checkpoint)) or 0
            return [_row(CheckpointRow, o) for o in s.scalars(q)], total

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> bool:
        q = select(_Checkpoint).where(_Checkpoint.training_run_id == training_run_id,
                                      _Checkpoint.checkpoint_id == checkpoint_id)
        with self._tx(write=True) as s:
            obj = s.scalars(q).first()
            if obj is None:
                return False
            s.delete(obj)
            return True

    def expired_checkpoints(self, now: datetime | None = None) -> list[CheckpointRow]:
        """Checkpoints whose expires_at is at or before ``now`` (default: the current time)."""
        q = (select(_Checkpoint)
             .where(_Checkpoint.expires_at.is_not(None),
                    _Checkpoint.expires_at <= (now or datetime.now(UTC)))
             .order_by(_Checkpoint.expires_at, _Checkpoint.id))
        with self._tx() as s:
            return [_row(CheckpointRow, o) for o in s.scalars(q)]

    def last_checkpoint(self, training_run_id: str,
                        checkpoint_type: str) -> CheckpointRow | None:
        q = (select(_Checkpoint)
             .where(_Checkpoint.training_run_id == training_run_id,
                    _Checkpoint.checkpoint_type == checkpoint_type)
             .order_by(_Checkpoint.created_at.desc(), _Checkpoint.id.desc()).limit(1))
        with self._tx() as s:
            obj = s.scalars(q).first()
            return None if obj is None else _row(CheckpointRow, obj)

    # --- samplers -------------------------------------------------------------------

    def add_sampler(self, sampler_id: str, *, session_id: str, base_model: str,
                    model_path: str | None = None) -> SamplerRow:
        obj = _Sampler(sampler_id=sampler_id, session_id=session_id, base_model=base_model,
                       model_path=model_path, created_at=_now())
        with self._tx(write=True) as s:
            s.add(obj)
        return _row(SamplerRow, obj)

    def get_sampler(self, sampler_id: str) -> SamplerRow | None:
        with self._tx() as s:
            obj = s.get(_Sampler, sampler_id)
            return None if obj is None else _row(SamplerRow, obj)

    def samplers_of_session(self, session_id: str) -> list[str]:
        q = (select(_Sampler.sampler_id).where(_Sampler.session_id == session_id)
             .order_by(_Sampler.created_at))
        with self._tx() as s:
            return list(s.scalars(q))
