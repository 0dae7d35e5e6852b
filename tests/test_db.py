"""Tests of the metadata store (tinsmith.storage: db, models, queries) on a real SQLite file."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, StatementError

from tinsmith.storage.db import (
    ApiKeyRow,
    CheckpointRow,
    MetadataStore,
    RunRow,
    SamplerRow,
    SessionRow,
)

LORA = {"rank": 8, "seed": 1, "train_mlp": True, "train_attn": True, "train_unembed": False,
        "alpha": 16}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "tinsmith.db"  # parent dir does not exist yet


@pytest.fixture
def store(db_path: Path):
    s = MetadataStore(f"sqlite:///{db_path}")
    yield s
    s.close()


def _ckpt(store: MetadataStore, run: str, name: str, kind: str = "training", **kw):
    folder = "weights" if kind == "training" else "sampler_weights"
    args = {"checkpoint_type": kind, "tinker_path": f"tinker://{run}/{folder}/{name}",
            "storage_key": f"runs/{run}/{folder}/{name}", "size_bytes": 123,
            "base_model": "tiny", "lora": LORA}
    args.update(kw)
    return store.upsert_checkpoint(run, f"{folder}/{name}", **args)


def test_wal_mode_and_file_created(store: MetadataStore, db_path: Path) -> None:
    assert db_path.exists()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        con.close()


def test_sessions(store: MetadataStore) -> None:
    row = store.add_session("s1", tags=["a", "b"], user_metadata={"k": "v"}, display_name="d",
                            project_id="p", sdk_version="0.38.0")
    assert isinstance(row, SessionRow)
    got = store.get_session("s1")
    assert got == row
    assert got.tags == ["a", "b"] and got.user_metadata == {"k": "v"}
    assert (got.display_name, got.project_id, got.sdk_version) == ("d", "p", "0.38.0")
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    assert got.finished_at is None and got.finish_reason is None
    assert store.get_session("nope") is None

    assert store.heartbeat("s1") is True
    assert store.heartbeat("nope") is False
    assert store.get_session("s1").last_heartbeat_at > row.last_heartbeat_at

    store.finish_session("s1", "client closed")
    fin = store.get_session("s1")
    assert fin.finish_reason == "client closed" and fin.finished_at >= fin.created_at
    store.finish_session("nope", "x")  # unknown: no error

    store.add_session("s2", tags=[], user_metadata={}, display_name=None, project_id=None,
                      sdk_version=None)
    store.add_session("s3", tags=[], user_metadata={}, display_name=None, project_id=None,
                      sdk_version=None)
    assert [s.session_id for s in store.list_sessions(10, 0)] == ["s3", "s2", "s1"]
    assert [s.session_id for s in store.list_sessions(1, 1)] == ["s2"]
    assert store.list_sessions(10, 3) == []


def test_runs(store: MetadataStore) -> None:
    r = store.add_run("s1:train:0", session_id="s1", base_model="tiny", lora=LORA,
                      user_metadata={"x": 1})
    assert isinstance(r, RunRow)
    assert store.get_run("s1:train:0") == r
    assert store.get_run("nope") is None
    assert r.lora == LORA and r.user_metadata == {"x": 1}
    store.touch_run("s1:train:0")
    store.touch_run("nope")  # unknown: no error
    assert store.get_run("s1:train:0").last_request_time > r.last_request_time

    store.add_run("s1:train:1", session_id="s1", base_model="tiny", lora=LORA,
                  user_metadata=None)
    store.add_run("s2:train:0", session_id="s2", base_model="tiny", lora=LORA,
                  user_metadata=None)
    assert store.get_run("s1:train:1").user_metadata is None
    assert store.runs_of_session("s1") == ["s1:train:0", "s1:train:1"]
    assert store.runs_of_session("s3") == []

    rows, total = store.list_runs(2, 0)
    assert total == 3
    assert [x.training_run_id for x in rows] == ["s2:train:0", "s1:train:1"]
    rows, total = store.list_runs(2, 2)
    assert total == 3 and [x.training_run_id for x in rows] == ["s1:train:0"]


def test_checkpoints_upsert_list_delete(store: MetadataStore) -> None:
    run = "s1:train:0"
    c1 = _ckpt(store, run, "000010", user_metadata={"step": 10})
    assert isinstance(c1, CheckpointRow)
    assert c1.tinker_path == f"tinker://{run}/weights/000010"
    assert store.get_checkpoint(run, "weights/000010") == c1
    assert store.get_checkpoint_by_path(c1.tinker_path) == c1
    assert store.get_checkpoint(run, "weights/nope") is None
    assert store.get_checkpoint_by_path("tinker://x/weights/nope") is None

    c2 = _ckpt(store, run, "000020")
    s1 = _ckpt(store, run, "final", kind="sampler")
    _ckpt(store, "other:train:0", "000005")
    assert [c.checkpoint_id for c in store.list_checkpoints(run)] == [
        "weights/000010", "weights/000020", "sampler_weights/final"]
    assert store.last_checkpoint(run, "training") == c2
    assert store.last_checkpoint(run, "sampler") == s1
    assert store.last_checkpoint("nope", "training") is None

    # Upsert replaces the whole row (no duplicate) and makes it the newest.
    c1b = _ckpt(store, run, "000010", size_bytes=999, storage_key="elsewhere", user_metadata=None)
    assert store.get_checkpoint(run, "weights/000010") == c1b
    assert (c1b.size_bytes, c1b.storage_key, c1b.user_metadata) == (999, "elsewhere", None)
    assert c1b.created_at > c1.created_at
    assert len(store.list_checkpoints(run)) == 3
    assert store.last_checkpoint(run, "training").checkpoint_id == "weights/000010"

    rows, total = store.list_all_checkpoints(2, 0)
    assert total == 4
    assert [c.checkpoint_id for c in rows] == ["weights/000010", "weights/000005"]
    rows, total = store.list_all_checkpoints(10, 3)
    assert total == 4 and [c.checkpoint_id for c in rows] == ["weights/000020"]

    assert store.delete_checkpoint(run, "weights/000020") is True
    assert store.delete_checkpoint(run, "weights/000020") is False
    assert store.get_checkpoint(run, "weights/000020") is None
    assert store.list_all_checkpoints(10, 0)[1] == 3

    with pytest.raises(ValueError):
        _ckpt(store, run, "bad", kind="nonsense")


def test_large_size_bytes_and_portable_schema(store: MetadataStore) -> None:
    c = _ckpt(store, "r:train:0", "big", size_bytes=5 * 2**40)
    assert store.get_checkpoint("r:train:0", "weights/big").size_bytes == 5 * 2**40 == c.size_bytes
    # The same schema must compile for PostgreSQL: 64-bit sizes, timezone-aware timestamps.
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    from tinsmith.storage.db import Base

    ddl = {name: str(CreateTable(t).compile(dialect=postgresql.dialect()))
           for name, t in Base.metadata.tables.items()}
    assert set(ddl) == {"sessions", "training_runs", "checkpoints", "samplers", "audit_events",
                        "usage_hourly"}
    assert "size_bytes BIGINT" in ddl["checkpoints"]
    assert "expires_at TIMESTAMP WITH TIME ZONE" in ddl["checkpoints"]
    assert "TIMESTAMP WITHOUT TIME ZONE" not in "".join(ddl.values())
    assert "JSON" in ddl["sessions"]


def test_expired_checkpoints(store: MetadataStore) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    _ckpt(store, "r:train:0", "a", expires_at=t0)
    _ckpt(store, "r:train:0", "b", expires_at=t0 + timedelta(hours=1))
    _ckpt(store, "r:train:0", "never")  # no expiry
    assert store.expired_checkpoints(t0 - timedelta(seconds=1)) == []
    assert [c.checkpoint_id for c in store.expired_checkpoints(t0)] == ["weights/a"]
    later = store.expired_checkpoints(t0 + timedelta(days=1))
    assert [c.checkpoint_id for c in later] == ["weights/a", "weights/b"]
    assert later[0].expires_at == t0
    # Aware datetimes in another zone compare by instant.
    plus2 = timezone(timedelta(hours=2))
    assert [c.checkpoint_id for c in store.expired_checkpoints(
        datetime(2030, 1, 1, 2, 30, tzinfo=plus2))] == ["weights/a"]
    with pytest.raises(StatementError, match="naive datetime"):
        store.expired_checkpoints(datetime(2030, 1, 1))  # naive datetimes are refused


def test_samplers(store: MetadataStore) -> None:
    a = store.add_sampler("samp-1", session_id="s1", base_model="tiny", model_path=None)
    b = store.add_sampler("samp-2", session_id="s1", base_model="tiny",
                          model_path="tinker://r/sampler_weights/final")
    store.add_sampler("samp-3", session_id="s2", base_model="tiny", model_path=None)
    assert isinstance(a, SamplerRow)
    assert store.get_sampler("samp-1") == a and a.model_path is None
    assert store.get_sampler("samp-2").model_path == b.model_path
    assert store.get_sampler("nope") is None
    assert store.samplers_of_session("s1") == ["samp-1", "samp-2"]
    assert store.samplers_of_session("s9") == []


def test_data_survives_reopen(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    s = MetadataStore(url)
    sess = s.add_session("s1", tags=["t"], user_metadata={"m": [1, 2]}, display_name=None,
                         project_id=None, sdk_version="x")
    s.finish_session("s1", "done")
    run = s.add_run("s1:train:0", session_id="s1", base_model="tiny", lora=LORA,
                    user_metadata=None)
    exp = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    ck = _ckpt(s, "s1:train:0", "000001", expires_at=exp, user_metadata={"a": "b"})
    samp = s.add_sampler("samp", session_id="s1", base_model="tiny", model_path=ck.tinker_path)
    fin = s.get_session("s1")
    s.close()

    s2 = MetadataStore(url)
    try:
        assert s2.get_session("s1") == fin and fin.created_at == sess.created_at
        assert s2.get_run("s1:train:0") == run
        assert s2.get_checkpoint("s1:train:0", "weights/000001") == ck
        assert s2.get_checkpoint("s1:train:0", "weights/000001").expires_at == exp
        assert s2.get_sampler("samp") == samp
        assert s2.list_runs(10, 0)[1] == 1
        # Still writable after reopening, and the replace key still holds.
        _ckpt(s2, "s1:train:0", "000001", size_bytes=7)
        assert len(s2.list_checkpoints("s1:train:0")) == 1
    finally:
        s2.close()


def test_rows_are_frozen_and_follow_the_models(store: MetadataStore) -> None:
    from sqlalchemy import inspect

    from tinsmith.storage.models import ApiKeyModel, CheckpointModel, RunModel

    run = store.add_run("r", session_id="s", base_model="tiny", lora=LORA)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.owner = "k"  # type: ignore[misc]
    names = [f.name for f in dataclasses.fields(RunRow)]
    assert names == [c.key for c in inspect(RunModel).columns]
    # Columns that stay in the store: a checkpoint's surrogate id, a key's hash.
    assert [f.name for f in dataclasses.fields(CheckpointRow)] == [
        c.key for c in inspect(CheckpointModel).columns if c.key != "id"]
    assert "key_hash" not in {f.name for f in dataclasses.fields(ApiKeyRow)}
    assert len(dataclasses.fields(ApiKeyRow)) == len(inspect(ApiKeyModel).columns) - 1


def test_open_existing_makes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "tinsmith.db"
    with pytest.raises(FileNotFoundError, match="no metadata database at"):
        MetadataStore.open_existing(f"sqlite:///{missing}")
    assert not missing.parent.exists()
    with pytest.raises(FileNotFoundError):
        MetadataStore.open_existing("sqlite://")


def test_open_existing_reads_while_a_writer_is_open(store: MetadataStore, db_path: Path) -> None:
    store.add_session("s1", tags=[], user_metadata={})
    reader = MetadataStore.open_existing(f"sqlite:///{db_path}")
    try:
        assert [s.session_id for s in reader.list_sessions()] == ["s1"]
        store.add_session("s2", tags=[], user_metadata={})  # the writer is not blocked
        assert [s.session_id for s in reader.list_sessions()] == ["s2", "s1"]
        with pytest.raises(Exception, match="readonly"):
            reader.heartbeat("s1")
    finally:
        reader.close()


def test_duplicate_ids_are_rejected(store: MetadataStore) -> None:
    store.add_run("r", session_id="s", base_model="tiny", lora=LORA, user_metadata=None)
    with pytest.raises(IntegrityError):
        store.add_run("r", session_id="s", base_model="tiny", lora=LORA, user_metadata=None)
    assert store.list_runs(10, 0)[1] == 1


def test_concurrent_threads_lose_nothing(store: MetadataStore) -> None:
    n_threads, per_thread = 4, 50
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                rid = f"s{t}:train:{i}"
                store.add_run(rid, session_id=f"s{t}", base_model="tiny", lora=LORA,
                              user_metadata={"i": i})
                store.touch_run(rid)
                # All threads also fight over the same checkpoint key.
                _ckpt(store, "shared:train:0", "hot", size_bytes=t * 1000 + i)
                _ckpt(store, rid, "000001")
                store.list_runs(5, 0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    rows, total = store.list_runs(1000, 0)
    assert total == n_threads * per_thread == len(rows)
    assert len({r.training_run_id for r in rows}) == total
    for t in range(n_threads):
        assert len(store.runs_of_session(f"s{t}")) == per_thread
    assert len(store.list_checkpoints("shared:train:0")) == 1
    assert store.list_all_checkpoints(1, 0)[1] == n_threads * per_thread + 1
