"""A rank group spanning processes that joined over TCP, as it would span machines
(docs/scale-out.md, "Several machines"), on loopback: `tinsmith serve --devices 2
--group-listen ... --local-ranks 1` and one `tinsmith worker --join` (separate OS processes,
started through the CLI), driven by the official SDK.

Checked: training, checkpoints and sampling equal a single-process server within 1e-5
(float32); a wrong token is refused and logged; killing the worker mid-pass fails the request
in flight with a clear server error, the server keeps answering, /readyz names the group as
down and waiting for workers, a restarted worker rejoins, and the run resumes from its last
save_state to the losses of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import API_KEY, TINY, ServeProcess, free_port, logprobs_of
from test_sharded import SENTENCES, _batches, _close, _steps  # the same batches and steps
from tinker import types

import tinsmith
from tinsmith.engine.sharded.desk import MISSED_S
from tinsmith.engine.sharded.passes import PAUSE_ENV

TOKEN = "multinode-test-secret"


class Worker:
    """`python -m tinsmith.cli worker --join ...` in a subprocess, logging to a file."""

    def __init__(self, log_dir: Path, join: str, env: dict[str, str]) -> None:
        self.log_dir, self.join, self.env = log_dir, join, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *extra: str, token: str = TOKEN) -> subprocess.Popen[bytes]:
        self.starts += 1
        with open(self.log_dir / f"worker-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tinsmith.cli", "worker", "--join", self.join,
                 "--device", "cpu", *extra],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "TINSMITH_GROUP_TOKEN": token})
        return self.proc

    def log(self) -> str:
        return (self.log_dir / f"worker-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@dataclass
class Cluster:
    server: ServeProcess
    worker: Worker
    two: tinker.ServiceClient  # the group: rank 0 in the server's machine, rank 1 joined
    one: tinker.ServiceClient  # a single-process server, for reference
    pause: Path  # while this file exists, the ranks sleep its seconds in each pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    d = tmp_path_factory.mktemp("multinode")
    pause = d / "pause-seconds"
    token_file = d / "token"
    token_file.write_text(TOKEN + "\n")
    join = f"127.0.0.1:{free_port()}"
    env = {PAUSE_ENV: str(pause)}
    server = ServeProcess(d, ["--models", TINY, "--device", "cpu", "--devices", "2",
                              "--group-listen", join, "--local-ranks", "1",
                              "--group-token-file", str(token_file), "--data-dir", str(d / "data")],
                          env=env)
    worker = Worker(d, join, env)
    # The server's start waits for the group, which waits for the worker: the worker comes
    # first and keeps knocking (--retry) until the server listens.
    worker.start("--retry")
    try:
        server.start()
        with tinsmith.local(models=[TINY], devices=1) as one:
            yield Cluster(server, worker,
                          tinker.ServiceClient(base_url=server.url, api_key=API_KEY),
                          tinker.ServiceClient(base_url=one, api_key=API_KEY), pause)
    finally:
        server.stop()
        worker.kill()


def _group_check(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/readyz", timeout=30)
    return r.status_code, r.json()["checks"][f"rank_group:{TINY}"]


def test_training_and_sampling_equal_single_process(cluster: Cluster) -> None:
    status, group = _group_check(cluster.server.url)
    assert status == 200 and group["ok"], group
    assert group["detail"].startswith("up, 2 ranks") and "1 of 1 remote rank(s) joined" in group["detail"]
    got = {}
    for n, sc in ((1, cluster.one), (2, cluster.two)):
        tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=7)
        tok = tc.get_tokenizer()
        batches = _batches(tok)
        losses = _steps(tc, batches * 2)
        fwd = logprobs_of(tc.forward(batches[0], "cross_entropy").result())
        path = tc.save_state("mid").result().path
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        after = _steps(resumed, batches[:2])
        sampler = resumed.save_weights_and_get_sampling_client()
        sample = sampler.sample(types.ModelInput.from_ints(tok.encode("the quick")), num_samples=2,
                                sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0,
                                                                     seed=11)).result()
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(tok.encode(SENTENCES[0]))).result()
        got[n] = {"losses": losses, "fwd": fwd, "after": after, "scored": scored[1:],
                  "tokens": [s.tokens for s in sample.sequences]}
    for key in ("losses", "after", "scored", "fwd"):
        a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in got[n][key]])
                for n in (2, 1))
        print(f"joined group vs single process, {key}: max abs difference "
              f"{np.max(np.abs(a - b)):.1e}, relative {np.max(np.abs(a - b) / np.abs(b)):.1e}")
        for a, b in zip(got[2][key], got[1][key]):
            _close(a, b)
    assert got[2]["tokens"] == got[1]["tokens"]
    assert got[1]["losses"][-1] < got[1]["losses"][0]  # it trained: the comparison means something


def _wait_for_log(server: ServeProcess, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)


def test_a_wrong_token_is_refused_and_logged(cluster: Cluster, tmp_path: Path) -> None:
    intruder = Worker(tmp_path, cluster.worker.join, {})
    proc = intruder.start(token="not-the-secret")  # no --retry: it gives up at once
    try:
        assert proc.wait(120) == 3, intruder.log()
    finally:
        intruder.kill()
    assert "refused the group token" in intruder.log()
    _wait_for_log(cluster.server, "wrong group token")
    # A peer that connects and says nothing holds up no one, and is hung up on.
    host, port = cluster.worker.join.split(":")
    silent = socket.create_connection((host, int(port)))
    try:
        # The right token on the wrong device (NCCL cannot join a gloo group): refused too.
        misfit = Worker(tmp_path / "misfit", cluster.worker.join, {})
        (tmp_path / "misfit").mkdir()
        proc = misfit.start("--device", "cuda")  # the later --device wins
        try:
            assert proc.wait(120) == 2, misfit.log()
        finally:
            misfit.kill()
        assert "this group runs on cpu" in misfit.log()
        silent.settimeout(60)
        while silent.recv(4096):  # the challenge, then the end once HELLO_S passed
            pass
    finally:
        silent.close()
    _wait_for_log(cluster.server, "closed before joining")
    status, group = _group_check(cluster.server.url)  # the group is untouched
    assert status == 200 and group["detail"].startswith("up"), group


def test_a_group_without_its_workers_says_how_many_joined(tmp_path: Path) -> None:
    join = f"127.0.0.1:{free_port()}"
    serve = [sys.executable, "-m", "tinsmith.cli", "serve", "--port", str(free_port()),
             "--models", TINY, "--device", "cpu", "--devices", "2", "--group-listen", join,
             "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "TINSMITH_GROUP_TOKEN"}
    out = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "--group-listen needs the group's shared token" in out.stderr
    out = subprocess.run([*serve, "--group-join-timeout", "2"], capture_output=True, text=True,
                         env={**env, "TINSMITH_GROUP_TOKEN": TOKEN}, timeout=300, check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the sharded engine failed: only 0 of 1 remote rank(s) joined within 2 s" in out.stderr


def test_worker_death_fails_the_request_and_runs_resume_after_it_rejoins(cluster: Cluster) -> None:
    sc, pause, url = cluster.two, cluster.pause, cluster.server.url
    uninterrupted = sc.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    batches = _batches(uninterrupted.get_tokenizer())
    expected = _steps(uninterrupted, batches)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    _close(_steps(tc, batches[:1]), expected[:1])
    path = tc.save_state("before-crash").result().path
    pause.write_text("3")
    try:
        future = tc.forward_backward(batches[1], "cross_entropy")
        threading.Timer(1.0, cluster.worker.kill).start()  # while the ranks sit in the pass
        with pytest.raises(tinker.RequestFailedError, match="the sharded engine failed: .*(worker|rank 1)"):
            future.result()
    finally:
        pause.unlink()
    # The server answers; /readyz says the group is down and waits for its worker.
    assert sc.get_server_capabilities().supported_models
    status, group = _group_check(url)
    assert status == 503 and not group["ok"], group
    assert group["detail"].startswith("down") and "0 of 1 remote rank(s) joined" in group["detail"]
    assert "waiting for workers" in group["detail"]
    with pytest.raises(tinker.RequestFailedError, match="resume it from its last save_state"):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # A restarted worker rejoins; the group can start again; the run resumes from its state.
    cluster.worker.start("--retry")
    deadline = time.monotonic() + 120
    while _group_check(url)[0] != 200:
        assert time.monotonic() < deadline, cluster.worker.log()
        time.sleep(0.2)
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    _close(_steps(resumed, batches[1:]), expected[1:])
    status, group = _group_check(url)
    assert status == 200 and group["detail"].startswith("up") and "generation 2" in group["detail"]


def test_a_silent_worker_counts_as_dead(cluster: Cluster) -> None:
    """A worker that stops beating (here: SIGSTOP, as a machine that vanished from the
    network) fails its group after MISSED_S; once it answers again it rejoins (--retry)."""
    sc, url = cluster.two, cluster.server.url
    tc = sc.create_lora_training_client(base_model=TINY, rank=2, seed=1).result()
    batch = _batches(tc.get_tokenizer())[0]
    tc.forward_backward(batch, "cross_entropy").result()
    proc = cluster.worker.proc
    assert proc is not None and proc.poll() is None
    proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + MISSED_S + 60
        while "sent no heartbeat" not in _group_check(url)[1]["detail"]:
            assert time.monotonic() < deadline, _group_check(url)
            time.sleep(0.5)
        assert _group_check(url)[1]["detail"].startswith("down")
    finally:
        proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 120
    while _group_check(url)[0] != 200:  # the worker noticed, and rejoined
        assert time.monotonic() < deadline, cluster.worker.log()
        time.sleep(0.2)
    # The group died while idle: the next request finds it so and fails with the reason,
    # as with a local rank; the one after starts a new group.
    with pytest.raises(tinker.RequestFailedError, match="sent no heartbeat"):
        tc.forward_backward(batch, "cross_entropy").result()
    fresh = sc.create_lora_training_client(base_model=TINY, rank=2, seed=1).result()
    assert fresh.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"] > 0


def _rank_processes(parent: int) -> list[int]:
    """The rank processes a worker spawned (its children running multiprocessing's spawn)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmd:
            found.append(int(stat.parent.name))
    return found


def test_a_dead_remote_rank_restarts_the_group_with_the_same_worker(cluster: Cluster) -> None:
    """A rank process on the worker's machine dies: its worker reports it and stays joined;
    the next request fails with the reason, the one after runs on a new group."""
    sc, url, proc = cluster.two, cluster.server.url, cluster.worker.proc
    assert proc is not None and proc.poll() is None
    tc = sc.create_lora_training_client(base_model=TINY, rank=2, seed=3).result()
    batch = _batches(tc.get_tokenizer())[0]
    tc.forward_backward(batch, "cross_entropy").result()
    (victim,) = _rank_processes(proc.pid)
    generation = int(_group_check(url)[1]["detail"].split("generation ")[1].split(")")[0])
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "rank 1 exited with code -9" not in _group_check(url)[1]["detail"]:
        assert time.monotonic() < deadline, _group_check(url)
        time.sleep(0.2)
    status, group = _group_check(url)
    assert status == 200 and group["detail"].startswith("down") and "1 of 1 remote" in group["detail"]
    with pytest.raises(tinker.RequestFailedError, match="rank 1 exited with code -9"):
        tc.forward_backward(batch, "cross_entropy").result()
    fresh = sc.create_lora_training_client(base_model=TINY, rank=2, seed=3).result()
    assert fresh.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"] > 0
    assert proc.poll() is None  # the same worker process
    assert f"generation {generation + 1}" in _group_check(url)[1]["detail"]

