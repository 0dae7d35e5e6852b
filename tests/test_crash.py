"""Crash safety: `kill -9` of a `tinsmith serve` process loses nothing it acknowledged.

A real server runs in a subprocess on a SQLite file in a temporary data dir; the official SDK
trains against it; SIGKILL lands mid-step, right after a save was submitted, and (with the
test-only TINSMITH_DEBUG_SLOW_WRITES_S) in the middle of a checkpoint write. After a restart
on the same data dir and port: futures in flight raise a clear error, every checkpoint path
the server returned loads byte for byte, a half-written checkpoint is never listed, and a
client resumed from its last checkpoint computes the losses an uninterrupted run computes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, ServeProcess, text_datum
from tinker import types

from tinsmith.scheduler.paths import parse_path
from tinsmith.storage.files import MANIFEST, CheckpointStore

ADAM = types.AdamParams(learning_rate=5e-3)
RAISE_WITHIN_S = 60.0  # after the restart; the SDK backs off up to 30 s between reconnects



class ServerProcess(ServeProcess):
    """`tinsmith serve` of the tiny model on a fixed data dir and port, started again after kills."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, ["--data-dir", str(data_dir), "--models", TINY])
        self.data_dir = data_dir


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path)
    yield s
    s.stop()


def _files(data_dir: Path, path: str) -> dict[str, bytes]:
    """A checkpoint's files, read straight from the server's checkpoint store."""
    return CheckpointStore(str(data_dir / "checkpoints")).get(parse_path(path).storage_key)


def _leftovers(data_dir: Path) -> list[str]:
    return [str(p) for p in (data_dir / "checkpoints").rglob("*")
            if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]


def _expect_lost(future: object, restarted_at: float) -> str:
    """The in-flight `future` raises (does not hang), soon after the restart; its message."""
    message = _settle(future, restarted_at)
    assert message is not None, "a future in flight at the kill got a result"
    return message


def _settle(future: object, restarted_at: float) -> str | None:
    """None if `future` has its result (delivered before the kill), else the message of the
    clear error it raised, soon after the restart, instead of hanging."""
    try:
        future.result(timeout=RAISE_WITHIN_S + 30)  # type: ignore[attr-defined]
        return None
    except TimeoutError:
        raise AssertionError("a future in flight at the kill hung") from None
    except Exception as e:  # noqa: BLE001 - which error the SDK raises is checked by its text
        assert time.monotonic() - restarted_at < RAISE_WITHIN_S
        assert "restarted" in str(e), e
        return str(e)


class Trainer:
    """One client's training loop: step i trains on batches[i]; save_state every `every` steps.
    Records each step's loss and, for each path the server returned, the files read then."""

    def __init__(self, batches: list[list[types.Datum]], every: int, data_dir: Path) -> None:
        self.batches, self.every, self.data_dir = batches, every, data_dir
        self.losses: dict[int, float] = {}
        self.saved: dict[str, dict[str, bytes]] = {}
        self.last: tuple[str, int] | None = None  # (path, steps done) of the newest checkpoint

    def train(self, tc: tinker.TrainingClient, start: int, stop: int) -> None:
        for i in range(start, stop):
            fb = tc.forward_backward(self.batches[i], "cross_entropy")
            tc.optim_step(ADAM)
            self.losses[i] = fb.result().metrics["loss:sum"]
            if (i + 1) % self.every == 0:
                self.keep(tc.save_state(f"step-{i + 1}").result().path, i + 1)

    def keep(self, path: str, steps: int) -> None:
        self.saved[path] = _files(self.data_dir, path)
        self.last = (path, steps)

    def check_saved(self, sc: tinker.ServiceClient) -> None:
        """Every acknowledged checkpoint: same bytes as when it was acknowledged, and loads."""
        for path, files in self.saved.items():
            assert _files(self.data_dir, path) == files, path
            sc.create_training_client_from_state(path).result()


def _batches(tokenizer, n: int) -> list[list[types.Datum]]:
    k = len(SENTENCES)
    return [[text_datum(tokenizer, SENTENCES[i % k]), text_datum(tokenizer, SENTENCES[(i + 1) % k])]
            for i in range(n)]


def test_sigkill_during_training_loses_nothing_acknowledged(server: ServerProcess) -> None:
    steps, every, seed = 14, 3, 11
    server.start()
    sc = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    reference = sc.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()
    batches = _batches(reference.get_tokenizer(), steps)
    uninterrupted = Trainer(batches, every=10**9, data_dir=server.data_dir)
    uninterrupted.train(reference, 0, steps)
    expected = uninterrupted.losses

    t = Trainer(batches, every, server.data_dir)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()
    t.train(tc, 0, 5)  # checkpoints after steps 3
    runs = {tc.model_id}

    # Kill 1: four steps sent at once; the first one's result is in; the rest were accepted
    # (the SDK submits in order and each submission is answered at once), not all computed.
    inflight = []
    for i in range(5, 9):
        inflight += [tc.forward_backward(batches[i], "cross_entropy"), tc.optim_step(ADAM)]
    t.losses[5] = inflight[0].result().metrics["loss:sum"]
    server.kill()
    server.start()
    restarted = time.monotonic()
    # Each either got its result before the kill or raises; the accepted ones' ids are stale.
    messages = [_settle(f, restarted) for f in inflight[1:]]
    assert any(m is not None and "was lost" in m for m in messages), messages
    t.check_saved(sc)
    assert t.last is not None
    path, done = t.last
    tc = sc.create_training_client_from_state_with_optimizer(path).result()
    runs.add(tc.model_id)
    t.train(tc, done, 11)  # checkpoints after steps 6 and 9

    # Kill 2: a step and a save submitted back to back, then the kill at once.
    fb, opt = tc.forward_backward(batches[11], "cross_entropy"), tc.optim_step(ADAM)
    save = tc.save_state("late")
    server.kill()
    server.start()
    restarted = time.monotonic()
    for f in (fb, opt, save):
        _expect_lost(f, restarted)
    t.check_saved(sc)
    listed = {c.tinker_path for r in runs for c in rest.list_checkpoints(r).result().checkpoints}
    assert set(t.saved) <= listed
    late = f"tinker://{tc.model_id}/weights/late"
    if late in listed:  # the save finished before the kill (its answer was lost): complete
        t.keep(late, 12)
        sc.create_training_client_from_state(late).result()
    assert listed <= set(t.saved)
    assert not _leftovers(server.data_dir)

    path, done = t.last
    tc = sc.create_training_client_from_state_with_optimizer(path).result()
    t.train(tc, done, steps)
    assert server.starts == 3
    for i in range(steps):
        assert t.losses[i] == pytest.approx(expected[i], rel=1e-6, abs=1e-6), i


def _wait_for_tmp(checkpoints: Path, has: str) -> Path:
    """The first unpublished write folder holding a file named `has` (or any file: "")."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for tmp in checkpoints.rglob("*.tmp-*"):
            names = [p.name for p in tmp.iterdir()] if tmp.is_dir() else []
            if names and (not has or has in names):
                return tmp
        time.sleep(0.005)
    raise AssertionError(f"no write in progress with {has or 'a file'} appeared")


def test_sigkill_during_checkpoint_write_never_lists_it(server: ServerProcess) -> None:
    slow = {"TINSMITH_DEBUG_SLOW_WRITES_S": "0.5"}  # a pause after each file written
    server.start(**slow)
    checkpoints = server.data_dir / "checkpoints"
    sc = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    batch = _batches(tc.get_tokenizer(), 1)[0]
    tc.forward_backward(batch, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    good = tc.save_state("good").result().path
    good_files = _files(server.data_dir, good)
    assert len(good_files) >= 2  # else "after the first file" would not be mid-write

    # Kill 1: after the first file of a new checkpoint is written.
    half = tc.save_state("half")
    _wait_for_tmp(checkpoints, has="")
    server.kill()
    assert _leftovers(server.data_dir)
    server.start(**slow)
    assert not _leftovers(server.data_dir)  # cleaned at start-up
    _expect_lost(half, time.monotonic())

    # Kill 2: an overwrite whose files and manifest are all written, not yet published.
    tc2 = sc.create_training_client_from_state_with_optimizer(good).result()
    base = tc2.save_state("base").result().path
    base_files = _files(server.data_dir, base)
    tc2.forward_backward(batch, "cross_entropy").result()
    tc2.optim_step(ADAM).result()
    again = tc2.save_state("base", overwrite=True)
    _wait_for_tmp(checkpoints, has=MANIFEST)
    server.kill()
    server.start()
    _expect_lost(again, time.monotonic())
    assert not _leftovers(server.data_dir)

    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    half_path = f"tinker://{tc.model_id}/weights/half"
    def listed(run_id: str) -> set[str]:
        return {c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints}

    assert listed(tc.model_id) == {good}
    assert listed(tc2.model_id) == {base}
    cli = subprocess.run([sys.executable, "-m", "tinsmith.cli", "checkpoints", "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=120,
                         check=True)
    assert good in cli.stdout and base in cli.stdout and half_path not in cli.stdout, cli.stdout
    with pytest.raises(Exception, match="does not exist"):
        sc.create_training_client_from_state(half_path).result()
    assert _files(server.data_dir, good) == good_files
    assert _files(server.data_dir, base) == base_files  # the interrupted overwrite left it as is
    sc.create_training_client_from_state_with_optimizer(base).result()

    http = httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY})
    r = http.post("/api/v1/retrieve_future", json={"request_id": "req-0badc0de-7"})  # an old boot's
    assert r.status_code == 404 and "the server restarted" in r.json()["detail"], r.text
    r = http.post("/api/v1/retrieve_future", json={"request_id": "req-nope"})
    assert r.status_code == 404 and "unknown or expired" in r.json()["detail"], r.text


def test_recover_puts_back_an_overwritten_checkpoint_and_drops_unpublished_writes(
    tmp_path: Path,
) -> None:
    """A crash between moving the old checkpoint aside and publishing the new one leaves
    `<key>.old-*` and no `<key>`; start-up recovery moves it back. `.tmp-*` folders go."""
    store = CheckpointStore(str(tmp_path))
    store.put("run/weights/a", {"w": b"old a"})
    store.put("run/weights/b", {"w": b"old b"})
    a, b = tmp_path / "run/weights/a", tmp_path / "run/weights/b"
    a.rename(tmp_path / "run/weights/a.old-1")  # crash mid-publish of a new "a"
    (tmp_path / "run/weights/a.tmp-2").mkdir()
    (tmp_path / "run/weights/a.tmp-2/w").write_bytes(b"new a")
    (tmp_path / "run/weights/b.old-3").mkdir()  # crash after publishing a new "b"
    (tmp_path / "run/weights/b.old-3/w").write_bytes(b"older b")
    assert not store.exists("run/weights/a")
    done = store.recover()
    assert store.get("run/weights/a") == {"w": b"old a"}
    assert store.get("run/weights/b") == {"w": b"old b"}
    assert sorted(p.name for p in (tmp_path / "run/weights").iterdir()) == ["a", "b"]
    assert len(done) == 3 and a.is_dir() and b.is_dir()
