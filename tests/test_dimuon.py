"""The Dimuon optimizer (docs/optimizers.md): its update against a NumPy reference of the
documented formula, its state in checkpoints and spills, and the optimizer family of a run
through the official SDK against a real server.

Tolerance stated: the float32 update against the float64 reference within 2e-6 absolute on
parameters of magnitude ~1 (updates are ~1e-2); resuming from a checkpoint with its optimizer
is bitwise the run that never stopped (same code, same float32 state).
Engine tests honour TINSMITH_TEST_DEVICE (e.g. cuda), as tests/test_device_paths.py does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import tinker
import torch
from conftest import SENTENCES, TINY, logprobs_of, text_datum
from tinker import types
from tinker.types.optimizer import OptimizerConfigBase
from transformers import AutoTokenizer

from tinsmith.config import ServerSettings
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.checkpoint import (
    OPTIMIZER_FILE,
    TINSMITH_FILE,
    adapter_from_files,
    adapter_to_files,
    optimizer_state_dict,
)
from tinsmith.engine.device import placement
from tinsmith.engine.local import local_backends
from tinsmith.engine.lora import LoraWeights
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.storage.db import MetadataStore
from tinsmith.types import ADAMW, DIMUON, AdamSpec, DatumIn, DimuonSpec, FwdBwdOut, LoraSpec

DEVICE = os.environ.get("TINSMITH_TEST_DEVICE", "cpu")


# ----- the formula, in NumPy (float64), written from docs/optimizers.md -----------------
def ref_newton_schulz(u: np.ndarray) -> np.ndarray:
    x = u.astype(np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        s = x @ x.T
        x = 3.4445 * x + (-4.7750 * s + 2.0315 * (s @ s)) @ x
    return x.T if tall else x


def ref_steps(params: list[np.ndarray], grads: list[list[np.ndarray]], lr: float, beta1: float,
              clip: float, nesterov: bool = True) -> list[list[np.ndarray]]:
    """Params after each step; `grads[t][i]` is parameter i's gradient at step t."""
    p = [x.astype(np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    out = []
    for gs in grads:
        gs = [g.astype(np.float64) for g in gs]
        norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
        if clip > 0 and norm > clip:
            gs = [g * (clip / (norm + 1e-6)) for g in gs]
        for i, g in enumerate(gs):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            u = beta1 * m[i] + (1 - beta1) * g if nesterov else m[i]
            p[i] = p[i] - lr * 0.2 * math.sqrt(max(g.shape)) * ref_newton_schulz(u)
        out.append([x.copy() for x in p])
    return out


# (rank, in, out) per layer: rows < cols and rows > cols for each factor, rank 1, square.
LAYERS = [(4, 16, 24), (1, 16, 24), (8, 5, 3), (6, 6, 6), (4, 16, 24)]


def _adapter(device: str = "cpu") -> tuple[Adapter, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    weights, init = {}, []
    for i, (r, n_in, n_out) in enumerate(LAYERS):
        a = rng.normal(size=(r, n_in)).astype(np.float32)
        b = rng.normal(size=(n_out, r)).astype(np.float32)
        init += [a, b]
        weights[f"layers.{i}.proj"] = LoraWeights(torch.tensor(a, device=device).requires_grad_(),
                                                  torch.tensor(b, device=device).requires_grad_(), 1.0)
    return Adapter(LoraSpec(rank=4), weights, DIMUON), init


@pytest.mark.parametrize(("beta1", "clip"), [(0.9, 0.0), (0.0, 0.0), (0.5, 3.0), (0.95, -1.0)])
def test_update_matches_numpy_reference(beta1: float, clip: float) -> None:
    adapter, init = _adapter()
    rng = np.random.default_rng(1)
    lr, steps = 0.05, 4
    grads = [[rng.normal(size=x.shape).astype(np.float32) for x in init] for _ in range(steps)]
    want = ref_steps(init, grads, lr, beta1, clip)
    for t in range(steps):
        for p, g in zip(adapter.parameters(), grads[t], strict=True):
            p.grad = torch.tensor(g)
        metrics = adapter.optim_step(DimuonSpec(learning_rate=lr, grad_clip_norm=clip, beta1=beta1))
        norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads[t]))
        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)
        for p, w in zip(adapter.parameters(), want[t], strict=True):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=0, atol=2e-6)
    assert all(p.grad is None for p in adapter.parameters())
    if clip > 0:  # the clipping was live: every step's norm is above it
        assert min(math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in gs))
                   for gs in grads) > clip
    # The reference tells the formula's variants apart far beyond that tolerance.
    if beta1 > 0:
        plain = ref_steps(init, grads, lr, beta1, clip, nesterov=False)[-1]
        assert max(float(np.abs(a - b).max()) for a, b in zip(plain, want[-1])) > 1e-3


def test_expert_factors_are_orthogonalised_per_expert() -> None:
    """A mixture-of-experts factor [E, r, in] / [E, out, r] is E matrices, each updated as the
    reference updates a lone matrix."""
    from tinsmith.engine.dimuon import Dimuon

    rng = np.random.default_rng(3)
    init = [rng.normal(size=shape).astype(np.float32) for shape in [(3, 4, 10), (3, 12, 4)]]
    params = [torch.tensor(x).requires_grad_() for x in init]
    opt = Dimuon(params, lr=0.05, beta1=0.8)
    grads = [[rng.normal(size=x.shape).astype(np.float32) for x in init] for _ in range(3)]
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.tensor(g)
        opt.step()
    for i, p in enumerate(params):
        for e in range(3):
            (want,) = ref_steps([init[i][e]], [[gs[i][e]] for gs in grads], 0.05, 0.8, 0.0)[-1]
            np.testing.assert_allclose(p.detach()[e].numpy(), want, rtol=0, atol=2e-6)


def test_newton_schulz_orthogonalises() -> None:
    """The reference itself: NS5 keeps U's singular vectors and pushes its singular values
    into Muon's band (about 0.68-1.13 for Keller Jordan's coefficients)."""
    rng = np.random.default_rng(2)
    for shape in [(4, 16), (24, 4), (1, 9), (9, 1), (6, 6)]:
        u = rng.normal(size=shape) * rng.uniform(0.01, 100)
        o = ref_newton_schulz(u)
        left, _, right = np.linalg.svd(u, full_matrices=False)
        inner = left.T @ o @ right.T  # diagonal if the singular vectors are kept
        assert np.abs(inner - np.diag(np.diag(inner))).max() < 1e-8
        assert 0.6 < np.diag(inner).min() and np.diag(inner).max() < 1.2, np.diag(inner)


def test_update_rms_is_shape_independent() -> None:
    """The RMS-matching scale: a full-rank gradient's update has RMS ~0.2 * lr for any shape."""
    for r, n in [(4, 64), (64, 4), (1, 100), (16, 16)]:
        p = torch.zeros(r, n, requires_grad=True)
        a = Adapter(LoraSpec(rank=r), {"x": LoraWeights(p, torch.zeros(1, r, requires_grad=True), 1.0)},
                    DIMUON)
        p.grad = torch.randn(r, n, generator=torch.Generator().manual_seed(r * n))
        a.optim_step(DimuonSpec(learning_rate=1.0, beta1=0.0))
        rms = float(p.detach().pow(2).mean().sqrt())
        assert 0.13 < rms < 0.23, (r, n, rms)


def test_zero_and_missing_gradients() -> None:
    """B = 0 at initialisation makes A's gradient exactly zero: A stays put, nothing is NaN.
    A factor without a gradient is left alone, momentum and step count included."""
    adapter, _ = _adapter()
    params = adapter.parameters()
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if i == 0 else (None if i == 1 else torch.ones_like(p))
    adapter.optim_step(DimuonSpec(learning_rate=0.1))
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[2], before[2])
    assert adapter.optimizer_state(params[1]) == {}
    assert float(adapter.optimizer_state(params[0])["step"]) == 1.0


def test_other_family_params_are_refused() -> None:
    adapter, _ = _adapter()
    with pytest.raises(ValueError, match="optimizer is dimuon.*AdamSpec"):
        adapter.optim_step(AdamSpec(learning_rate=1e-3))
    adam = Adapter(LoraSpec(rank=4), _adapter()[0].weights, ADAMW)
    with pytest.raises(ValueError, match="optimizer is adamw.*DimuonSpec"):
        adam.optim_step(DimuonSpec(learning_rate=1e-3))


# ----- on the tiny model: checkpoints, spills, host copies, bfloat16 ---------------------
@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY, placement(DEVICE, "float32"))


def _datum(seed: int, n: int = 12) -> DatumIn:
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, 49152, size=n + 1).astype(np.int64)
    return DatumIn(toks[:-1], {"target_tokens": toks[1:]})


STEP = DimuonSpec(learning_rate=2e-2, grad_clip_norm=5.0, beta1=0.9)


def _train(runner: ModelRunner, adapter: Adapter, steps: int, salt: int = 0) -> list[float]:
    slot = runner.attach(adapter)
    losses = []
    try:
        for i in range(steps):
            lps = runner.target_logprobs([(slot, _datum(salt + i)), (slot, _datum(100))], grad=True)
            loss = -sum(lp.sum() for lp in lps)
            loss.backward()
            losses.append(float(loss.detach()))
            adapter.optim_step(STEP)
    finally:
        runner.detach(slot)
    return losses


def _snapshot(adapter: Adapter) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in adapter.parameters()] + [
        v.clone() for v in optimizer_state_dict(adapter).values()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_checkpoint_round_trip_continues_bitwise(runner: ModelRunner) -> None:
    a = Adapter.create(LoraSpec(rank=4, seed=3), runner.layers, DIMUON)
    _train(runner, a, 3)
    files = adapter_to_files(a, TINY, include_optimizer=True)
    info = json.loads(files[TINSMITH_FILE])
    assert info["optimizer"] == {"type": "dimuon", "version": 1} and info["num_steps"] == 3
    state = safetensors.torch.load(files[OPTIMIZER_FILE])
    assert {k.rsplit(".", 1)[1] for k in state} == {"momentum", "step"}
    assert len(state) == 2 * 2 * len(a.weights)
    assert all(float(v) == 3.0 for k, v in state.items() if k.endswith(".step"))

    b = adapter_from_files(files, runner.layers, load_optimizer=True)  # family from the files
    weights_only = adapter_from_files(files, runner.layers, load_optimizer=False, optimizer=DIMUON)
    assert b.optimizer_config == DIMUON and _equal(_snapshot(a), _snapshot(b))
    for x in (a, b, weights_only):
        _train(runner, x, 2, salt=10)
    assert _equal(_snapshot(a), _snapshot(b))
    assert not _equal(_snapshot(a)[:4], _snapshot(weights_only)[:4])  # the momentum mattered


def test_other_family_state_is_refused(runner: ModelRunner) -> None:
    d = Adapter.create(LoraSpec(rank=2, seed=1), runner.layers, DIMUON)
    w = Adapter.create(LoraSpec(rank=2, seed=1), runner.layers)
    _train(runner, d, 1)
    w_step = AdamSpec(learning_rate=1e-3)
    slot = runner.attach(w)
    (-runner.target_logprobs([(slot, _datum(0))], grad=True)[0].sum()).backward()
    runner.detach(slot)
    w.optim_step(w_step)
    d_files = adapter_to_files(d, TINY, include_optimizer=True)
    w_files = adapter_to_files(w, TINY, include_optimizer=True)
    assert json.loads(w_files[TINSMITH_FILE])["optimizer"] == {"type": "adamw"}
    assert {k.rsplit(".", 1)[1] for k in safetensors.torch.load(w_files[OPTIMIZER_FILE])} == {
        "exp_avg", "exp_avg_sq", "step"}  # AdamW's format as before
    with pytest.raises(ValueError, match="holds dimuon optimizer state.*adamw"):
        adapter_from_files(d_files, runner.layers, load_optimizer=True, optimizer=ADAMW)
    with pytest.raises(ValueError, match="holds adamw optimizer state.*dimuon"):
        adapter_from_files(w_files, runner.layers, load_optimizer=True, optimizer=DIMUON)
    # Weights only into the other family: fine, a fresh optimizer of that family.
    x = adapter_from_files(d_files, runner.layers, load_optimizer=False, optimizer=ADAMW)
    assert x.optimizer_config == ADAMW and x.optimizer is None
    # A Dimuon checkpoint whose state names AdamW's buffers does not load.
    bad = dict(d_files, **{OPTIMIZER_FILE: w_files[OPTIMIZER_FILE]})
    with pytest.raises(ValueError, match="unexpected tensor"):
        adapter_from_files(bad, runner.layers, load_optimizer=True)


def test_host_copy_is_bit_exact(runner: ModelRunner) -> None:
    a = Adapter.create(LoraSpec(rank=4, seed=2), runner.layers, DIMUON)
    _train(runner, a, 2)
    slot = runner.attach(a)
    (-runner.target_logprobs([(slot, _datum(5))], grad=True)[0].sum()).backward()  # pending grads
    runner.detach(slot)
    host = a.to_device(torch.device("cpu"))
    back = host.to_device(runner.device)
    assert back.optimizer_config == DIMUON and _equal(_snapshot(a), _snapshot(back))
    for x in (a, back):
        x.optim_step(STEP)
        _train(runner, x, 1, salt=20)
    assert _equal(_snapshot(a), _snapshot(back))


def test_spilled_dimuon_runs_compute_what_resident_runs_compute(runner: ModelRunner,
                                                                tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(runner.model_dir)
    engines = []
    for name, resident in (("tight", 1), ("roomy", 9)):
        engine, _ = local_backends(runner, tok, LossRegistry.load(()), spill_dir=tmp_path / name,
                                   max_resident_runs=resident)
        for run, seed in (("x", 1), ("y", 2)):
            engine.create_run(run, LoraSpec(rank=4, seed=seed), DIMUON)
        engines.append(engine)
    losses: dict[int, list[float]] = {0: [], 1: []}
    for step in range(3):
        for k, engine in enumerate(engines):
            for run in ("x", "y"):  # both runs' gradients pending: one of them on disk
                d = _datum(step * 7 + ord(run))
                d = DatumIn(d.tokens, {**d.inputs, "weights": np.ones(len(d.tokens), np.float32)})
                work = TrainWork(run, [d], "cross_entropy", {})
                (out,) = engine.forward_backward_many([work], forward_only=False)
                assert isinstance(out, FwdBwdOut)
                losses[k].append(out.metrics["loss:sum"])
            for run in ("x", "y"):
                engine.optim_step(run, STEP)
    assert losses[0] == losses[1]
    assert engines[0].runs.spills >= 4 and engines[1].runs.spills == 0
    for run in ("x", "y"):
        got, want = (_snapshot(e._run(run)[0]) for e in engines)
        assert len(got) > 2 * len(engines[1]._run(run)[0].weights) and _equal(got, want)
        assert engines[0]._run(run)[0].optimizer_config == DIMUON
    for engine in engines:
        for run in ("x", "y"):
            engine.drop_run(run)


def test_bfloat16_base_trains_with_float32_state() -> None:
    runner = ModelRunner(resolve_model_dir(TINY), TINY, placement(DEVICE, "bfloat16"))
    a = Adapter.create(LoraSpec(rank=4, seed=6), runner.layers, DIMUON)
    for w in a.weights.values():  # non-zero B, so A gets a gradient too
        w.B.data.normal_(0, 0.02, generator=torch.Generator(device=w.B.device).manual_seed(0))
    slot = runner.attach(a)
    losses = []
    try:
        for _ in range(4):
            (lp,) = runner.target_logprobs([(slot, _datum(42))], grad=True)
            loss = -lp.sum()
            loss.backward()
            losses.append(float(loss.detach()))
            a.optim_step(DimuonSpec(learning_rate=1e-2, beta1=0.9))
    finally:
        runner.detach(slot)
    assert losses[-1] < losses[0], losses
    for p in a.parameters():
        st = a.optimizer_state(p)
        assert p.dtype == st["momentum"].dtype == torch.float32 and torch.isfinite(p).all()
        assert p.device.type == st["momentum"].device.type == runner.device.type


# ----- through the official SDK --------------------------------------------------------
DIMUON_CFG = types.DimuonOptimizerConfig()
SDK_STEP = types.DimuonParams(learning_rate=2e-2, beta1=0.9, grad_clip_norm=10.0)


def _sdk_train(tc: tinker.TrainingClient, batch: list[types.Datum], steps: int,
               params: types.DimuonParams = SDK_STEP) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(params)
        losses.append(fb.result().metrics["loss:sum"])
        assert opt.result().metrics["learning_rate:mean"] == params.learning_rate
    return losses


def test_dimuon_run_trains_and_resumes_exactly(service_client: tinker.ServiceClient, tokenizer,
                                               data_dir: Path, rest_client: tinker.RestClient) -> None:
    batch = [text_datum(tokenizer, SENTENCES[2])]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=11,
                                                    optimizer=DIMUON_CFG).result()
    info = tc.get_info()
    assert info.optimizer_config.type == "dimuon" and info.optimizer_config.model_dump()["version"] == 1
    losses = _sdk_train(tc, batch, 4)
    assert losses[-1] < 0.9 * losses[0], losses
    path = tc.save_state("dimuon-mid").result().path
    weights = rest_client.get_weights_info_by_tinker_path(path).result()
    assert weights.optimizer_config.model_dump() == {"type": "dimuon", "version": 1}
    db = MetadataStore(ServerSettings(data_dir=data_dir).resolved_database_url())
    try:
        assert db.get_run(tc.model_id).optimizer == {"type": "dimuon", "version": 1}
    finally:
        db.close()

    uninterrupted = _sdk_train(tc, batch, 2)
    want = logprobs_of(tc.forward(batch, "cross_entropy").result())
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().optimizer_config.type == "dimuon"
    assert _sdk_train(resumed, batch, 2) == uninterrupted  # bitwise, loss by loss
    for x, y in zip(logprobs_of(resumed.forward(batch, "cross_entropy").result()), want, strict=True):
        np.testing.assert_array_equal(x, y)
    # Weights only, as a Dimuon run: the momentum is lost, so it drifts from the twin.
    fresh = service_client.create_training_client_from_state(path, optimizer=DIMUON_CFG).result()
    assert fresh.get_info().optimizer_config.type == "dimuon"
    assert _sdk_train(fresh, batch, 2)[1] != uninterrupted[1]
    # Weights only without an optimizer: the SDK's default, AdamW.
    adam = service_client.create_training_client_from_state(path).result()
    assert adam.get_info().optimizer_config.type == "adamw"


def _rejected(future, *needles: str) -> None:
    with pytest.raises(tinker.APIStatusError) as err:
        future.result(timeout=60)
    assert 400 <= err.value.status_code < 500, err.value
    for needle in needles:
        assert needle in str(err.value), err.value


def test_other_family_is_refused_and_the_client_goes_on(service_client: tinker.ServiceClient,
                                                         tokenizer) -> None:
    batch = [text_datum(tokenizer, SENTENCES[0])]
    dim = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=3,
                                                     optimizer=DIMUON_CFG).result()
    adam = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=3).result()
    before = logprobs_of(dim.forward(batch, "cross_entropy").result())
    _rejected(dim.optim_step(types.AdamParams(learning_rate=1e-3)), "AdamParams", "dimuon")
    for x, y in zip(logprobs_of(dim.forward(batch, "cross_entropy").result()), before, strict=True):
        np.testing.assert_array_equal(x, y)
    _sdk_train(dim, batch, 1)  # and it still trains
    _rejected(adam.optim_step(SDK_STEP), "DimuonParams", "adamw")
    adam.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60)

    # Optimizer state of the other family into an existing run: refused, weights only fine.
    dim_path = dim.save_state("dim-state").result().path
    with pytest.warns(Warning):
        _rejected(adam.load_state_with_optimizer(dim_path), "dimuon optimizer state", "adamw")
    with pytest.warns(Warning):
        adam.load_state(dim_path).result(timeout=60)
    adam.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60)
    assert adam.get_info().optimizer_config.type == "adamw"


@pytest.mark.parametrize(("config", "message"), [
    (OptimizerConfigBase(type="lion"), "unknown optimizer type 'lion'"),
    (OptimizerConfigBase(type="dimuon", version=2), "version 2 is not supported"),
    (OptimizerConfigBase(type="dimuon", version=1, momentum=0.5), "unknown fields ['momentum']"),
])
def test_unknown_optimizer_config_is_refused(service_client: tinker.ServiceClient, config,
                                             message: str) -> None:
    with pytest.raises(tinker.APIStatusError) as err:
        service_client.create_lora_training_client(base_model=TINY, rank=2,
                                                    optimizer=config).result(timeout=60)
    assert err.value.status_code == 400 and message in str(err.value), err.value
