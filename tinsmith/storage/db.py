"""Metadata store of the server: sessions, training runs, checkpoints, samplers and API keys.

SQLAlchemy 2 ORM over a database URL: a SQLite file by default, PostgreSQL by URL. Only
portable SQL is used (JSON columns through ``sqlalchemy.JSON``). All datetimes are
timezone-aware UTC. Everything written survives a restart: a new ``MetadataStore`` on the
same URL sees the same rows.

This module is the storage layer's front door; what it re-exports lives in

    models.py     one declarative model per table, and the frozen row classes made from them
    connect.py    the engine of a URL (SQLite WAL and its locking, psycopg 3 for PostgreSQL)
    migrate.py    the migration runner: where the schema stands, upgrading it (Alembic)
    queries/      MetadataStore's queries, one mixin per resource (sessions and their
                  samplers, runs, checkpoints, keys, the audit log, usage)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from tinsmith.storage.connect import create_db_engine
from tinsmith.storage.migrate import (
    SchemaError,
    SchemaState,
    alembic_config,
    migration_options,
    require_head,
    schema_state,
    upgrade_schema,
)
from tinsmith.storage.models import (
    ApiKeyRow,
    Base,
    CheckpointRow,
    KeysBase,
    RunRow,
    SamplerRow,
    SessionRow,
    target_metadata,
)
from tinsmith.storage.queries.audit import AuditQueries
from tinsmith.storage.queries.checkpoints import CheckpointQueries
from tinsmith.storage.queries.keys import ApiKeyQueries
from tinsmith.storage.queries.runs import RunQueries
from tinsmith.storage.queries.sessions import SessionQueries
from tinsmith.storage.queries.usage import UsageQueries

__all__ = [
    "ApiKeyRow", "Base", "CheckpointRow", "KeysBase", "MetadataStore", "RunRow", "SamplerRow",
    "SchemaError", "SchemaState", "SessionRow", "alembic_config", "create_db_engine",
    "migration_options", "require_head", "schema_state", "target_metadata", "upgrade_schema",
]


class MetadataStore(SessionQueries, RunQueries, CheckpointQueries, ApiKeyQueries, AuditQueries,
                    UsageQueries):
    """Thread-safe metadata store; one short session (and transaction) per call, returning
    frozen rows detached from it."""

    def __init__(self, url: str) -> None:
        """Open the database at `url`, making it if there is none, and bring its schema to
        the newest revision first (`upgrade_schema`; SchemaError if a newer Tinsmith made it)."""
        self._open(create_db_engine(url), upgrade_schema)

    @classmethod
    def open_existing(cls, url: str) -> MetadataStore:
        """Open a database that exists, to read it: nothing is made, migrated or written.
        Raises FileNotFoundError if there is no SQLite file at `url`, SchemaError unless its
        schema is at this Tinsmith's newest revision (`require_head`)."""
        store = cls.__new__(cls)
        store._open(create_db_engine(url, read_only=True), require_head)
        return store

    def _open(self, engine: Engine, check: Callable[[Engine], Any]) -> None:
        try:
            check(engine)
        except BaseException:
            engine.dispose()
            raise
        self._attach(engine)
