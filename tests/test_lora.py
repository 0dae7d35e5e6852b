"""Multi-LoRA at the engine level: rows of different adapter slots in one pass give what
each slot gives alone, and gradients land only in the adapter whose rows produced them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.runner import ModelRunner
from tinsmith.models import resolve_model_dir
from tinsmith.types import DatumIn, LoraSpec

TINY = "tinsmith/tiny-test"


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY)


def _adapter(runner: ModelRunner, seed: int, rank: int, **kw) -> Adapter:
    a = Adapter.create(LoraSpec(rank=rank, seed=seed, **kw), runner.layers)
    g = torch.Generator().manual_seed(seed)
    for w in a.weights.values():  # B = 0 at init; give it values so the adapter matters
        with torch.no_grad():
            w.B.copy_(torch.randn(w.B.shape, generator=g) * 0.05)
    return a


def _datum(seed: int, n: int) -> DatumIn:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 1000, size=n + 1)
    return DatumIn(ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(n, np.float32)})


def test_mixed_slots_in_one_pass_equal_separate_passes(runner: ModelRunner) -> None:
    a = _adapter(runner, 1, 4)
    b = _adapter(runner, 2, 8, train_mlp=False)  # other rank, other targets
    sa, sb = runner.attach(a), runner.attach(b)
    try:
        rows = [(sb, _datum(0, 7)), (None, _datum(1, 5)), (sa, _datum(2, 9)), (sb, _datum(3, 3)),
                (sa, _datum(4, 6))]
        mixed = runner.target_logprobs(rows, grad=False)
        for (slot, d), lp in zip(rows, mixed):
            alone = runner.target_logprobs([(slot, d)], grad=False)[0]
            torch.testing.assert_close(lp, alone, atol=1e-5, rtol=1e-5)
        base = runner.target_logprobs([(None, rows[0][1])], grad=False)[0]
        assert not torch.allclose(mixed[0], base, atol=1e-3)  # slot b really changes the output
    finally:
        runner.detach(sa)
        runner.detach(sb)


def test_gradients_land_only_in_their_own_adapter(runner: ModelRunner) -> None:
    a, b = _adapter(runner, 3, 4), _adapter(runner, 4, 4)
    sa, sb = runner.attach(a), runner.attach(b)
    try:
        rows = [(sa, _datum(5, 6)), (sb, _datum(6, 6))]
        lps = runner.target_logprobs(rows, grad=True)
        (-lps[0].sum()).backward()  # a loss on a's rows only
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
        assert all(p.grad is None or not p.grad.any() for p in b.parameters())
        # Same gradient as a pass with a's row alone.
        expected = [p.grad.clone() for p in a.parameters()]
        a.zero_grad()
        (-runner.target_logprobs([rows[0]], grad=True)[0].sum()).backward()
        for g, p in zip(expected, a.parameters()):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-3)  # batched vs alone: fp32 rounding
    finally:
        runner.detach(sa)
        runner.detach(sb)


def test_detached_slot_no_longer_applies(runner: ModelRunner) -> None:
    a = _adapter(runner, 5, 2)
    d = _datum(7, 5)
    base = runner.target_logprobs([(None, d)], grad=False)[0]
    slot = runner.attach(a)
    with_a = runner.target_logprobs([(slot, d)], grad=False)[0]
    runner.detach(slot)
    after = runner.target_logprobs([(slot, d)], grad=False)[0]
    assert not torch.allclose(with_a, base, atol=1e-4)
    torch.testing.assert_close(after, base)
