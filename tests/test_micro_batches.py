"""Micro-batches: a request bigger than the pass budget is computed in pieces and gets the
result of the unsplit pass (losses, logprobs, gradients), for a loss that couples datums
across micro-batches too; the budget follows the model and the memory; and through the SDK
a huge request, split, lets a small run's requests through before it finishes.
"""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
import tinker
import torch
from conftest import TINY, text_datum
from tinker import types
from transformers import AutoConfig, AutoTokenizer

import tinsmith
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.budget import (
    activation_bytes_per_token,
    micro_batches,
    padded_tokens,
    pass_token_budget,
)
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.training import LocalTrainer
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import DatumIn, FwdBwdOut, LoraSpec


@pytest.mark.parametrize("lengths,budget", [
    ([5, 9, 3, 30, 2, 2, 2, 7], 20), ([10] * 7, 30), ([50, 1, 1], 16), ([4], 4), ([], 8),
])
def test_micro_batches_cover_rows_in_order_within_budget(lengths: list[int], budget: int) -> None:
    parts = micro_batches(lengths, budget)
    assert [i for p in parts for i in p] == list(range(len(lengths)))
    for p in parts:
        size = padded_tokens([lengths[i] for i in p])
        assert size <= budget or len(p) == 1  # only a single over-long row may exceed it
    # Greedy: the next row would not have fitted in the previous micro-batch.
    for p, q in itertools.pairwise(parts):
        assert padded_tokens([lengths[i] for i in [*p, q[0]]]) > budget


def test_pass_budget_follows_memory_and_model() -> None:
    tiny = AutoConfig.from_pretrained(resolve_model_dir(TINY))
    per_token = activation_bytes_per_token(tiny)
    # On a GPU the unembedding is chunked: its vocabulary vectors are no per-token cost.
    gpu_token = activation_bytes_per_token(tiny, chunked_vocab=True)
    assert gpu_token < per_token
    assert pass_token_budget(tiny, 4000 * gpu_token, 0.5, "cuda") == 2000
    assert pass_token_budget(tiny, 8000 * gpu_token, 0.5, "cuda") == 4000  # twice the memory
    assert pass_token_budget(tiny, 10 * gpu_token, 0.5, "cuda") == 256  # never below the floor
    assert pass_token_budget(tiny, 1500 * per_token, 0.5, "cpu") == 750
    assert pass_token_budget(tiny, 8000 * per_token, 0.5, "cpu") == 1024  # more gains no speed
    bigger = AutoConfig.from_pretrained(resolve_model_dir(TINY))
    bigger.vocab_size *= 4
    assert activation_bytes_per_token(bigger) > per_token
    with pytest.raises(ValueError):
        pass_token_budget(tiny, 10**9, 0.0)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY)


def _engine(runner: ModelRunner, spec: LoraSpec) -> LocalTrainer:
    engine, _ = local_backends(runner, AutoTokenizer.from_pretrained(runner.model_dir),
                               LossRegistry.load(()))
    engine.create_run("r", spec)
    with torch.no_grad():  # non-zero B, so every factor gets a gradient
        for p in engine._run("r")[0].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return engine


def _data(loss: str, n: int = 9) -> list[DatumIn]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n + (n % 2 if loss == "bradley_terry" else 0)):
        m = int(rng.integers(4, 25))
        inputs = {"target_tokens": rng.integers(3, 200, size=m),
                  "weights": (rng.random(m) * (rng.random(m) > 0.3)).astype(np.float32)}
        out.append(DatumIn(rng.integers(3, 200, size=m), inputs))
    return out


def _drain(gen) -> FwdBwdOut:
    steps = 0
    while True:
        try:
            next(gen)
            steps += 1
        except StopIteration as done:
            assert steps > 2, "the request was not split"
            return done.value


@pytest.mark.parametrize("loss", ["cross_entropy", "bradley_terry"])
def test_split_request_equals_unsplit_pass(runner: ModelRunner, loss: str) -> None:
    """bradley_terry couples datum pairs non-linearly; a 40-token budget cuts pairs apart."""
    spec = LoraSpec(rank=4, seed=3)
    whole, split = _engine(runner, spec), _engine(runner, spec)
    work = TrainWork("r", _data(loss), loss, {})
    (want,) = whole.forward_backward_many([work], forward_only=False)
    got = _drain(split.forward_backward_chunked(work, forward_only=False, budget=40))
    assert isinstance(want, FwdBwdOut)
    assert got.metrics.keys() == want.metrics.keys()
    for k in want.metrics:
        assert got.metrics[k] == pytest.approx(want.metrics[k], rel=1e-5, abs=1e-6)
    for g, w in zip(got.outputs, want.outputs):
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=0, atol=1e-5)
    grads = [(p.grad, q.grad) for p, q in
             zip(split._run("r")[0].parameters(), whole._run("r")[0].parameters())]
    assert all(g is not None and w is not None for g, w in grads)
    for g, w in grads:  # float32 sums in another order: equal to ~1e-7 of the gradient's size
        assert float((g - w).norm() / w.norm()) < 1e-5
    # Forward only: the same logprobs, and no gradient anywhere.
    fresh = _engine(runner, spec)
    out = _drain(fresh.forward_backward_chunked(work, forward_only=True, budget=40))
    for g, w in zip(out.outputs, want.outputs):
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=0, atol=1e-5)
    assert all(p.grad is None for p in fresh._run("r")[0].parameters())


def test_a_huge_request_lets_a_small_run_through(tmp_path) -> None:
    """With a 64-token pass budget, run A's 24-datum request is split into micro-batches;
    run B's small requests, sent while it runs, are answered before A's is, and A's loss
    equals the one a server with a budget it fits in computes."""
    texts = [f"The number {i} is written as {i * 37 % 101}." for i in range(24)]
    results: dict[str, object] = {}
    for budget in (64, 100_000):
        with tinsmith.local(models=[TINY], data_dir=tmp_path / str(budget), pass_tokens=budget) as url:
            service = tinker.ServiceClient(base_url=url, api_key="tml-local")
            a = service.create_lora_training_client(base_model=TINY, rank=4, seed=1)
            b = service.create_lora_training_client(base_model=TINY, rank=4, seed=2)
            tok = a.get_tokenizer()
            big = [text_datum(tok, t) for t in texts]
            small = [text_datum(tok, "A short one.")]
            b.forward_backward(small, "cross_entropy").result()  # warm
            done: dict[str, float] = {}
            fut = a.forward_backward(big, "cross_entropy")
            t = threading.Thread(target=lambda f=fut, d=done: (f.result(), d.setdefault("a", time.monotonic())))
            t.start()
            for _ in range(3):
                b.forward_backward(small, "cross_entropy").result()
            done.setdefault("b", time.monotonic())
            t.join()
            out = fut.result()
            if budget == 64:
                assert done["b"] < done["a"], "the small run waited for the huge request"
            results[str(budget)] = out.metrics["loss:sum"]
            a.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            results[f"{budget}/next"] = a.forward_backward(big, "cross_entropy").result().metrics["loss:sum"]
    assert results["64"] == pytest.approx(results["100000"], rel=1e-5)
    assert results["64/next"] == pytest.approx(results["100000/next"], rel=1e-5)
    assert results["64/next"] < results["64"]
