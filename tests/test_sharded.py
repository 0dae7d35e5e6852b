"""The sharded engine (`devices=2`: two gloo rank processes, FSDP2) against the single-process
engine, through the official SDK and real servers on the tiny model: same losses, logprobs,
optimizer steps, checkpoints and samples within 1e-5 in float32; checkpoints move between
the two; a killed rank fails the request in flight, the server stays up, and a run resumes
from its last save_state to the losses of an uninterrupted run."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tinker
from conftest import API_KEY, TINY, logprobs_of, text_datum
from tinker import types

import tinsmith
from tinsmith.engine.sharded.passes import PAUSE_ENV

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test",
             "a b c"]
TOL = 1e-5


def _ranks() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("tinsmith-rank-")]


@dataclass
class Servers:
    one: tinker.ServiceClient  # devices=1: the single-process engine
    two: tinker.ServiceClient  # devices=2: two gloo ranks
    pause: Path  # while this file exists, the ranks sleep its seconds in each pass


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """One single-process and one 2-rank server, side by side."""
    pause = tmp_path_factory.mktemp("pause") / "seconds"
    os.environ[PAUSE_ENV] = str(pause)  # read by the ranks, which inherit it at spawn
    try:
        with tinsmith.local(models=[TINY], devices=1) as one, \
                tinsmith.local(models=[TINY], devices=2) as two:
            assert len(_ranks()) == 2
            yield Servers(tinker.ServiceClient(base_url=one, api_key=API_KEY),
                          tinker.ServiceClient(base_url=two, api_key=API_KEY), pause)
    finally:
        os.environ.pop(PAUSE_ENV, None)
    assert not _ranks(), "rank processes outlived their server"


def _batches(tok) -> list[list[types.Datum]]:
    full = [text_datum(tok, s) for s in SENTENCES]
    return [full, full[:1], [text_datum(tok, SENTENCES[1], weight=0.5)]]  # 1 datum < 2 ranks too


def _steps(tc, batches, lr: float = 2e-3) -> list[float]:
    losses = []
    for b in batches:
        losses.append(tc.forward_backward(b, "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(types.AdamParams(learning_rate=lr, weight_decay=0.01, grad_clip_norm=5.0)).result()
    return losses


def _close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=TOL, atol=TOL)


def test_training_checkpoints_and_sampling_equal_single_process(servers) -> None:
    got = {}
    for n, sc in ((1, servers.one), (2, servers.two)):
        tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=7)
        tok = tc.get_tokenizer()
        batches = _batches(tok)
        # Two runs packed into one pass (pipelined), then a few ordinary steps.
        other = sc.create_lora_training_client(base_model=TINY, rank=2, seed=1, train_unembed=False)
        f1 = tc.forward_backward(batches[0], "cross_entropy")
        f2 = other.forward_backward(batches[1], "cross_entropy")
        packed = [f1.result().metrics["loss:sum"], f2.result().metrics["loss:sum"]]
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses = _steps(tc, batches * 2)
        fwd = logprobs_of(tc.forward(batches[0], "cross_entropy").result())
        path = tc.save_state("mid").result().path
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        after = _steps(resumed, batches[:2])
        sampler = resumed.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(tok.encode("the quick"))
        sample = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
            max_tokens=8, temperature=1.0, seed=11)).result()
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(tok.encode(SENTENCES[0]))).result()
        got[n] = {"packed": packed, "losses": losses, "fwd": fwd, "after": after,
                  "scored": scored[1:], "tokens": [s.tokens for s in sample.sequences]}
    for key in ("packed", "losses", "after", "scored", "fwd"):
        a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in got[n][key]])
                for n in (2, 1))
        print(f"sharded vs single process, {key}: max abs difference {np.max(np.abs(a - b)):.1e}, "
              f"relative {np.max(np.abs(a - b) / np.abs(b)):.1e}")  # docs/scale-out.md quotes these
        for a, b in zip(got[2][key], got[1][key]):
            _close(a, b)
    assert got[2]["tokens"] == got[1]["tokens"]
    assert got[1]["losses"][-1] < got[1]["losses"][0]  # it trained: the comparison means something


def test_checkpoints_move_between_group_and_single_process(tmp_path: Path) -> None:
    """Saved by one process, loaded by a 2-rank group, trained there, saved, loaded back by
    one process: the same logprobs at each hand-over (the same data dir, servers in turn)."""
    def serve(devices: int):
        return tinsmith.local(models=[TINY], data_dir=tmp_path, devices=devices)

    others = set(_ranks())  # the module's server's
    with serve(1) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
        batch = _batches(tc.get_tokenizer())[0]
        _steps(tc, [batch] * 2)
        single = logprobs_of(tc.forward(batch, "cross_entropy").result())
        first = tc.save_state("from-single").result().path
    with serve(2) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = sc.create_training_client_from_state_with_optimizer(first).result()
        for a, b in zip(logprobs_of(tc.forward(batch, "cross_entropy").result()), single):
            _close(a, b)
        _steps(tc, [batch])
        sharded = logprobs_of(tc.forward(batch, "cross_entropy").result())
        second = tc.save_state("from-group").result().path
        assert len(set(_ranks()) - others) == 2
    assert set(_ranks()) == others  # this server's ranks stopped with it
    with serve(1) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = sc.create_training_client_from_state_with_optimizer(second).result()
        for a, b in zip(logprobs_of(tc.forward(batch, "cross_entropy").result()), sharded):
            _close(a, b)
        assert not np.allclose(sharded[0], single[0], atol=1e-3)  # the group's step is in it


def test_a_dead_rank_fails_the_request_and_runs_resume_from_save_state(servers) -> None:
    sc, pause = servers.two, servers.pause
    uninterrupted = sc.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    batches = _batches(uninterrupted.get_tokenizer())
    expected = _steps(uninterrupted, batches)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    assert _steps(tc, batches[:1]) == pytest.approx(expected[:1], rel=TOL)
    path = tc.save_state("before-crash").result().path
    pause.write_text("3")
    try:
        future = tc.forward_backward(batches[1], "cross_entropy")
        victim = next(p for p in _ranks() if p.name == "tinsmith-rank-1")
        threading.Timer(1.0, victim.kill).start()  # while the ranks sit in the pass
        with pytest.raises(tinker.RequestFailedError, match="sharded engine failed: rank 1"):
            future.result()
    finally:
        pause.unlink()
    assert not _ranks()  # the whole group went down with it
    # The server answers, and the run that was lost says what to do.
    assert sc.get_server_capabilities().supported_models
    with pytest.raises(tinker.RequestFailedError, match="resume it from its last save_state"):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # The next request starts a new group; the run resumes from its checkpoint.
    started = time.monotonic()
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    assert len(_ranks()) == 2 and time.monotonic() - started < 120
    _close(_steps(resumed, batches[1:]), expected[1:])



def test_dimuon_runs_replicated_and_equal_single_process(servers) -> None:
    params = types.DimuonParams(learning_rate=5e-3, beta1=0.9, grad_clip_norm=10.0)
    got = []
    for sc in (servers.one, servers.two):
        tc = sc.create_lora_training_client(base_model=TINY, rank=2, seed=2,
                                            optimizer=types.DimuonOptimizerConfig()).result()
        losses = []
        for b in _batches(tc.get_tokenizer()):
            losses.append(tc.forward_backward(b, "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(params).result()
        path = tc.save_state("dimuon").result().path
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        batch = _batches(tc.get_tokenizer())[0]
        losses.append(resumed.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"])
        resumed.optim_step(params).result()
        losses.append(resumed.forward(batch, "cross_entropy").result().metrics["loss:sum"])
        got.append(losses)
    _close(got[1], got[0])
    assert got[0][-1] < got[0][-2] and got[0][-1] < got[0][0]  # the steps trained it
