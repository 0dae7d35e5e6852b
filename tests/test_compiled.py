"""Compiled training passes (engine/compiled.py, `--compile-passes`), on the CPU through
torch.compile's `aot_eager` backend: the same tracing, guards and AOTAutograd backward as on
a GPU, without code generation (inductor's kernels are checked on a GPU, tests/test_gpu.py).

- a compiled shared pass gives the eager shared pass's logprobs and gradients (float32:
  logprobs equal, gradients within 1e-5 of their norm), with ranks 8 and 4, a LoRA scale
  other than 1, and a run that adapts attention only; in bfloat16 within 5e-2, nearer the
  eager pass than that is to float32;
- the decoder layers share one compiled forward, and new mixes and orders of runs reuse it:
  nothing about a pass's adapters is in its guards; new shapes recompile once (symbolic
  sizes), then reuse that;
- the first layer of a training pass runs eagerly (a forward-only pass compiles all);
- a pass of unequal groups runs eagerly; a compilation error disables compiled passes and the
  pass still completes eagerly, with the same result.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.device import placement
from tinsmith.engine.runner import ModelRunner
from tinsmith.types import DatumIn, LoraSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from packing import thin_folder

# Llama-3.2-1B's 16 decoder layers at hidden 64: one compiled forward must serve all 16.
MODEL = "synthetic/llama-3.2-1b"
SPECS = [LoraSpec(rank=8, seed=1), LoraSpec(rank=4, seed=2, alpha=8.0),
         LoraSpec(rank=8, seed=3, train_mlp=False)]


_FOLDER = tempfile.TemporaryDirectory()


def _runner(compile_passes=None, device: str = "cpu", dtype: str = "float32",
            ) -> tuple[ModelRunner, list[Adapter], list[int]]:
    folder = Path(_FOLDER.name)
    if not (folder / "config.json").is_file():
        thin_folder(MODEL, folder)
    runner = ModelRunner(folder, MODEL, placement(device, dtype), exact_packing=False,
                         compile_passes=compile_passes)
    adapters = [Adapter.create(s, runner.layers) for s in SPECS]
    for a in adapters:  # non-zero B, seeded the same in every runner
        for p in a.parameters():
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return runner, adapters, [runner.attach(a) for a in adapters]


def _pass(runner: ModelRunner, adapters: list[Adapter], slots: list[int], pick: list[int],
          rows: list[int], length: int, salt: int, grad: bool = True,
          ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """One shared pass of the picked runs (`rows[k]` datums each); logprobs and gradients
    (none for a forward-only pass, `grad` False)."""
    rng = np.random.default_rng(salt)
    batch, owner = [], []
    for k, i in enumerate(pick):
        for _ in range(rows[k]):
            t = rng.integers(3, 500, size=length + 1)
            batch.append((slots[i], DatumIn(t[:-1], {"target_tokens": t[1:]})))
            owner.append(k)
    for a in adapters:
        a.zero_grad()
    lps = runner.target_logprobs(batch, grad=grad, parts=owner)
    if not grad:
        return [lp.clone() for lp in lps], []
    torch.stack([-lp.sum() for lp in lps]).sum().backward()
    grads = [[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in adapters[i].parameters()]
             for i in pick]
    return [lp.detach().clone() for lp in lps], grads


# (runs picked, rows per run, tokens per row): the first pass compiles; the others are new
# mixes and orders of runs at its shapes.
PASSES = [([0, 1, 2], [2, 2, 2], 20), ([2, 0, 1], [2, 2, 2], 20), ([1, 2, 0], [2, 2, 2], 20),
          ([1, 0, 2], [2, 2, 2], 20)]


def _close(got, want, lp_atol: float = 1e-6, grad_rel: float = 1e-5, per_factor: bool = True) -> None:
    """Logprobs within `lp_atol`; gradients within `grad_rel` of their norm, each factor's
    (`per_factor`) or all of them as one vector (bfloat16, where a small factor's gradient
    is mostly rounding: 16 layers at hidden 64 put single factors 10-17% off float32 even
    eagerly, and all of them together 3%)."""
    g_lps, g_grads = got
    w_lps, w_grads = want
    for a, b in zip(g_lps, w_lps, strict=True):
        assert float((a - b).abs().max()) <= lp_atol
    if not per_factor:
        assert _grad_rel(got, want) <= grad_rel
        return
    for ga, wa in zip(g_grads, w_grads, strict=True):
        for a, b in zip(ga, wa, strict=True):
            assert float((a - b).norm()) <= grad_rel * max(float(b.norm()), 1e-9)


def _grad_rel(got, want) -> float:
    """|got - want| / |want| over all the gradients of `_pass` results as one vector."""
    def flat(result) -> torch.Tensor:
        return torch.cat([g.float().flatten().cpu() for grads in result[1] for g in grads])

    return float((flat(got) - flat(want)).norm() / flat(want).norm())


@pytest.fixture(scope="module")
def runners():
    torch._dynamo.reset()
    return _runner(), _runner("aot_eager")


def test_compiled_pass_equals_eager_and_reuses_one_compilation(runners) -> None:
    (eager, ea, es), (comp, ca, cs) = runners
    graphs = [counters["stats"]["unique_graphs"]]
    for k, (pick, rows, length) in enumerate(PASSES):
        want = _pass(eager, ea, es, pick, rows, length, k)
        got = _pass(comp, ca, cs, pick, rows, length, k)
        _close(got, want)
        graphs.append(counters["stats"]["unique_graphs"])
    assert comp.compiled is not None and comp.compiled.enabled
    # Compiled at the first pass only: one forward for the 15 layers after the first (whose
    # input needs no gradient, so it runs eagerly), reused by every later mix of runs.
    assert graphs[1] - graphs[0] == 1 and graphs[-1] == graphs[1], graphs


@contextmanager
def _compiled_calls(runner: ModelRunner) -> Iterator[list[int]]:
    """Within: the list of the calls to the runner's compiled layer forward."""
    calls: list[int] = []
    compiled_forward = runner.compiled._compiled
    runner.compiled._compiled = lambda *a, **k: calls.append(1) or compiled_forward(*a, **k)
    try:
        yield calls
    finally:
        runner.compiled._compiled = compiled_forward


def test_training_compiles_all_but_the_first_layer_forward_only_all(runners) -> None:
    """A training pass runs every layer compiled but the first (its input needs no gradient:
    compiled, it would be a second variant, traced apart); a forward-only pass runs all of
    them compiled (one inference variant), with the eager pass's logprobs."""
    (eager, ea, es), (comp, ca, cs) = runners
    layers = len(comp.compiled.layers)
    with _compiled_calls(comp) as calls:
        _pass(comp, ca, cs, *PASSES[0], 0)
    assert len(calls) == layers - 1
    with _compiled_calls(comp) as calls:
        got = _pass(comp, ca, cs, *PASSES[0], 5, grad=False)
    assert len(calls) == layers and comp.compiled.enabled
    _close(got, _pass(eager, ea, es, *PASSES[0], 5, grad=False))


def test_new_shapes_recompile_once(runners) -> None:
    """After the first pass's exact-shape compilation, a pass that changes every size (groups,
    rows, length, rank) recompiles once with them symbolic; later shapes reuse that. Tracing
    with symbolic sizes takes about a minute on a 2-core CPU."""
    (eager, ea, es), (comp, ca, cs) = runners
    _pass(comp, ca, cs, *PASSES[0], 0)  # the exact-shape compilation (if not already made)
    # Each pass keeps a rank-8 run in every layer but the first new one (MLP rank 4): a rank
    # of 1 (a layer no run adapts) would be a variant of its own.
    shapes = [([1, 2], [4, 4], 29), ([0, 1, 2], [3, 3, 3], 23), ([2, 0], [5, 5], 41)]
    graphs = [counters["stats"]["unique_graphs"]]
    for k, (pick, rows, length) in enumerate(shapes):
        _close(_pass(comp, ca, cs, pick, rows, length, 10 + k), _pass(eager, ea, es, pick, rows, length, 10 + k))
        graphs.append(counters["stats"]["unique_graphs"])
    assert comp.compiled.enabled
    assert graphs[1] - graphs[0] == 1 and graphs[-1] == graphs[1], graphs


def test_compiled_bfloat16_near_eager(runners) -> None:
    """In bfloat16 a compiled pass rounds differently from the eager one (its backward is
    AOTAutograd's); as one vector its gradients stay closer to the eager pass's than the eager
    pass is to float32. `pytest -s -k bfloat16` prints both (measured: 1.7% and 3.1%)."""
    (f32, fa, fs), _ = runners
    # Compiled afresh at this pass's exact shapes: after test_new_shapes_recompile_once the
    # layer's code is marked dynamic, and a new dtype would be traced symbolically (minutes).
    torch._dynamo.reset()
    eager, ea, es = _runner(None, dtype="bfloat16")
    comp, ca, cs = _runner("aot_eager", dtype="bfloat16")
    want = _pass(eager, ea, es, *PASSES[0], 0)
    got = _pass(comp, ca, cs, *PASSES[0], 0)
    ref = _pass(f32, fa, fs, *PASSES[0], 0)
    print(f"bfloat16 gradients, relative as one vector: compiled vs eager {_grad_rel(got, want):.3f}, "
          f"eager vs float32 {_grad_rel(want, ref):.3f}")
    _close(got, want, lp_atol=5e-2, grad_rel=5e-2, per_factor=False)
    assert _grad_rel(got, want) <= _grad_rel(want, ref)


def test_unequal_groups_run_eagerly(runners) -> None:
    (eager, ea, es), (comp, ca, cs) = runners
    _pass(comp, ca, cs, *PASSES[0], 0)  # compiled already (or now)
    before = counters["stats"]["calls_captured"]
    with _compiled_calls(comp) as calls:
        got = _pass(comp, ca, cs, [0, 1], [1, 3], 20, 7)
    _close(got, _pass(eager, ea, es, [0, 1], [1, 3], 20, 7))
    assert not calls and counters["stats"]["calls_captured"] == before


def test_compile_error_disables_and_the_pass_completes() -> None:
    def failing(gm, example_inputs):
        raise RuntimeError("backend refused")

    torch._dynamo.reset()  # else traced symbolically first (minutes), as after new shapes
    eager, ea, es = _runner()
    comp, ca, cs = _runner(failing)
    got = _pass(comp, ca, cs, [0, 1], [2, 2], 13, 3)
    assert comp.compiled is not None and not comp.compiled.enabled
    _close(got, _pass(eager, ea, es, [0, 1], [2, 2], 13, 3))


def _sdk_losses(**settings) -> list[float]:
    """Three forward_backward + optim_step steps of one run through the official SDK against
    `tinsmith.local` on the tiny Llama with shared packing (and `settings`)."""
    import tinker
    from tinker import types

    import tinsmith

    rng = np.random.default_rng(5)
    data = []
    for _ in range(2):
        ids = rng.integers(3, 500, size=25).tolist()
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * 24}))
    with tinsmith.local(models=["synthetic/tiny-llama"], exact_packing=False, **settings) as url:
        sc = tinker.ServiceClient(base_url=url, api_key="tml-test")
        tc = sc.create_lora_training_client(base_model="synthetic/tiny-llama", rank=8, seed=3).result()
        losses = []
        for _ in range(3):
            losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return losses


def test_serve_compile_passes_through_the_sdk() -> None:
    """`compile_passes` (`tinsmith serve --compile-passes`) reaches the engine: the server's
    passes compile (inductor, in this process), and a run trains to the same losses as on a
    server without it (float32, 1e-5 relative)."""
    before = counters["stats"]["unique_graphs"]
    compiled = _sdk_losses(compile_passes=True)
    assert counters["stats"]["unique_graphs"] > before
    eager = _sdk_losses()
    assert compiled[-1] < compiled[0]
    for a, b in zip(compiled, eager, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (compiled, eager)
