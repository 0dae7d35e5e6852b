"""Engine replicas (`replicas=2`: two independent one-rank gloo groups) against the
single-process engine, through the official SDK and real servers on the tiny model: 4
concurrent clients are placed on both replicas and each gets its solo results; a run moved
between replicas (uneven load) goes on with the same losses; a replica whose rank is killed
fails only its own runs' requests, the other replica's runs go on, and a checkpoint saved
before the kill loads and gives the same logprobs."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import API_KEY, TINY, logprobs_of, text_datum
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

import tinsmith
from tinsmith.engine.sharded.passes import PAUSE_ENV

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test",
             "a b c", "one two three four five six"]
ADAM = types.AdamParams(learning_rate=5e-3, weight_decay=0.01, grad_clip_norm=5.0)
TOL = 1e-5


def _replica_ranks() -> dict[str, multiprocessing.Process]:
    return {p.name: p for p in multiprocessing.active_children()
            if p.name.startswith("tinsmith-replica-")}


@dataclass
class Servers:
    solo: tinker.ServiceClient  # the single-process engine
    two: tinker.ServiceClient  # replicas=2
    two_url: str
    pause: Path  # while this file exists, every rank sleeps its seconds in each pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pause = tmp_path_factory.mktemp("pause") / "seconds"
    os.environ[PAUSE_ENV] = str(pause)  # read by the ranks, which inherit it at spawn
    try:
        with tinsmith.local(models=[TINY]) as solo, tinsmith.local(models=[TINY], replicas=2) as two:
            assert set(_replica_ranks()) == {"tinsmith-replica-0-rank-0", "tinsmith-replica-1-rank-0"}
            yield Servers(tinker.ServiceClient(base_url=solo, api_key=API_KEY),
                          tinker.ServiceClient(base_url=two, api_key=API_KEY), two, pause)
    finally:
        os.environ.pop(PAUSE_ENV, None)
    assert not _replica_ranks(), "replica rank processes outlived their server"


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def _per_replica(url: str) -> list[int]:
    """Resident runs of each replica, from /metrics."""
    got = {int(dict(labels)["replica"]): int(v) for (name, labels), v in _scrape(url).items()
           if name == "tinsmith_replica_resident_runs" and dict(labels)["model"] == TINY}
    return [got[k] for k in sorted(got)]


def _moves(url: str) -> float:
    return _scrape(url)[("tinsmith_replica_moves_total", (("model", TINY),))]


def _create_on(sc: tinker.ServiceClient, url: str, seed: int) -> tuple[tinker.TrainingClient, int]:
    """A new run, and the replica it was placed on (the one whose count went up)."""
    before = _per_replica(url)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()
    after = _per_replica(url)
    (k,) = [k for k in range(len(after)) if after[k] == before[k] + 1]
    return tc, k


def _batches(tok, i: int) -> list[list[types.Datum]]:
    """Client i's batches: different data per client."""
    rot = SENTENCES[i % 4:] + SENTENCES[:i % 4]
    return [[text_datum(tok, s) for s in rot[:3]], [text_datum(tok, rot[3], weight=0.5)]]


def _train(tc: tinker.TrainingClient, batches, steps: int) -> dict[str, list]:
    losses = []
    for s in range(steps):
        losses.append(tc.forward_backward(batches[s % len(batches)], "cross_entropy")
                      .result().metrics["loss:sum"])
        tc.optim_step(ADAM).result()
    return {"losses": losses, "fwd": logprobs_of(tc.forward(batches[0], "cross_entropy").result())}


def _close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=TOL, atol=TOL)


def _same(got: dict[str, list], want: dict[str, list], what: str) -> None:
    _close(got["losses"], want["losses"])
    for a, b in zip(got["fwd"], want["fwd"], strict=True):
        _close(a, b)
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
             for a, b in [(got["losses"], want["losses"]), *zip(got["fwd"], want["fwd"])]]
    diff = max(np.max(np.abs(a - b)) for a, b in pairs)
    rel = max(np.max(np.abs(a - b) / np.abs(b)) for a, b in pairs)
    print(f"{what} vs single process: max difference {diff:.1e}, relative {rel:.1e}")  # docs


def test_concurrent_clients_spread_over_replicas_and_equal_solo(servers: Servers) -> None:
    url, n, steps = servers.two_url, 4, 3
    before = _per_replica(url)
    assert len(before) == 2
    created, go = threading.Barrier(n + 1), threading.Barrier(n + 1)
    got: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            tc = servers.two.create_lora_training_client(base_model=TINY, rank=4, seed=100 + i).result()
            created.wait(60)
            go.wait(60)
            got[i] = _train(tc, _batches(tc.get_tokenizer(), i), steps)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            created.abort()
            go.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    created.wait(120)
    placed = [a - b for a, b in zip(_per_replica(url), before)]
    go.wait(60)
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sum(placed) == n and min(placed) >= 1, f"runs per replica: {placed}"
    for i in range(n):  # each client alone on the single-process engine
        tc = servers.solo.create_lora_training_client(base_model=TINY, rank=4, seed=100 + i).result()
        _same(got[i], _train(tc, _batches(tc.get_tokenizer(), i), steps), f"concurrent client {i}")
    assert got[0]["losses"][-1] < got[0]["losses"][0]  # it trained: the comparison means something


def test_a_run_moved_between_replicas_keeps_its_losses(servers: Servers) -> None:
    """Two busy runs on one replica and none on the other: one of them moves (through the
    checkpoint format, with its optimizer state) and both go on exactly as alone."""
    sc, url = servers.two, servers.two_url
    homes: dict[int, list[tuple[int, tinker.TrainingClient]]] = {}
    seed = 200
    while not any(len(v) == 2 for v in homes.values()):
        tc, k = _create_on(sc, url, seed)
        homes.setdefault(k, []).append((seed, tc))
        seed += 1
    pair = next(v for v in homes.values() if len(v) == 2)
    moves, steps = _moves(url), 6
    batches = _batches(pair[0][1].get_tokenizer(), 1)
    losses: dict[int, list[float]] = {s: [] for s, _ in pair}
    for step in range(steps):  # the two runs take turns; the other replica idles
        for s, tc in pair:
            losses[s].append(tc.forward_backward(batches[step % 2], "cross_entropy")
                             .result().metrics["loss:sum"])
            tc.optim_step(ADAM).result()
    assert _moves(url) > moves, "uneven load moved no run"
    for s, tc in pair:
        fwd = logprobs_of(tc.forward(batches[0], "cross_entropy").result())
        solo = servers.solo.create_lora_training_client(base_model=TINY, rank=4, seed=s).result()
        _same({"losses": losses[s], "fwd": fwd}, _train(solo, batches, steps), f"busy run {s}")


def test_a_dead_replica_loses_only_its_runs(servers: Servers) -> None:
    sc, url, pause = servers.two, servers.two_url, servers.pause
    p, kp = _create_on(sc, url, 300)
    q, kq = _create_on(sc, url, 301)
    while kq == kp:
        q, kq = _create_on(sc, url, 302 + kq)
    batches = _batches(p.get_tokenizer(), 2)
    _train(p, batches, 1)
    q_before = _train(q, batches, 1)["losses"]
    ref = logprobs_of(p.forward(batches[0], "cross_entropy").result())
    path = p.save_state("before-crash").result().path  # acknowledged: in storage
    victim = _replica_ranks()[f"tinsmith-replica-{kp}-rank-0"]
    pause.write_text("3")
    try:
        fp = p.forward_backward(batches[1], "cross_entropy")
        fq = q.forward_backward(batches[1], "cross_entropy")
        threading.Timer(1.0, victim.kill).start()  # while the ranks sit in the pass
        with pytest.raises(tinker.RequestFailedError, match="sharded engine failed: rank 0"):
            fp.result()
        assert fq.result().metrics["loss:sum"] > 0  # the other replica's run went on
    finally:
        pause.unlink()
    assert f"tinsmith-replica-{kq}-rank-0" in _replica_ranks()
    assert f"tinsmith-replica-{kp}-rank-0" not in _replica_ranks()
    q.optim_step(ADAM).result()
    q_after = q.forward_backward(batches[0], "cross_entropy").result().metrics["loss:sum"]
    assert q_after < q_before[0]  # trained on, on its replica
    with pytest.raises(tinker.RequestFailedError, match="resume it from its last save_state"):
        p.optim_step(ADAM).result()
    # The checkpoint saved before the kill loads (the dead replica, now the emptiest, starts
    # again for it) and gives the same logprobs.
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    restarted = _replica_ranks().get(f"tinsmith-replica-{kp}-rank-0")
    assert restarted is not None and restarted.pid != victim.pid
    for a, b in zip(logprobs_of(resumed.forward(batches[0], "cross_entropy").result()), ref,
                    strict=True):
        _close(a, b)


def test_replicas_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="replicas must be >= 1, got 0"), \
            tinsmith.local(models=[TINY], data_dir=tmp_path, replicas=0):
        pass


def test_serve_replicas_flag_reaches_the_settings(tmp_path: Path) -> None:
    from tinsmith.cli import _settings, build_parser

    parse = build_parser().parse_args
    assert _settings(parse(["serve", "--data-dir", str(tmp_path), "--replicas", "3"])).replicas == 3
    assert _settings(parse(["serve", "--data-dir", str(tmp_path)])).replicas == 1
