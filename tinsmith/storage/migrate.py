"""The migration runner: where a metadata database's schema stands, and bringing it to the
newest Alembic revision (tinsmith/storage/migrations).

A new database is built by running the migrations, an older one is upgraded in place, one
made before migrations existed is recognised by its tables and stamped first, and one made by
a newer Tinsmith is refused (`SchemaError`). `MetadataStore(url)` upgrades on opening;
`MetadataStore.open_existing(url)` only checks (`require_head`).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this Tinsmith: it was made by a newer one (or,
    opened without upgrading, it is not at the newest revision)."""


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
    tinsmith.storage.connect turns off), so say so rather than log "non-transactional DDL"."""
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


def require_head(engine: Engine) -> SchemaState:
    """Check, changing nothing, that the database is at the newest revision (recorded or
    recognised from its tables), so this Tinsmith's queries can read it. Raises SchemaError
    for an empty, older or newer one."""
    state = schema_state(engine)
    if not state.known:
        raise _too_new(engine, state)
    if state.current is None:
        raise SchemaError(f"the database {engine.url!r} has no Tinsmith tables: nothing was "
                          "stored in it yet")
    if state.current != state.head:
        raise SchemaError(
            f"the metadata database {engine.url!r} is at schema revision {state.current!r}, "
            f"older than this Tinsmith's {state.head!r}: upgrade it first (`tinsmith db "
            "upgrade`, or start the server on it)")
    return state
