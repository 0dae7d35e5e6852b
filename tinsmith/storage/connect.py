"""The SQLAlchemy engine of a metadata database URL.

A SQLite file by default (``sqlite:////abs/path/tinsmith.db``, WAL mode), PostgreSQL by URL;
a ``postgresql://`` URL without a driver uses psycopg 3 (``postgresql+psycopg://``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool


def create_db_engine(url: str, *, read_only: bool = False) -> Engine:
    """The engine for a metadata database URL, set up as the store needs it (SQLite: the
    file's folder made, WAL, writers queueing on BEGIN IMMEDIATE).

    `read_only`: open a database that must already exist, and never write to it (SQLite:
    the file opened read-only, FileNotFoundError if there is none; PostgreSQL: read-only
    transactions)."""
    u = make_url(url)
    if u.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; we ship 3
        u = u.set(drivername="postgresql+psycopg")
    kw: dict[str, Any] = {}
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite:
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if u.database in (None, "", ":memory:"):
            if read_only:
                raise FileNotFoundError(f"{url!r} is an in-memory database: there is none to open")
            kw["poolclass"] = StaticPool  # one shared connection, else each one is a new DB
        elif read_only:
            if not u.query.get("uri"):  # a path (not a file: URI): check it, open it as one
                path = Path(u.database).absolute()
                if not path.is_file():
                    raise FileNotFoundError(f"no metadata database at {path}")
                u = u.set(database=path.as_uri()).update_query_dict({"uri": "true"})
            u = u.update_query_dict({"mode": "ro"})
        else:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    elif read_only and u.get_backend_name() == "postgresql":
        kw["execution_options"] = {"postgresql_readonly": True}
    engine = create_engine(u, **kw)
    if sqlite:
        _setup_sqlite(engine, read_only)
    return engine


def _setup_sqlite(engine: Engine, read_only: bool) -> None:
    # pysqlite's own BEGIN is deferred: a read-then-write transaction can then fail
    # with "database is locked" at once instead of waiting. Writers emit BEGIN
    # IMMEDIATE themselves (SQLAlchemy's documented recipe), so they queue on the lock.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        if read_only:  # the store always made the file in WAL mode; a reader cannot set it
            return
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
