"""The metadata tables: one SQLAlchemy declarative model per table, and the row classes
derived from them.

A model is the only place a table's columns are written. Its row class (`SessionRow` for
`SessionModel`, ...) is a frozen dataclass with the same fields, made from the model by
`row_class`, less columns that stay inside the store (a checkpoint's surrogate `id`, a key's
hash). Queries return rows, never models: rows are detached from any session, so they can
cross threads.

The models must always equal the schema at the newest Alembic revision (tinsmith/storage/
migrations); tests/test_migrations.py checks it. Changing one means adding a revision.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from datetime import UTC, datetime
from typing import Any, TypeVar

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
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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


def row_class(model: type, *, exclude: tuple[str, ...] = ()) -> type:
    """A frozen dataclass named after `model` (FooModel -> FooRow) with a field per column,
    in declaration order, typed as the column's `Mapped[...]` annotation says."""
    hints = inspect.get_annotations(model, eval_str=True)
    name = model.__name__.removesuffix("Model") + "Row"
    cls = dataclasses.make_dataclass(
        name, [(col, typing.get_args(hint)[0]) for col, hint in hints.items()
               if col not in exclude], frozen=True)
    cls.__module__ = model.__module__
    cls.__doc__ = f"A {model.__tablename__} row (tinsmith.storage.models.{model.__name__})."
    return cls


_R = TypeVar("_R")


def to_row(cls: type[_R], obj: Any) -> _R:
    """The row of class `cls` holding `obj`'s values (a model instance)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{name: getattr(obj, name) for name in names})


# --- work records ---------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class SessionModel(Base):
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
    # The API key id that made it (likewise in every table); None: made while the server
    # was open (tinsmith.scheduler.access).
    owner: Mapped[str | None] = mapped_column(String(64), index=True)


class RunModel(Base):
    __tablename__ = "training_runs"
    training_run_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(255), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_request_time: Mapped[datetime] = mapped_column(UTCDateTime)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    # NULL: the session's project (if any). A copy (copy_weights) has its destination's.
    project_id: Mapped[str | None] = mapped_column(String(255), index=True, default=None)
    # The tinker path a copy was made from; NULL for a trained run. A copy cannot be trained.
    copied_from: Mapped[str | None] = mapped_column(String(1024), default=None)
    # The optimizer config fixed at creation (`{"type": "dimuon", "version": 1}`); NULL: AdamW.
    optimizer: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class CheckpointModel(Base):
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
    # Published: any API key may read and load it (publish_checkpoint_from_tinker_path).
    public: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class SamplerModel(Base):
    __tablename__ = "samplers"
    sampler_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(255), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    model_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)


# --- credentials ----------------------------------------------------------------------


class KeysBase(DeclarativeBase):
    """Credentials live in a metadata of their own, apart from the work records (Base)."""


class ApiKeyModel(KeysBase):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(16))  # the key's first characters, for listings
    name: Mapped[str | None] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Per-key limits (tinsmith.scheduler.limits); NULL: the server's default.
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    max_request_tokens: Mapped[int | None] = mapped_column(BigInteger)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)


# --- accounting (tinsmith.scheduler.accounting) -----------------------------------------


class AuditEventModel(Base):
    """One audit log entry: who did what (`event` is `<resource>_<action>`)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(64))
    # The API key whose log holds the entry (it sees it; admins see all); None: no key's.
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    # What the entry records: the actor, what it was about (model_id, tinker_path, ...).
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


class UsageModel(Base):
    """Usage of one hour, API key, base model, session and kind (tokens trained, sampled...),
    summed in memory and added here every few seconds."""

    __tablename__ = "usage_hourly"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    session_id: Mapped[str | None] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    quantity: Mapped[int] = mapped_column(BigInteger)


def target_metadata() -> list[MetaData]:
    """Every table the migrations manage: the work records and, apart, the credentials."""
    return [Base.metadata, KeysBase.metadata]


if typing.TYPE_CHECKING:  # a type checker sees each row as its model: the same attributes
    SessionRow = SessionModel
    RunRow = RunModel
    CheckpointRow = CheckpointModel
    SamplerRow = SamplerModel
    ApiKeyRow = ApiKeyModel
    AuditEventRow = AuditEventModel
    UsageRow = UsageModel
else:
    SessionRow = row_class(SessionModel)
    RunRow = row_class(RunModel)
    CheckpointRow = row_class(CheckpointModel, exclude=("id",))
    SamplerRow = row_class(SamplerModel)
    ApiKeyRow = row_class(ApiKeyModel, exclude=("key_hash",))  # the hash never leaves the store
    AuditEventRow = row_class(AuditEventModel)
    UsageRow = row_class(UsageModel, exclude=("id",))
