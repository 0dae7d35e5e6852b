"""The GPU engine's code paths, run on the CPU with tiny shapes (and on a GPU when
TINSMITH_TEST_DEVICE=cuda): the precision policy in bfloat16, packed passes that share the base
GEMMs against each run alone, the chunked unembedding against the whole one, and idle runs
moved to host memory and back bit-exactly.

Tolerances (measured on the tiny model, stated here and asserted):
- shared-GEMM packing vs solo, float32: losses within 1e-5 relative, gradients within 1e-4
  of their norm (the base GEMMs' rounding depends on the rows beside a row);
- the same in bfloat16: losses within 2e-2 relative, gradients within 5e-2 of their norm
  (bfloat16 keeps 8 bits of mantissa; activations round at every layer);
- chunked vs whole unembedding, float32: logprobs within 1e-5, gradients within 1e-5 of
  their norm.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.device import Placement, placement
from tinsmith.engine.lora import MultiLoraLinear
from tinsmith.engine.pool import RunPool
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import AdamSpec, DatumIn, LoraSpec

MODEL = "tinsmith/tiny-test"
DEVICE = os.environ.get("TINSMITH_TEST_DEVICE", "cpu")
# rank 2 and rank 8 exercise the zero-padded ranks; c trains attention only, so the MLP
# layers see a group without an adapter.
RUNS = {"a": LoraSpec(rank=2, seed=1), "b": LoraSpec(rank=8, seed=2),
        "c": LoraSpec(rank=4, seed=3, train_mlp=False)}
TOL = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 5e-2)}  # (loss rel, grad rel to norm)


def _runner(dtype: str, exact: bool) -> ModelRunner:
    return ModelRunner(resolve_model_dir(MODEL), MODEL, placement(DEVICE, dtype), exact_packing=exact)


def _data(run: str, rows: int, salt: int = 0) -> list[DatumIn]:
    rng = np.random.default_rng([ord(run), salt])
    out = []
    for _ in range(rows):
        n = int(rng.integers(6, 24))
        toks = rng.integers(3, 49152, size=n + 1)
        out.append(DatumIn(toks[:-1], {"target_tokens": toks[1:],
                                       "weights": rng.random(n).astype(np.float32)}))
    return out


def _loss(lps: list[torch.Tensor], data: list[DatumIn]) -> torch.Tensor:
    return sum((-(lp * torch.as_tensor(d.inputs["weights"], device=lp.device)).sum()
                for lp, d in zip(lps, data)), torch.zeros((), device=lps[0].device))


def _adapters(runner: ModelRunner) -> dict[str, tuple[Adapter, int]]:
    out = {}
    for name, spec in RUNS.items():
        a = Adapter.create(spec, runner.layers)
        for w in a.weights.values():  # non-zero B, so every factor gets a gradient
            w.B.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(spec.seed or 0))
        out[name] = (a, runner.attach(a))
    return out


def _grads(adapter: Adapter) -> list[torch.Tensor]:
    return [p.grad.detach().cpu().clone() for p in adapter.parameters()]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| relative to |want| (Frobenius norms)."""
    return float((got - want).norm()) / max(float(want.norm()), 1e-6)


def _close(got: list[torch.Tensor], want: list[torch.Tensor], rel: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) <= rel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_precision_policy(dtype: str) -> None:
    """Base in the chosen dtype; factors, gradients, Adam moments and logprobs in float32."""
    runner = _runner(dtype, exact=False)
    assert {p.dtype for p in runner.model.parameters()} == {getattr(torch, dtype)}
    adapter, slot = _adapters(runner)["a"]
    data = _data("a", 2)
    lps = runner.target_logprobs([(slot, d) for d in data], grad=True)
    assert all(lp.dtype == torch.float32 and lp.device.type == runner.device.type for lp in lps)
    _loss(lps, data).backward()
    adapter.optim_step(AdamSpec(learning_rate=1e-3))
    for p in adapter.parameters():
        assert p.dtype == torch.float32 and p.device.type == runner.device.type
        st = adapter.optimizer.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [(2, 2, 2), (1, 3, 2)], ids=["equal-batched", "unequal-loop"])
def test_shared_packing_matches_solo(dtype: str, rows: tuple[int, ...], monkeypatch) -> None:
    runner = _runner(dtype, exact=False)
    adapters = _adapters(runner)
    data = {name: _data(name, n) for name, n in zip(RUNS, rows)}
    solo = {}
    for name, (adapter, slot) in adapters.items():
        lps = runner.target_logprobs([(slot, d) for d in data[name]], grad=True)
        loss = _loss(lps, data[name])
        loss.backward()
        solo[name] = (float(loss), _grads(adapter))
        adapter.zero_grad()
    calls = []
    original = MultiLoraLinear._batched_delta
    monkeypatch.setattr(MultiLoraLinear, "_batched_delta",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    rows_in, owner = [], []
    for i, name in enumerate(RUNS):
        rows_in += [(adapters[name][1], d) for d in data[name]]
        owner += [i] * len(data[name])
    lps = runner.target_logprobs(rows_in, grad=True, parts=owner)
    losses, start = {}, 0
    for name in RUNS:
        n = len(data[name])
        losses[name] = _loss(lps[start : start + n], data[name])
        start += n
    torch.autograd.backward(list(losses.values()))
    assert bool(calls) == (len(set(rows)) == 1)  # equal groups take the batched delta
    loss_tol, grad_tol = TOL[dtype]
    for name, (adapter, _) in adapters.items():
        want_loss, want_grads = solo[name]
        loss_err = abs(float(losses[name]) - want_loss) / abs(want_loss)
        grad_err = max(_rel(g, w) for g, w in zip(_grads(adapter), want_grads, strict=True))
        # The measured errors the docs quote (`pytest -s tests/test_device_paths.py -k shared`).
        print(f"{dtype} {rows} run {name}: loss rel {loss_err:.1e}, grads rel {grad_err:.1e}")
        assert loss_err <= loss_tol
        assert grad_err <= grad_tol


def test_chunked_unembedding_equals_whole(monkeypatch) -> None:
    runner = _runner("float32", exact=False)
    adapter, slot = _adapters(runner)["b"]
    data = _data("b", 3)

    def run(chunk: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        runner.logit_chunk = chunk
        calls = []
        original = ModelRunner._head_chunk
        monkeypatch.setattr(ModelRunner, "_head_chunk",
                            lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        lps = runner.target_logprobs([(slot, d) for d in data], grad=True)
        _loss(lps, data).backward()
        grads = _grads(adapter)
        adapter.zero_grad()
        monkeypatch.undo()
        return [lp.detach().cpu() for lp in lps], grads, len(calls)

    whole, whole_grads, n_whole = run(1 << 20)
    chunked, chunked_grads, n_chunked = run(5)
    assert n_whole == 1 and n_chunked > 2 * sum(len(d.tokens) for d in data) // 5  # + recomputes
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    _close(chunked_grads, whole_grads, 1e-5)


def test_host_tier_is_bit_exact() -> None:
    """Three runs, one resident, one in host memory, one on disk, trained in turn with
    gradients pending across moves: weights and Adam moments equal a pool that keeps all."""
    runner = ModelRunner(resolve_model_dir(MODEL), MODEL, Placement(torch.device(DEVICE), torch.float32))

    def train(pool: RunPool) -> dict[str, list[torch.Tensor]]:
        for name, spec in RUNS.items():
            pool.put(name, Adapter.create(spec, runner.layers))
        for step in range(2):
            for name in RUNS:
                adapter, slot = pool.get(name)
                data = _data(name, 2, salt=step)
                _loss(runner.target_logprobs([(slot, d) for d in data], grad=True), data).backward()
            for name in RUNS:
                adapter, _ = pool.get(name)
                adapter.optim_step(AdamSpec(learning_rate=1e-2, eps=1e-12))
        out = {}
        for name in RUNS:
            adapter, _ = pool.get(name)
            out[name] = [p.detach().cpu().clone() for p in adapter.parameters()]
            out[name] += [v.detach().cpu().clone() for p in adapter.parameters()
                          for k, v in adapter.optimizer.state[p].items() if k != "step"]
        pool.clear()
        return out

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tight = RunPool(runner, Path(tmp) / "a", max_resident=1, max_host=1)
        got = train(tight)
        assert tight.spills > 0 and tight.restores > 0
        want = train(RunPool(runner, Path(tmp) / "b", max_resident=10, max_host=0))
    for name in RUNS:
        for g, w in zip(got[name], want[name], strict=True):
            assert torch.equal(g, w)
