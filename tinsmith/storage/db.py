"""Metadata store of the server: sessions, training runs, checkpoints and samplers.

SQLAlchemy 2 ORM over a database URL: a SQLite file by default
(``sqlite:////abs/path/tinsmith.db``, WAL mode), PostgreSQL by URL. Only portable SQL is
used (JSON columns through ``sqlalchemy.JSON``). All datetimes are timezone-aware UTC.
A ``postgresql://`` URL without a driver uses psycopg 3 (``postgresql+psycopg://``).

The schema is versioned by Alembic (tinsmith/storage/migrations). Opening a store brings
the database to the newest revision first (`upgrade_schema`): a new database is built by
running the migrations, an older one is upgraded in place, one made before migrations
existed is recognised by its tables and stamped first, and one made by a newer Tinsmith is
refused (`SchemaError`). The models below must always equal the schema at the head
revision; tests/test_migrations.py checks it.

The store is shared by several threads (the asyncio API thread, the engine worker), so
each method opens its own short session and returns frozen dataclasses that are detached
from any session. Everything written survives a restart: a new ``MetadataStore`` on the
same URL sees the same rows.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

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


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this Tinsmith: it was made by a newer one."""


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
    owner: Mapped[str | None] = mapped_column(String(64), index=True)


class _Run(Base):
    __tablename__ = "training_runs"
    training_run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(255), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_request_time: Mapped[datetime] = mapped_column(UTCDateTime)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)


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
    owner: Mapped[str | None] = mapped_column(String(64), index=True)


class _Sampler(Base):
    __tablename__ = "samplers"
    sampler_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(255), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    model_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)


class KeysBase(DeclarativeBase):
    """Credentials live in a metadata of their own, apart from the work records (Base)."""


class _ApiKey(KeysBase):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Per-key limits (tinsmith.scheduler.limits); NULL: the server's default.
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    max_request_tokens: Mapped[int | None] = mapped_column(BigInteger)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)


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
    owner: str | None = None  # the API key id that made it; None: made while the server was open


@dataclass(frozen=True)
class RunRow:
    training_run_id: str
    session_id: str
    base_model: str
    lora: dict[str, Any]
    user_metadata: dict[str, Any] | None
    created_at: datetime
    last_request_time: datetime
    owner: str | None = None


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
    owner: str | None = None


@dataclass(frozen=True)
class SamplerRow:
    sampler_id: str
    session_id: str
    base_model: str
    model_path: str | None
    created_at: datetime
    owner: str | None = None


@dataclass(frozen=True)
class ApiKeyRow:
    key_id: str
    hint: str  # the key's first characters, to recognise it in listings
    name: str | None
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = None
    max_concurrent: int | None = None
    max_request_tokens: int | None = None
    max_stored_bytes: int | None = None


_R = TypeVar("_R")


def _row(cls: type[_R], obj: Any) -> _R:
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def target_metadata() -> list[MetaData]:
    """Every table the migrations manage: the work records and, apart, the credentials."""
    return [Base.metadata, KeysBase.metadata]


def create_db_engine(url: str) -> Engine:
    """The engine for a metadata database URL, set up as the store needs it (SQLite: the
    file's folder made, WAL, writers queueing on BEGIN IMMEDIATE)."""
    u = make_url(url)
    if u.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; we ship 3
        u = u.set(drivername="postgresql+psycopg")
    kw: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if u.database in (None, "", ":memory:"):
            kw["poolclass"] = StaticPool  # one shared connection, else each one is a new DB
        else:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, **kw)
    if u.get_backend_name() == "sqlite":
        _setup_sqlite(engine)
    return engine


def _setup_sqlite(engine: Engine) -> None:
    # pysqlite's own BEGIN is deferred: a read-then-write transaction can then fail
    # with "database is locked" at once instead of waiting. Writers emit BEGIN
    # IMMEDIATE themselves (SQLAlchemy's documented recipe), so they queue on the lock.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the call returns (WAL's NORMAL may lose the last
        # commits to a power cut); an acknowledged checkpoint's row must survive like its files.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        write = conn.get_execution_options().get("tinsmith_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# --- schema migrations --------------------------------------------------------------

_MIGRATIONS = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock held (for the transaction) while the schema is checked and
# upgraded, so two servers starting on one database upgrade it once, one after the other.
_SCHEMA_LOCK = int.from_bytes(b"tinsmith")
# Alembic's commands install their context in module globals (`alembic.context`, `op`), so
# two threads of one process must not run them at once, even on different databases.
_alembic_lock = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, made in code (no alembic.ini): the packaged migrations, and
    the connection env.py migrates."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def migration_options(conn: Connection) -> dict[str, Any]:
    """Options of every Alembic MigrationContext here (env.py's too). Migrations always run
    inside the caller's transaction; SQLite's DDL is transactional like PostgreSQL's (Alembic
    assumes otherwise for SQLite only because of pysqlite's implicit commits, which
    `_setup_sqlite` turns off), so say so rather than log "non-transactional DDL"."""
    opts: dict[str, Any] = {"render_as_batch": conn.dialect.name == "sqlite"}
    if conn.dialect.name in ("sqlite", "postgresql"):
        opts["transactional_ddl"] = True
    return opts


# Revision 0001's tables: all of them in a database made before migrations existed.
_FIRST_TABLES = frozenset({"sessions", "training_runs", "checkpoints", "samplers"})


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands. `current` None: it has no Tinsmith tables yet."""

    current: str | None
    head: str  # the newest revision this Tinsmith knows
    recorded: bool  # False: made before migrations, revision recognised from its tables
    known: bool  # False: a revision this Tinsmith does not have (a newer Tinsmith made it)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head and self.recorded


def _schema_state(conn: Connection) -> SchemaState:
    scripts = _scripts()
    head = scripts.get_current_head()
    assert head is not None
    current = MigrationContext.configure(conn, opts=migration_options(conn)).get_current_revision()
    recorded = current is not None
    if current is None:
        # No alembic_version table (or an empty one). Databases made before migrations
        # existed had their tables made by create_all: revision 0001's schema, or 0002's
        # (owner columns, api_keys) when made by a build between API keys and migrations.
        insp = inspect(conn)
        present = _FIRST_TABLES & set(insp.get_table_names())
        if present == _FIRST_TABLES:
            owned = any(c["name"] == "owner" for c in insp.get_columns("sessions"))
            current = "0002" if owned else "0001"
        elif present:  # e.g. another application's "sessions" table in a shared database
            raise SchemaError(
                f"the database {conn.engine.url!r} has table(s) {', '.join(sorted(present))} "
                f"but not {', '.join(sorted(_FIRST_TABLES - present))}, and no alembic_version: "
                "it is not a Tinsmith metadata database (or a damaged one); use another")
    known = current is None or any(s.revision == current for s in scripts.walk_revisions())
    return SchemaState(current, head, recorded, known)


def _too_new(engine: Engine, state: SchemaState) -> SchemaError:
    return SchemaError(
        f"the metadata database {engine.url!r} is at schema revision {state.current!r}, which "
        f"this Tinsmith does not know (its newest is {state.head!r}): it was made or upgraded "
        "by a newer Tinsmith. Run that version (or a newer one), or use another database")


def schema_state(engine: Engine) -> SchemaState:
    """Read where the database stands, changing nothing."""
    with engine.connect() as conn, conn.begin():
        return _schema_state(conn)


def upgrade_schema(engine: Engine) -> SchemaState:
    """Bring the database to the head revision, in place, in one transaction; return the
    state it was in before. Raises SchemaError for a database newer than this code."""
    with engine.connect() as conn:
        # SQLite: BEGIN IMMEDIATE takes the write lock first, so a second process opening
        # the same file waits here and then finds it already upgraded.
        conn.execution_options(tinsmith_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            state = _schema_state(conn)
            if not state.known:
                raise _too_new(engine, state)
            if state.up_to_date:
                return state
            # env.py sees this connection already in a transaction and opens none itself:
            # the stamp and every revision commit together, or not at all.
            cfg = alembic_config(conn)
            with _alembic_lock:
                if not state.recorded and state.current is not None:
                    command.stamp(cfg, state.current)
                command.upgrade(cfg, "head")
    if state.current is None:
        log.info("metadata database %r: created at schema revision %s", engine.url, state.head)
    elif state.current == state.head:
        log.info("metadata database %r: made before migrations, recorded as schema revision %s",
                 engine.url, state.head)
    else:
        log.info("metadata database %r: upgraded from schema revision %s%s to %s", engine.url,
                 state.current, "" if state.recorded else " (made before migrations)",
                 state.head)
    return state


class MetadataStore:
    """Thread-safe metadata store; one short session (and transaction) per call."""

    def __init__(self, url: str) -> None:
        self._engine = create_db_engine(url)
        try:
            upgrade_schema(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

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
                    sdk_version: str | None = None, owner: str | None = None) -> SessionRow:
        now = _now()
        obj = _Session(session_id=session_id, created_at=now, last_heartbeat_at=now,
                       tags=list(tags), user_metadata=dict(user_metadata),
                       display_name=display_name, project_id=project_id,
                       sdk_version=sdk_version, finished_at=None, finish_reason=None, owner=owner)
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

    def list_sessions(self, limit: int = 20, offset: int = 0,
                      owner: str | None = None) -> list[SessionRow]:
        """Newest first; with `owner`, only that owner's sessions (likewise list_runs and
        list_all_checkpoints)."""
        q = select(_Session).order_by(_Session.created_at.desc()).limit(limit).offset(offset)
        if owner is not None:
            q = q.where(_Session.owner == owner)
        with self._tx() as s:
            return [_row(SessionRow, o) for o in s.scalars(q)]

    # --- training runs --------------------------------------------------------------

    def add_run(self, training_run_id: str, *, session_id: str, base_model: str,
                lora: dict[str, Any], user_metadata: dict[str, Any] | None = None,
                owner: str | None = None) -> RunRow:
        now = _now()
        obj = _Run(training_run_id=training_run_id, session_id=session_id,
                   base_model=base_model, lora=dict(lora),
                   user_metadata=None if user_metadata is None else dict(user_metadata),
                   created_at=now, last_request_time=now, owner=owner)
        with self._tx(write=True) as s:
            s.add(obj)
        return _row(RunRow, obj)

    def touch_run(self, training_run_id: str) -> None:
        self._update(_Run, training_run_id, last_request_time=_now())

    def get_run(self, training_run_id: str) -> RunRow | None:
        with self._tx() as s:
            obj = s.get(_Run, training_run_id)
            return None if obj is None else _row(RunRow, obj)

    def list_runs(self, limit: int = 20, offset: int = 0,
                  owner: str | None = None) -> tuple[list[RunRow], int]:
        q = select(_Run).order_by(_Run.created_at.desc()).limit(limit).offset(offset)
        count = select(func.count()).select_from(_Run)
        if owner is not None:
            q, count = q.where(_Run.owner == owner), count.where(_Run.owner == owner)
        with self._tx() as s:
            total = s.scalar(count) or 0
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
                          expires_at: datetime | None = None,
                          owner: str | None = None) -> CheckpointRow:
        """Insert, or replace the whole row (fresh created_at) if the key already exists."""
        if checkpoint_type not in ("training", "sampler", "external"):
            raise ValueError(f"checkpoint_type must be 'training', 'sampler' or 'external', "
                             f"not {checkpoint_type!r}")
        values = dict(training_run_id=training_run_id, checkpoint_id=checkpoint_id,
                      checkpoint_type=checkpoint_type, tinker_path=tinker_path,
                      storage_key=storage_key, size_bytes=size_bytes, expires_at=expires_at,
                      user_metadata=None if user_metadata is None else dict(user_metadata),
                      base_model=base_model, lora=dict(lora), owner=owner)
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

    def list_all_checkpoints(self, limit: int = 100, offset: int = 0,
                             owner: str | None = None) -> tuple[list[CheckpointRow], int]:
        q = (select(_Checkpoint).order_by(_Checkpoint.created_at.desc(), _Checkpoint.id.desc())
             .limit(limit).offset(offset))
        count = select(func.count()).select_from(_Checkpoint)
        if owner is not None:
            q = q.where(_Checkpoint.owner == owner)
            count = count.where(_Checkpoint.owner == owner)
        with self._tx() as s:
            total = s.scalar(count) or 0
            return [_row(CheckpointRow, o) for o in s.scalars(q)], total

    def _update_checkpoint(self, training_run_id: str, checkpoint_id: str,
                           change: Callable[[Session, _Checkpoint], None]) -> bool:
        """Apply `change` to the checkpoint's row in one write transaction; False if absent."""
        q = select(_Checkpoint).where(_Checkpoint.training_run_id == training_run_id,
                                      _Checkpoint.checkpoint_id == checkpoint_id)
        with self._tx(write=True) as s:
            obj = s.scalars(q).first()
            if obj is None:
                return False
            change(s, obj)
            return True

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> bool:
        return self._update_checkpoint(training_run_id, checkpoint_id, lambda s, o: s.delete(o))

    def set_checkpoint_expiry(self, training_run_id: str, checkpoint_id: str,
                              expires_at: datetime | None) -> bool:
        return self._update_checkpoint(training_run_id, checkpoint_id,
                                       lambda _, o: setattr(o, "expires_at", expires_at))

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
                    model_path: str | None = None, owner: str | None = None) -> SamplerRow:
        obj = _Sampler(sampler_id=sampler_id, session_id=session_id, base_model=base_model,
                       model_path=model_path, created_at=_now(), owner=owner)
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

    # --- API keys -------------------------------------------------------------------

    def add_api_key(self, key_id: str, *, key_hash: str, hint: str, name: str | None = None,
                    is_admin: bool = False, expires_at: datetime | None = None,
                    **limits: int | None) -> ApiKeyRow:
        """`limits`: max_concurrent, max_request_tokens, max_stored_bytes (None: default)."""
        obj = _ApiKey(key_id=key_id, key_hash=key_hash, hint=hint, name=name,
                      is_admin=is_admin, created_at=_now(), revoked_at=None,
                      expires_at=expires_at, **limits)
        with self._tx(write=True) as s:
            s.add(obj)
        return _row(ApiKeyRow, obj)

    def api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        with self._tx() as s:
            obj = s.scalars(select(_ApiKey).where(_ApiKey.key_hash == key_hash)).first()
            return None if obj is None else _row(ApiKeyRow, obj)

    def get_api_key(self, key_id: str) -> ApiKeyRow | None:
        with self._tx() as s:
            obj = s.get(_ApiKey, key_id)
            return None if obj is None else _row(ApiKeyRow, obj)

    def set_api_key_limits(self, key_id: str, **limits: int | None) -> bool:
        """Set some of a key's limits (None: back to the server's default); False if no such key."""
        return self._update(_ApiKey, key_id, **limits)

    def stored_bytes(self, owner: str | None, excluding: tuple[str, str] | None = None) -> int:
        """Bytes of the checkpoints `owner` owns (None: those made while the server was open),
        less the checkpoint `excluding` = (training_run_id, checkpoint_id) if given."""
        q = select(func.coalesce(func.sum(_Checkpoint.size_bytes), 0)).where(
            _Checkpoint.owner.is_(None) if owner is None else _Checkpoint.owner == owner)
        if excluding is not None:
            q = q.where(or_(_Checkpoint.training_run_id != excluding[0],
                            _Checkpoint.checkpoint_id != excluding[1]))
        with self._tx() as s:
            return int(s.scalar(q) or 0)

    def list_api_keys(self) -> list[ApiKeyRow]:
        with self._tx() as s:
            return [_row(ApiKeyRow, o)
                    for o in s.scalars(select(_ApiKey).order_by(_ApiKey.created_at))]

    def has_api_keys(self) -> bool:
        """Whether any key was ever created (revoked ones count)."""
        with self._tx() as s:
            return s.scalars(select(_ApiKey.key_id).limit(1)).first() is not None

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark a key revoked (kept, so it is never reissued); False if there is no such key."""
        with self._tx(write=True) as s:
            obj = s.get(_ApiKey, key_id)
            if obj is None:
                return False
            if obj.revoked_at is None:
                obj.revoked_at = _now()
            return True
