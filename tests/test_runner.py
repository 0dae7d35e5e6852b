"""The runner's sparse-gradient path: positions a loss cannot differentiate skip autograd
through the unembedding, and nothing about the result changes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.losses import BUILTIN, LossBatch
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import DatumIn, LoraSpec

MODEL = "tinsmith/tiny-test"


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(MODEL), MODEL)


def _batch(k: int = 1) -> list[DatumIn]:
    rng = np.random.default_rng(0)
    data = []
    for n in (9, 14, 5):
        toks = rng.integers(3, 49152, size=n + 1)
        shape = (n,) if k == 1 else (n, k)
        targets = rng.integers(3, 49152, size=shape) if k > 1 else toks[1:]
        w = rng.normal(size=shape).astype(np.float32)
        w[: n // 2] = 0.0  # a "prompt" with no gradient
        data.append(DatumIn(toks[:-1], {"target_tokens": targets, "weights": w}))
    return data


@pytest.mark.parametrize("k", [1, 3])
def test_sparse_gradient_path_equals_dense(runner: ModelRunner, k: int) -> None:
    adapters = [Adapter.create(LoraSpec(rank=4, seed=1), runner.layers) for _ in range(2)]
    for a in adapters:  # the same non-zero B, so every LoRA factor gets a gradient
        torch.manual_seed(0)
        for w in a.weights.values():
            torch.nn.init.normal_(w.B, std=0.02)
    slots = [runner.attach(a) for a in adapters]
    data = _batch(k)
    active = [BUILTIN["cross_entropy"].grad_positions(d.inputs) for d in data]
    assert not all(a.all() for a in active)  # the test exercises the sparse path
    results = []
    try:
        for slot, mask in ((slots[0], None), (slots[1], active)):
            lps = runner.target_logprobs([(slot, d) for d in data], grad=True, active=mask)
            inputs = [{"weights": torch.as_tensor(d.inputs["weights"])} for d in data]
            loss, _ = BUILTIN["cross_entropy"].fn(LossBatch.from_datums(lps, inputs), {})
            loss.backward()
            results.append(([lp.detach() for lp in lps], float(loss)))
    finally:
        for s in slots:
            runner.detach(s)
    (dense_lps, dense_loss), (sparse_lps, sparse_loss) = results
    assert sparse_loss == pytest.approx(dense_loss, rel=1e-6)
    for a, b in zip(dense_lps, sparse_lps):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    grads = [{p: (w.A.grad, w.B.grad) for p, w in a.weights.items()} for a in adapters]
    for path, (ga, gb) in grads[0].items():
        sa, sb = grads[1][path]
        torch.testing.assert_close(sa, ga, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(sb, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(n for n, s in BUILTIN.items() if s.grad_positions))
def test_grad_positions_cover_every_nonzero_gradient(name: str) -> None:
    """Each loss's grad_positions is a superset of where its gradient is non-zero."""
    spec = BUILTIN[name]
    rng = np.random.default_rng(1)
    n = 24
    inputs = {
        "weights": rng.normal(size=n), "ref_logprobs": -rng.random(n), "logprobs": -rng.random(n) * 2,
        "advantages": rng.normal(size=n), "sequence_ratio_mask": (rng.random(n) > 0.3) * 1.0,
        "recorded_logprobs": -rng.random(n) * 2, "recorded_mask": (rng.random(n) > 0.5) * 1.0,
    }
    for key in ("weights", "advantages", "recorded_mask"):
        inputs[key][rng.random(n) < 0.4] = 0.0
    lp = torch.tensor(-rng.random(n) * 3, dtype=torch.float64, requires_grad=True)
    both = [{k: torch.tensor(v[: n // 2]) for k, v in inputs.items()},
            {k: torch.tensor(v[n // 2 :]) for k, v in inputs.items()}]
    batch = LossBatch.from_datums([lp[: n // 2], lp[n // 2 :]], both)
    loss, _ = spec.fn(batch, {**spec.config, "kl_coeff": 0.5} if "kl_coeff" in spec.config else spec.config)
    loss.backward()
    marked = spec.grad_positions({k: v for k, v in inputs.items()})
    assert not marked.all()
    assert (lp.grad.numpy()[~marked] == 0).all()
    assert (lp.grad.numpy()[marked] != 0).any()
