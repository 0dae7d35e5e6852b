"""touch_run (every optim_step) writes nothing on the caller's thread: the time is kept in
memory and written by a writer thread, or before this store reads runs, or on close."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tinsmith.storage.db import MetadataStore
from tinsmith.storage.queries import runs as runs_module

LORA = {"rank": 8}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tinsmith.db'}"


def test_touch_is_written_later_but_read_back_at_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_module, "TOUCH_INTERVAL_S", 3600.0)  # the writer thread waits
    store, other = MetadataStore(url), MetadataStore(url)  # `other`: another reader, e.g. the CLI
    try:
        created = store.add_run("s:train:0", session_id="s", base_model="tiny", lora=LORA)
        store.touch_run("s:train:0")
        store.touch_run("nope")  # unknown: no error
        assert other.get_run("s:train:0").last_request_time == created.last_request_time
        touched = store.get_run("s:train:0").last_request_time  # writes pending touches first
        assert touched > created.last_request_time
        assert other.get_run("s:train:0").last_request_time == touched
        store.touch_run("s:train:0")
        (row,), _ = store.list_runs(10, 0)  # listing writes them first too
        assert row.last_request_time > touched
    finally:
        other.close()
        store.close()


def test_close_writes_pending_touches(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_module, "TOUCH_INTERVAL_S", 3600.0)
    store = MetadataStore(url)
    created = store.add_run("s:train:0", session_id="s", base_model="tiny", lora=LORA)
    store.touch_run("s:train:0")
    store.close()
    reopened = MetadataStore(url)
    try:
        assert reopened.get_run("s:train:0").last_request_time > created.last_request_time
    finally:
        reopened.close()


def test_the_writer_thread_stores_touches_by_itself(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs_module, "TOUCH_INTERVAL_S", 0.01)
    store, other = MetadataStore(url), MetadataStore(url)
    try:
        created = store.add_run("s:train:0", session_id="s", base_model="tiny", lora=LORA)
        store.touch_run("s:train:0")
        deadline = time.monotonic() + 30
        while other.get_run("s:train:0").last_request_time == created.last_request_time:
            assert time.monotonic() < deadline, "the touch was never written"
            time.sleep(0.01)
        assert store._touches is not None and store._touches.pending == 0
    finally:
        other.close()
        store.close()
