"""Schema migrations of the metadata database (tinsmith/storage/migrations), on SQLite and on
a real PostgreSQL server (the `postgres_url` fixture in conftest.py; those cases skip where no
PostgreSQL is installed, unless TINSMITH_REQUIRE_POSTGRES=1).

A database made before migrations existed is built here from a snapshot of that schema
(commit 7861ef9's models, as create_all made them), not through the migrations, so the tests
also check that revision 0001 is that schema exactly.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tinker
import uvicorn
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import API_KEY, SENTENCES, TINY, text_datum
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    inspect,
    text,
)
from tinker import types

import tinsmith
from tinsmith.cli import main as cli_main
from tinsmith.config import ServerSettings
from tinsmith.embedded import serve
from tinsmith.storage import db as storage_db
from tinsmith.storage.db import (
    MetadataStore,
    SchemaError,
    alembic_config,
    create_db_engine,
    schema_state,
    target_metadata,
)

HEAD = "0005"
LORA = {"rank": 2, "seed": 0, "train_mlp": True, "train_attn": True, "train_unembed": False}

# --- the schema before migrations (7861ef9's models), as create_all made it ---------------

OLD = MetaData()
_UTC = DateTime(timezone=True)
Table("sessions", OLD,
      Column("session_id", String(255), primary_key=True),
      Column("created_at", _UTC, nullable=False, index=True),
      Column("last_heartbeat_at", _UTC, nullable=False),
      Column("tags", JSON, nullable=False),
      Column("user_metadata", JSON, nullable=False),
      Column("display_name", String(1024)),
      Column("project_id", String(255)),
      Column("sdk_version", String(64)),
      Column("finished_at", _UTC),
      Column("finish_reason", String(1024)))
Table("training_runs", OLD,
      Column("training_run_id", String(255), primary_key=True),
      Column("session_id", String(255), nullable=False, index=True),
      Column("base_model", String(255), nullable=False),
      Column("lora", JSON, nullable=False),
      Column("user_metadata", JSON),
      Column("created_at", _UTC, nullable=False, index=True),
      Column("last_request_time", _UTC, nullable=False))
Table("checkpoints", OLD,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("training_run_id", String(255), nullable=False, index=True),
      Column("checkpoint_id", String(255), nullable=False),
      Column("checkpoint_type", String(16), nullable=False),
      Column("tinker_path", String(1024), nullable=False, unique=True),
      Column("storage_key", String(1024), nullable=False),
      Column("size_bytes", BigInteger, nullable=False),
      Column("created_at", _UTC, nullable=False, index=True),
      Column("expires_at", _UTC, index=True),
      Column("user_metadata", JSON),
      Column("base_model", String(255), nullable=False),
      Column("lora", JSON, nullable=False),
      UniqueConstraint("training_run_id", "checkpoint_id"))
Table("samplers", OLD,
      Column("sampler_id", String(255), primary_key=True),
      Column("session_id", String(255), nullable=False, index=True),
      Column("base_model", String(255), nullable=False),
      Column("model_path", String(1024)),
      Column("created_at", _UTC, nullable=False))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'tinsmith.db'}"


def _make_pre_migration_db(url: str, run_id: str = "run-old") -> None:
    """A database as Tinsmith made it before migrations, with a session, a run and a
    checkpoint in it."""
    engine = create_db_engine(url)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    if engine.dialect.name == "sqlite":
        when = when.replace(tzinfo=None)  # the old UTCDateTime stored naive UTC on SQLite
    with engine.begin() as conn:
        OLD.create_all(conn)
        t = OLD.tables
        conn.execute(t["sessions"].insert().values(
            session_id="sess-old", created_at=when, last_heartbeat_at=when, tags=["old"],
            user_metadata={}))
        conn.execute(t["training_runs"].insert().values(
            training_run_id=run_id, session_id="sess-old", base_model=TINY, lora=LORA,
            user_metadata={"k": "v"}, created_at=when, last_request_time=when))
        conn.execute(t["checkpoints"].insert().values(
            training_run_id=run_id, checkpoint_id="weights/a", checkpoint_type="training",
            tinker_path=f"tinker://{run_id}/weights/a", storage_key=f"runs/{run_id}/weights/a",
            size_bytes=1, created_at=when, base_model=TINY, lora=LORA))
    engine.dispose()


def _diff(url: str, metadata: MetaData | list[MetaData]) -> list[object]:
    """What autogenerate would change to make the database equal `metadata` ([]: equal)."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def _state(url: str):
    engine = create_db_engine(url)
    try:
        return schema_state(engine)
    finally:
        engine.dispose()


def test_new_database_is_created_at_head_equal_to_the_models(db_url: str) -> None:
    MetadataStore(db_url).close()
    state = _state(db_url)
    assert (state.current, state.recorded) == (HEAD, True)
    assert _diff(db_url, target_metadata()) == []


def test_revision_1_is_the_schema_before_migrations(db_url: str) -> None:
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    engine.dispose()
    assert _diff(db_url, OLD) == []


def test_pre_migration_database_is_stamped_and_upgraded(db_url: str) -> None:
    _make_pre_migration_db(db_url)
    before = _state(db_url)
    assert (before.current, before.recorded) == ("0001", False)

    db = MetadataStore(db_url)
    try:
        run = db.get_run("run-old")
        assert run is not None and run.owner is None and run.user_metadata == {"k": "v"}
        assert run.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        sess = db.get_session("sess-old")
        assert sess is not None and sess.owner is None and sess.tags == ["old"]
        [ck] = db.list_checkpoints("run-old")
        assert ck.owner is None and ck.tinker_path == "tinker://run-old/weights/a"
        # New writes, with the new columns and table.
        db.add_run("run-new", session_id="sess-old", base_model=TINY, lora=LORA, owner="k1")
        db.add_api_key("k1", key_hash="0" * 64, hint="tml-0000")
        assert db.list_runs(owner="k1")[0][0].training_run_id == "run-new"
        assert [r.training_run_id for r in db.list_runs()[0]] == ["run-new", "run-old"]
    finally:
        db.close()
    after = _state(db_url)
    assert (after.current, after.recorded) == (HEAD, True)
    assert _diff(db_url, target_metadata()) == []


def test_pre_migration_database_with_owner_columns_is_stamped_at_head(tmp_path: Path) -> None:
    """Made by the build that had API keys but no migrations yet (revision 0002's schema,
    as create_all made it: no alembic_version)."""
    url = f"sqlite:///{tmp_path / 'tinsmith.db'}"
    engine = create_db_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    assert _state(url).current == "0002" and not _state(url).recorded
    MetadataStore(url).close()
    assert _state(url).current == HEAD and _state(url).recorded


def test_foreign_tables_are_refused(db_url: str) -> None:
    """A shared database with another application's `sessions` table is not taken for ours."""
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE sessions (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaError, match="not a Tinsmith metadata database"):
        MetadataStore(db_url)


def test_database_at_an_older_revision_is_upgraded(db_url: str) -> None:
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    engine.dispose()
    assert _state(db_url).current == "0001"
    MetadataStore(db_url).close()
    assert _state(db_url).current == HEAD
    assert _diff(db_url, target_metadata()) == []


def test_database_from_a_newer_tinsmith_is_refused(db_url: str) -> None:
    MetadataStore(db_url).close()
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"revision '9999'.*newer Tinsmith"):
        MetadataStore(db_url)
    assert _state(db_url).current == "9999"  # left as it was


def test_failed_upgrade_changes_nothing(db_url: str) -> None:
    """The stamp and every revision run in one transaction: one failing step undoes all."""
    _make_pre_migration_db(db_url)
    engine = create_db_engine(db_url)
    with engine.begin() as conn:  # a column revision 0002 adds, already there: it will fail
        conn.execute(text("ALTER TABLE samplers ADD COLUMN owner VARCHAR(64)"))
    engine.dispose()
    with pytest.raises(Exception, match="(?i)duplicate|already exists"):
        MetadataStore(db_url)
    insp_engine = create_db_engine(db_url)
    insp = inspect(insp_engine)
    tables = set(insp.get_table_names())
    assert "api_keys" not in tables and "alembic_version" not in tables
    assert "owner" not in {c["name"] for c in insp.get_columns("checkpoints")}
    insp_engine.dispose()


def test_open_existing_reads_without_migrating_or_writing(db_url: str) -> None:
    """`MetadataStore.open_existing` (the CLI's listings): an older or newer schema is refused
    and left as it was; one at head is read, and cannot be written through it."""
    _make_pre_migration_db(db_url)
    with pytest.raises(SchemaError, match=r"revision '0001', older than.*tinsmith db upgrade"):
        MetadataStore.open_existing(db_url)
    assert (_state(db_url).current, _state(db_url).recorded) == ("0001", False)
    MetadataStore(db_url).close()
    db = MetadataStore.open_existing(db_url)
    try:
        assert [r.training_run_id for r in db.list_runs()[0]] == ["run-old"]
        assert db.list_all_checkpoints()[1] == 1 and not db.has_api_keys()
        with pytest.raises(Exception, match="(?i)read-only|readonly"):
            db.add_run("run-new", session_id="sess-old", base_model=TINY, lora=LORA)
        assert db.get_run("run-new") is None
    finally:
        db.close()
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"revision '9999'.*newer Tinsmith"):
        MetadataStore.open_existing(db_url)


def test_open_existing_refuses_an_empty_database(db_url: str) -> None:
    engine = create_db_engine(db_url)
    engine.connect().close()  # SQLite: the file exists now, empty
    engine.dispose()
    with pytest.raises(SchemaError, match="no Tinsmith tables"):
        MetadataStore.open_existing(db_url)
    assert _state(db_url).current is None


def test_serve_opens_and_migrates_the_database_once(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The exposure check and the service share one store (it used to be opened twice)."""
    upgraded: list[str] = []
    real = storage_db.upgrade_schema
    monkeypatch.setattr(storage_db, "upgrade_schema",
                        lambda engine: upgraded.append(str(engine.url)) or real(engine))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    serve(ServerSettings(data_dir=tmp_path, models=(TINY,), port=0))
    assert upgraded == [f"sqlite:///{tmp_path / 'tinsmith.db'}"]


# A process that imports the store, says it is ready, waits for "go", then opens the database.
_OPENER = """
import sys, time
from pathlib import Path
from tinsmith.storage.db import MetadataStore
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.002)
MetadataStore(url).close()
"""


def test_concurrent_processes_upgrade_once(db_url: str, tmp_path: Path) -> None:
    """Servers starting together on one database: each waits for the schema lock, one
    upgrades, the others find it upgraded."""
    _make_pre_migration_db(db_url)
    go = tmp_path / "go"
    readies = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, db_url, str(r), str(go)],
                              stderr=subprocess.PIPE, text=True) for r in readies]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in readies) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        errors = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert _state(db_url).current == HEAD
    assert _diff(db_url, target_metadata()) == []


def test_db_cli_current_and_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_pre_migration_db(f"sqlite:///{tmp_path / 'tinsmith.db'}")
    args = ["--data-dir", str(tmp_path)]
    assert cli_main(["db", "current", *args]) == 0
    out = capsys.readouterr().out
    assert "revision  0001 (made before migrations" in out and f"newest    {HEAD}" in out
    assert cli_main(["db", "upgrade", *args]) == 0
    assert f"upgraded from schema revision 0001 to {HEAD}" in capsys.readouterr().out
    assert cli_main(["db", "upgrade", *args]) == 0
    assert "already at the newest" in capsys.readouterr().out
    assert cli_main(["db", "current", *args]) == 0
    assert f"revision  {HEAD}\n" in capsys.readouterr().out


def test_sdk_round_trip_on_an_upgraded_postgresql_database(
        postgres_url: str, tmp_path: Path) -> None:
    """A server on PostgreSQL (a database made before migrations, with an old run in it):
    train, save, and list through the official SDK."""
    _make_pre_migration_db(postgres_url)
    # As users write it: `postgresql://` with no driver named means psycopg 3.
    plain_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with tinsmith.local(models=[TINY], data_dir=tmp_path, database_url=plain_url) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        rc = tinker.RestClient(base_url=url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=TINY, rank=2).result()
        tok = tc.get_tokenizer()
        fb = tc.forward_backward([text_datum(tok, s) for s in SENTENCES[:2]], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        assert fb.result().metrics["loss:sum"] > 0
        path = tc.save_state("pg").result().path
        assert [c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints] == [
            path]
        runs = {r.training_run_id for r in rc.list_training_runs(limit=100).result().training_runs}
        assert {tc.model_id, "run-old"} <= runs
        old = rc.list_checkpoints("run-old").result().checkpoints
        assert [c.tinker_path for c in old] == ["tinker://run-old/weights/a"]
    assert _state(postgres_url).current == HEAD
    db = MetadataStore(postgres_url)
    try:
        assert db.get_run(tc.model_id) is not None  # the server wrote to PostgreSQL
    finally:
        db.close()
