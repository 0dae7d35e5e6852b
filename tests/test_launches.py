"""Kernel launches of packed training passes, counted on the CPU (a small step on a GPU is
launch-bound, so these counts are what packing can gain there; bench/packing.py prints them
for real model layouts).

- a shared-GEMM pass of several runs hands each adapter a contiguous gradient that autograd
  keeps without a copy (engine/lora.py `_StackFactors`): before, every adapter's factors were
  copied once each per layer, over a third of a small packed pass's launches;
- so a packed pass of R runs launches far fewer kernels than the R passes it replaces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.device import placement
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import DatumIn, LoraSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from packing import LaunchCounter

MODEL = "synthetic/tiny-llama"
RUNS = 4


def _setup(dtype: str) -> tuple[ModelRunner, list[Adapter], list[int]]:
    runner = ModelRunner(resolve_model_dir(MODEL), MODEL, placement("cpu", dtype), exact_packing=False)
    adapters = [Adapter.create(LoraSpec(rank=8, seed=i), runner.layers) for i in range(RUNS)]
    for a in adapters:  # non-zero B, so A gets a gradient too
        for w in a.weights.values():
            w.B.data.normal_(0, 0.05)
    return runner, adapters, [runner.attach(a) for a in adapters]


def _rows(slots: list[int]) -> tuple[list[tuple[int, DatumIn]], list[int]]:
    rng = np.random.default_rng(0)
    rows, owner = [], []
    for i, s in enumerate(slots):
        for _ in range(2):
            t = rng.integers(3, 500, size=17)
            rows.append((s, DatumIn(t[:-1], {"target_tokens": t[1:]})))
            owner.append(i)
    return rows, owner


def _backward(runner: ModelRunner, rows, owner=None) -> None:
    lps = runner.target_logprobs(rows, grad=True, parts=owner)
    torch.stack([-lp.sum() for lp in lps]).sum().backward()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_pass_gradients_without_copies(dtype: str) -> None:
    runner, adapters, slots = _setup(dtype)
    rows, owner = _rows(slots)
    _backward(runner, rows, owner)
    for path in adapters[0].weights:
        for factor in ("A", "B"):
            grads = [getattr(a.weights[path], factor).grad for a in adapters]
            assert all(g is not None and g.dtype == torch.float32 and g.is_contiguous() for g in grads)
            # Views of one gradient buffer: autograd kept the stack's slices, copying none.
            assert len({g.untyped_storage().data_ptr() for g in grads}) == 1, (path, factor)
    # The values: each run's gradient equals its own pass's (float tolerance, the shared
    # GEMMs' rounding), so accumulating the views into separate runs lost nothing.
    packed = [[p.grad.clone() for p in a.parameters()] for a in adapters]
    for a, s, want in zip(adapters, slots, packed):
        for b in adapters:
            b.zero_grad()
        _backward(runner, [r for r in rows if r[0] == s])
        for p, w in zip(a.parameters(), want, strict=True):
            assert float((p.grad - w).norm()) <= (1e-4 if dtype == "float32" else 5e-2) * float(w.norm())


def test_packed_pass_launches_fewer_kernels() -> None:
    runner, adapters, slots = _setup("bfloat16")
    rows, owner = _rows(slots)

    def clear() -> None:
        for a in adapters:
            a.zero_grad()

    _backward(runner, rows, owner)  # warm-up
    clear()
    with LaunchCounter() as packed:
        _backward(runner, rows, owner)
    clear()
    with LaunchCounter() as one_by_one:
        for s in slots:
            _backward(runner, [r for r in rows if r[0] == s])
    lora_layers = len(runner.layers)
    # Copies: the two stacks' gradient layouts per layer and the model's own casts; one
    # copy per adapter per factor (the old accumulation) would add 2 * RUNS per layer.
    copies = packed.ops["copy_"] + packed.ops["clone"]
    assert copies <= 4 * lora_layers, packed.ops.most_common(8)
    # Measured 3.3x fewer for 4 runs on this model; 8 runs of the 1B layout give 7.1x.
    assert packed.total * 2.5 <= one_by_one.total, (packed.total, one_by_one.total)
