"""Several runs' forward/backward requests in one engine pass, on the tiny test model:
each run's loss, gradients and updated weights equal what it gets alone (within 1e-5, with
the SDK's default Adam eps of 1e-12), a failing request fails alone without touching its run's
gradients, and through the SDK the worker really packs concurrent runs into shared passes.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import SENTENCES, TINY, logprobs_of, text_datum
from tinker import types
from transformers import AutoTokenizer

from tinsmith.engine.backend import TrainWork
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.training import LocalTrainer
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import AdamSpec, DatumIn, FwdBwdOut, LoraSpec, UserError

RUNS = {"a": LoraSpec(rank=2, seed=1), "b": LoraSpec(rank=8, seed=2), "c": LoraSpec(rank=4, seed=3, train_mlp=False)}


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY)


def _engine(runner: ModelRunner) -> LocalTrainer:
    tok = AutoTokenizer.from_pretrained(runner.model_dir)
    engine, _ = local_backends(runner, tok, LossRegistry.load(()))
    for name, spec in RUNS.items():
        engine.create_run(name, spec)
    return engine


def _data(run: str, step: int, salt: int = 0) -> tuple[list[DatumIn], str]:
    """Different lengths and losses per run: cross_entropy for a and c, importance_sampling for b."""
    rng = np.random.default_rng([ord(run), step, salt])
    out = []
    for _ in range({"a": 2, "b": 3, "c": 1}[run]):
        n = int(rng.integers(5, 30))
        tokens = rng.integers(3, 200, size=n)
        inputs = {"target_tokens": rng.integers(3, 200, size=n)}
        if run == "b":
            inputs |= {"logprobs": rng.normal(-5, 1, size=n).astype(np.float32),
                       "advantages": rng.normal(0, 1, size=n).astype(np.float32)}
        else:
            inputs |= {"weights": rng.random(n).astype(np.float32)}
        out.append(DatumIn(tokens, inputs))
    return out, "importance_sampling" if run == "b" else "cross_entropy"


def _work(run: str, step: int, salt: int = 0) -> TrainWork:
    data, loss = _data(run, step, salt)
    return TrainWork(run, data, loss, {})


def _params(engine: LocalTrainer, run: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine._run(run)[0].parameters()]


def test_packed_runs_equal_solo_runs(runner: ModelRunner) -> None:
    """Bitwise: a packed pass computes each request on the block it has alone (lora.py's
    separate pass, attention.py), so even Adam with eps 1e-12, which turns any rounding on a
    near-zero gradient into a step of up to lr, ends on the same weights."""
    packed, solo = _engine(runner), _engine(runner)
    adam = AdamSpec(learning_rate=1e-2)  # the SDK's defaults otherwise: eps 1e-12
    for step in range(3):
        outs = packed.forward_backward_many([_work(r, step) for r in RUNS], forward_only=False)
        for run, got in zip(RUNS, outs):
            (want,) = solo.forward_backward_many([_work(run, step)], forward_only=False)
            assert isinstance(got, FwdBwdOut) and isinstance(want, FwdBwdOut)
            assert got.metrics == want.metrics
            for g, w in zip(got.outputs, want.outputs):
                np.testing.assert_array_equal(g["logprobs"], w["logprobs"])
            for g, w in zip(packed._run(run)[0].parameters(), solo._run(run)[0].parameters()):
                assert g.grad is not None and w.grad is not None
                torch.testing.assert_close(g.grad, w.grad, rtol=0, atol=0)
        for run in RUNS:
            packed.optim_step(run, adam)
            solo.optim_step(run, adam)
            for g, w in zip(_params(packed, run), _params(solo, run)):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The runs really trained apart: their first layers' B factors differ.
    firsts = [_params(packed, r)[1] for r in ("a", "b")]
    assert firsts[0].shape != firsts[1].shape or not torch.equal(*firsts)


def test_failing_work_fails_alone_and_keeps_its_gradients(runner: ModelRunner) -> None:
    engine = _engine(runner)
    bad_data, _ = _data("b", 0)
    for d in bad_data:  # sampler logprobs far below the learner's: exp(lp - q) overflows
        d.inputs["logprobs"] = np.full_like(d.inputs["logprobs"], -1e4)
        d.inputs["advantages"] = np.ones_like(d.inputs["advantages"])
    works = [_work("a", 0), TrainWork("b", bad_data, "importance_sampling", {}),
             TrainWork("missing", _data("c", 0)[0], "cross_entropy", {}), _work("c", 0)]
    a_out, b_out, missing_out, c_out = engine.forward_backward_many(works, forward_only=False)
    assert isinstance(b_out, UserError) and "not finite" in str(b_out)
    assert isinstance(missing_out, UserError) and "missing" in str(missing_out)
    assert isinstance(a_out, FwdBwdOut) and isinstance(c_out, FwdBwdOut)
    # b's parameters took part in the shared forward, yet have no gradient at all (a zero
    # gradient would still move AdamW's moments); a and c have theirs.
    assert all(p.grad is None for p in engine._run("b")[0].parameters())
    assert all(p.grad is not None for p in engine._run("a")[0].parameters())
    solo = _engine(runner)
    (want,) = solo.forward_backward_many([_work("a", 0)], forward_only=False)
    np.testing.assert_allclose(a_out.metrics["loss:sum"], want.metrics["loss:sum"], rtol=1e-5)


def test_forward_only_pack_has_no_gradients(runner: ModelRunner) -> None:
    engine, solo = _engine(runner), _engine(runner)
    outs = engine.forward_backward_many([_work(r, 1) for r in RUNS], forward_only=True)
    for run, got in zip(RUNS, outs):
        (want,) = solo.forward_backward_many([_work(run, 1)], forward_only=True)
        np.testing.assert_allclose(got.metrics["loss:sum"], want.metrics["loss:sum"], rtol=1e-5)  # type: ignore[union-attr]
        assert all(p.grad is None for p in engine._run(run)[0].parameters())


def _pass_histogram(base_url: str) -> tuple[float, float]:
    """(sum, count) of tinsmith_pass_requests for forward_backward: requests and passes."""
    text = httpx.get(f"{base_url}/metrics").text
    got = {}
    for name in ("sum", "count"):
        m = re.search(rf'^tinsmith_pass_requests_{name}{{kind="forward_backward",model="{TINY}"}} (\S+)$', text, re.M)
        got[name] = float(m.group(1)) if m else 0.0
    return got["sum"], got["count"]


def _train(
    service_client, tokenizer, k: int, barriers: tuple[threading.Barrier, threading.Barrier] | None
) -> tuple[list[float], list[np.ndarray]]:
    batch = [text_datum(tokenizer, s) for s in SENTENCES[k:] + SENTENCES[:k]][: 1 + k % 3]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2 + k, seed=10 + k).result()
    for barrier in barriers or ():
        barrier.wait()
    futures = []
    for _ in range(3):
        futures.append(tc.forward_backward(batch, "cross_entropy"))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-2)))
    losses = [f.result().metrics["loss:sum"] for f in futures[::2]]
    return losses, logprobs_of(tc.forward(batch, "cross_entropy").result())


def test_sdk_clients_share_passes_and_match_solo(service_client, tokenizer, base_url: str) -> None:
    """Four SDK clients submit at once behind a slow job; the worker packs their requests
    into shared passes (seen in /metrics), and every run ends where it ends alone."""
    blocker = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    slow = [text_datum(tokenizer, " ".join(SENTENCES) * 3)] * 48
    before = _pass_histogram(base_url)
    ready, go = threading.Barrier(5), threading.Barrier(5)
    results: dict[int, tuple[list[float], list[np.ndarray]]] = {}

    def client(k: int) -> None:
        results[k] = _train(service_client, tokenizer, k, (ready, go))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    ready.wait()  # every client has its training run
    slow_job = blocker.forward(slow, "cross_entropy")  # the queue fills while this runs
    time.sleep(0.3)
    go.wait()
    slow_job.result()
    for t in threads:
        t.join()
    requests, passes = (x - y for x, y in zip(_pass_histogram(base_url), before))
    assert requests == 12  # 4 runs x 3 forward_backward
    assert passes < requests, "no two runs ever shared a pass"
    for k in range(4):
        losses, after = _train(service_client, tokenizer, k, None)
        np.testing.assert_allclose(results[k][0], losses, rtol=1e-5, atol=1e-6)
        for x, y in zip(results[k][1], after):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
