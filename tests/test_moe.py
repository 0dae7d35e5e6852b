"""Mixture-of-experts (Qwen3-MoE) LoRA: kernels, runner, checkpoints, packing, SDK.

On `synthetic/tiny-qwen3-moe` (2 sparse layers, 8 experts, top-2, float32 on a CPU):

- the grouped expert path (moe_kernels.experts_forward, grouped_mm or padded bmm) equals
  the reference loop, values and gradients, with several adapters of different ranks;
- forward logprobs with an adapter equal transformers + PEFT (the checkpoint loaded by
  `PeftModel.from_pretrained`, PEFT's own per-expert `target_parameters` computation)
  within 1e-4, and the checkpoint reads back bit-exactly;
- two runs packed in one pass equal their solo passes: bitwise with exact packing (the CPU
  default), within 1e-5 (loss) / 1e-4 (gradients, relative to their norm) with shared GEMMs;
- the auxiliary loss equals transformers' load_balancing_loss_func, and a request split into
  micro-batches gets the same gradients as one pass, aux term included;
- SFT through the official SDK against a real server lowers the loss and reports the
  hosted service's load-balance metrics.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinsmith.engine import moe_kernels
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.budget import adapter_layer_shapes
from tinsmith.engine.local import local_backends
from tinsmith.engine.lora import LoraWeights
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.models import synthetic
from tinsmith.types import DatumIn, LoraSpec

NAME = "synthetic/tiny-qwen3-moe"
KEY = "tiny-qwen3-moe"
PEFT_ATOL = 1e-4


def datum(seed: int, n: int = 11) -> DatumIn:
    toks = np.random.default_rng(seed).integers(0, 256, size=n + 1).astype(np.int64)
    return DatumIn(toks[:-1], {"target_tokens": toks[1:], "weights": np.ones(n, np.float32)})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe") / KEY
    out.mkdir()
    synthetic.write_folder(KEY, out)
    return out


def new_runner(folder: Path, **kw) -> ModelRunner:
    return ModelRunner(folder, NAME, **kw)


def hf_base(folder: Path) -> torch.nn.Module:
    """The same seeded random model, built by transformers alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(synthetic.synthetic_seed(folder))
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32,
                                            attn_implementation="sdpa").eval()


def perturb(adapter: Adapter, seed: int, std: float = 0.2) -> None:
    """Non-zero B factors, so the adapter changes the function (a fresh one does not)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in adapter.weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * std)


# ----- kernels -----------------------------------------------------------------------------
def _kernel_case(dtype: torch.dtype, single: bool = False):
    """23 tokens, 8 experts, top-2: three adapter groups (rank 4, rank 2 zero-padded, none),
    or with `single` one group of an aligned rank (8: the grouped path's no-copy branch)."""
    gen = torch.Generator().manual_seed(0)
    N, H, I, E, K = 23, 64, 48, 8, 2
    x = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    logits = torch.randn(N, E, generator=gen)
    top_w, top_idx = torch.softmax(logits, -1).topk(K, -1)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * 0.1).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) * 0.1).to(dtype)

    def lora(r: int, out_f: int, in_f: int, scale: float) -> LoraWeights:
        return LoraWeights(torch.randn(E, r, in_f, generator=gen).mul_(0.1).requires_grad_(),
                           torch.randn(E, out_f, r, generator=gen).mul_(0.1).requires_grad_(), scale)

    if single:
        return x, top_idx, top_w.to(dtype), gate_up, down, [lora(8, 2 * I, H, 0.5)], [lora(8, H, I, 0.5)], None
    gu = [lora(4, 2 * I, H, 2.0), lora(2, 2 * I, H, 0.5), None]
    dn = [lora(4, H, I, 2.0), lora(2, H, I, 0.5), None]
    token_group = torch.tensor([0] * 9 + [1] * 8 + [2] * 6)
    return x, top_idx, top_w.to(dtype), gate_up, down, gu, dn, token_group


def _run_kernel(fn, case):
    x, top_idx, top_w, gate_up, down, gu, dn, token_group = case
    y = fn(x, top_idx, top_w, gate_up, down, torch.nn.functional.silu, gu, dn, token_group)
    params = [x] + [t for w in gu + dn if w is not None for t in (w.A, w.B)]
    grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), params)
    return y.detach().float(), [g.float() for g in grads]


@pytest.mark.parametrize("single", [False, True], ids=["3-adapters", "1-adapter"])
@pytest.mark.parametrize("native", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_grouped_experts_equal_reference_loop(native: bool, single: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if native and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch has no grouped_mm")
    case = _kernel_case(torch.float32, single)
    if not native:
        monkeypatch.setattr(moe_kernels, "_native_ok", lambda x, w: False)
    else:
        assert moe_kernels._native_ok(case[0], case[3].transpose(1, 2)), "the kernel path is not taken"
    y, grads = _run_kernel(moe_kernels.experts_forward, case)
    y_ref, grads_ref = _run_kernel(moe_kernels.experts_forward_loop, case)
    assert y_ref.abs().max() > 0.1
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_grouped_experts_bfloat16_near_float32() -> None:
    """bf16 activations and weights (float32 LoRA masters): within bf16 rounding of the
    float32 reference (bound 3e-2 of the output's scale)."""
    y16, _ = _run_kernel(moe_kernels.experts_forward, _kernel_case(torch.bfloat16))
    y32, _ = _run_kernel(moe_kernels.experts_forward_loop, _kernel_case(torch.float32))
    err = float((y16 - y32).abs().max() / y32.abs().max())
    assert err < 3e-2, err


# ----- runner, PEFT, checkpoints --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(folder: Path):
    """A trainer on the tiny MoE, one run with a non-zero adapter (rank 4, every group)."""
    from transformers import AutoTokenizer

    runner = new_runner(folder)
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    trainer.create_run("r", LoraSpec(rank=4, alpha=8, seed=1))
    perturb(trainer._run("r")[0], seed=5)
    return runner, trainer


def _forward(trainer, run_id: str, data: list[DatumIn], config: dict | None = None):
    out = trainer.forward_backward_many([TrainWork(run_id, data, "cross_entropy", config or {})],
                                        forward_only=True)[0]
    assert not isinstance(out, Exception), out
    return out


def _hf_logprobs(model: torch.nn.Module, d: DatumIn) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(d.tokens)[None]).logits[0]
    t = torch.as_tensor(d.inputs["target_tokens"])
    return torch.log_softmax(logits.float(), -1).gather(-1, t[:, None])[:, 0].numpy()


def test_runner_has_expert_targets_and_base_equals_transformers(trained, folder: Path) -> None:
    runner, _ = trained
    experts = sorted(p for p in runner.layers if ".experts." in p)
    assert experts == [f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1)
                       for n in ("down_proj", "gate_up_proj")]
    assert runner.layers["model.layers.0.mlp.experts.gate_up_proj"].factor_shapes(4) == ((8, 4, 64), (8, 96, 4))
    # The memory budgets count one LoRA pair per expert: 8 per expert layer, 1 per other layer.
    shapes = adapter_layer_shapes(runner.layers.values())
    assert len(shapes) == len(runner.layers) + 7 * len(experts)
    assert shapes.count((64, 96)) == 8 * 2  # gate_up of both layers: in 64, out 2 x 48
    hf = hf_base(folder)
    d = datum(1)
    ours = runner.target_logprobs([(None, d)], grad=False)[0].numpy()
    np.testing.assert_allclose(ours, _hf_logprobs(hf, d), atol=1e-5, rtol=0)


@pytest.mark.parametrize("experts_only", [False, True], ids=["all", "experts-only"])
def test_forward_equals_peft_and_checkpoint_round_trips(trained, folder: Path, tmp_path: Path,
                                                         experts_only: bool) -> None:
    """Our logprobs equal PEFT's for the saved checkpoint: every group (attention, experts,
    lm_head), or the experts alone (train_mlp only: no target_modules at all)."""
    import peft

    _, trainer = trained
    run = "r"
    if experts_only:
        run = "experts-only"
        trainer.create_run(run, LoraSpec(rank=3, alpha=6, seed=4, train_attn=False, train_unembed=False))
        perturb(trainer._run(run)[0], seed=6)
    data = [datum(10), datum(11, n=7)]
    ours = _forward(trainer, run, data)
    files = trainer.export_run(run, NAME, include_optimizer=True)
    config = __import__("json").loads(files["adapter_config.json"])
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["target_modules"] == (None if experts_only else ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"])
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf_base(folder), str(tmp_path)).eval()
    # PEFT put the factors where we meant: 8 experts x rank 4, gate_up nested inside.
    wrapper = pm.base_model.model.model.layers[0].mlp.experts
    assert (wrapper.parameter_name, wrapper.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    assert wrapper.base_layer.lora_A["default"].weight.shape == (8 * (3 if experts_only else 4), 64)
    base = hf_base(folder)
    for d, o in zip(data, ours.outputs):
        np.testing.assert_allclose(_hf_logprobs(pm, d), o["logprobs"], atol=PEFT_ATOL, rtol=0)
        assert np.abs(o["logprobs"] - _hf_logprobs(base, d)).max() > 1e-2, "the adapter changed nothing"
    trainer.load_run(run + "-copy", files, with_optimizer=True)
    again = _forward(trainer, run + "-copy", data)
    for a, b in zip(again.outputs, ours.outputs):
        np.testing.assert_array_equal(a["logprobs"], b["logprobs"])


def test_training_step_with_optimizer_state_round_trips(folder: Path) -> None:
    from transformers import AutoTokenizer

    runner = new_runner(folder)
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    trainer.create_run("t", LoraSpec(rank=4, seed=2))
    data = [datum(20), datum(21, n=9)]
    work = TrainWork("t", data, "cross_entropy", {})
    before = _forward(trainer, "t", data).metrics["loss:sum"]
    for _ in range(3):
        out = trainer.forward_backward_many([work], forward_only=False)[0]
        assert not isinstance(out, Exception), out
        trainer.optim_step("t", __import__("tinsmith.types", fromlist=["AdamSpec"]).AdamSpec(learning_rate=2e-2))
    after = _forward(trainer, "t", data).metrics["loss:sum"]
    assert after < before - 1e-2, (before, after)
    adapter = trainer._run("t")[0]
    expert_A = adapter.weights["model.layers.1.mlp.experts.down_proj"].A
    assert adapter.optimizer_state(expert_A)["exp_avg"].shape == expert_A.shape == (8, 4, 48)
    files = trainer.export_run("t", NAME, include_optimizer=True)
    trainer.load_run("t2", files, with_optimizer=True)
    loaded = trainer._run("t2")[0]
    torch.testing.assert_close(loaded.optimizer_state(loaded.weights["model.layers.1.mlp.experts.down_proj"].A)
                               ["exp_avg_sq"], adapter.optimizer_state(expert_A)["exp_avg_sq"], atol=0, rtol=0)


# ----- packing ------------------------------------------------------------------------------
def _grads(trainer, run_id: str) -> list[torch.Tensor]:
    adapter = trainer._run(run_id)[0]
    out = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    return out


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "shared"])
def test_packed_runs_equal_solo_runs(folder: Path, exact: bool) -> None:
    """Two runs (ranks 4 and 2) in one pass against each alone. Exact packing: bitwise.
    Shared base GEMMs (the GPU default; here the experts' grouped matmuls hold both runs'
    pairs, G = 2 adapter groups): loss within 1e-5 relative, each gradient within 2e-4 of
    its norm; the routing metrics count each request's own tokens only (not the padding
    its rows get in the pass)."""
    from transformers import AutoTokenizer

    runner = new_runner(folder, exact_packing=exact)
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    trainer.create_run("a", LoraSpec(rank=4, seed=1))
    trainer.create_run("b", LoraSpec(rank=2, seed=2, train_unembed=False))
    perturb(trainer._run("a")[0], 1)
    perturb(trainer._run("b")[0], 2)
    works = [TrainWork("a", [datum(30), datum(31, n=6)], "cross_entropy", {}),
             TrainWork("b", [datum(32, n=9), datum(33, n=14)], "cross_entropy", {})]
    packed = trainer.forward_backward_many(works, forward_only=False)
    packed_grads = {w.run_id: _grads(trainer, w.run_id) for w in works}
    for w, p in zip(works, packed):
        solo = trainer.forward_backward_many([w], forward_only=False)[0]
        solo_grads = _grads(trainer, w.run_id)
        assert solo.metrics.keys() == p.metrics.keys() and "e_max_violation:max" in p.metrics
        for g, s in zip(packed_grads[w.run_id], solo_grads):
            assert s.abs().max() > 0
            if exact:
                torch.testing.assert_close(g, s, atol=0, rtol=0)
            else:
                assert float((g - s).norm() / s.norm()) < 2e-4  # measured 5e-5
        for k, v in solo.metrics.items():
            assert p.metrics[k] == pytest.approx(v, rel=0 if exact else 1e-5, abs=0 if exact else 1e-6), k


# ----- routing: metrics and auxiliary loss --------------------------------------------------
def test_aux_loss_and_metrics_equal_transformers(trained, folder: Path, tmp_path: Path) -> None:
    """moe_aux_loss:mean equals transformers' load_balancing_loss_func (with the attention
    mask of a right-padded batch), and the e_* metrics equal those of transformers' own
    router choices, on the adapter's function (PEFT model of the checkpoint)."""
    import peft
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from tinsmith.engine.moe_routing import balance_metrics

    _, trainer = trained
    data = [datum(40), datum(41, n=6)]
    out = _forward(trainer, "r", data, {"moe_aux_loss_coef": 0.5})
    for name, blob in trainer.export_run("r", NAME, include_optimizer=False).items():
        (tmp_path / name).write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf_base(folder), str(tmp_path)).eval()
    width = max(len(d.tokens) for d in data)
    ids = torch.zeros(len(data), width, dtype=torch.long)
    mask = torch.zeros(len(data), width, dtype=torch.long)
    for i, d in enumerate(data):
        ids[i, : len(d.tokens)] = torch.as_tensor(d.tokens)
        mask[i, : len(d.tokens)] = 1
    with torch.no_grad():
        res = pm(input_ids=ids, attention_mask=mask, output_router_logits=True)
    theirs = float(load_balancing_loss_func(res.router_logits, 8, 2, mask))
    assert out.metrics["moe_aux_loss:mean"] == pytest.approx(theirs, rel=1e-5)
    counts = torch.stack([torch.zeros(8).index_add(0, lg.topk(2, -1).indices[mask.view(-1).bool()].reshape(-1),
                                                   torch.ones(2 * int(mask.sum())))
                          for lg in res.router_logits])
    assert counts.sum() == 2 * 2 * (11 + 6)
    assert balance_metrics(counts) == pytest.approx({k: v for k, v in out.metrics.items() if k.startswith("e_")})
    assert out.metrics["e_max_violation:max"] > 0  # 17 tokens over 8 experts: not balanced


def test_micro_batches_equal_one_pass_with_aux_loss(folder: Path) -> None:
    """A request split into micro-batches (one datum each) gets the gradients of one pass,
    the auxiliary loss's included; and that loss does change the gradients."""
    from transformers import AutoTokenizer

    runner = new_runner(folder)
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    trainer.create_run("c", LoraSpec(rank=4, seed=3))
    perturb(trainer._run("c")[0], 3)
    data = [datum(50), datum(51, n=7), datum(52, n=9)]
    aux = {"moe_aux_loss_coef": 5.0}
    one = trainer.forward_backward_many([TrainWork("c", data, "cross_entropy", aux)], forward_only=False)[0]
    g_one = _grads(trainer, "c")
    gen = trainer.forward_backward_chunked(TrainWork("c", data, "cross_entropy", aux), forward_only=False, budget=12)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            split = stop.value
            break
    g_split = _grads(trainer, "c")
    assert split.metrics == pytest.approx(one.metrics, rel=1e-5)
    for a, b in zip(g_split, g_one):
        assert float((a - b).norm() / b.norm()) < 1e-5
    trainer.forward_backward_many([TrainWork("c", data, "cross_entropy", {})], forward_only=False)
    g_plain = _grads(trainer, "c")
    moved = max(float((a - b).norm() / b.norm()) for a, b in zip(g_one, g_plain) if b.norm() > 0)
    assert moved > 1e-4, "the aux loss changed no gradient"


def test_aux_loss_option_is_checked() -> None:
    from tinsmith.engine.losses import LossRegistry as Registry
    from tinsmith.engine.validation import check_config
    from tinsmith.types import UserError

    spec = Registry.load(()).get("cross_entropy")
    check_config(spec, "cross_entropy", {"moe_aux_loss_coef": 0.01})  # every loss accepts it
    with pytest.raises(UserError, match="must be >= 0"):
        check_config(spec, "cross_entropy", {"moe_aux_loss_coef": -1.0})
    from tinsmith.engine.moe_routing import check_dense

    with pytest.raises(ValueError, match="needs a mixture-of-experts base model"):
        check_dense({"moe_aux_loss_coef": 0.01})
    check_dense({"moe_aux_loss_coef": 0.0})


# ----- through the official SDK ------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_url(tmp_path_factory: pytest.TempPathFactory):
    import tinsmith

    with tinsmith.local(models=[NAME], data_dir=tmp_path_factory.mktemp("moe-server")) as url:
        yield url


HOSTED_KEYS = {"e_frac_with_tokens:mean", "e_frac_oversubscribed:mean", "e_max_violation:mean",
               "e_max_violation:max", "e_min_violation:mean"}


def test_sft_through_sdk_lowers_loss_and_reports_routing(moe_url: str) -> None:
    import tinker
    from tinker import types

    from tests.conftest import SENTENCES, text_datum

    sc = tinker.ServiceClient(base_url=moe_url, api_key="tml-test")
    tc = sc.create_lora_training_client(base_model=NAME, rank=8)
    tok = tc.get_tokenizer()
    data = [text_datum(tok, s) for s in SENTENCES[:2]]
    losses, fb = [], None
    for _ in range(4):
        fb = tc.forward_backward(data, "cross_entropy", loss_fn_config={"moe_aux_loss_coef": 0.01}).result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        losses.append(fb.metrics["loss:sum"])
    assert losses[-1] < losses[0] * 0.9, losses
    assert HOSTED_KEYS <= set(fb.metrics) and fb.metrics["moe_aux_loss:mean"] > 0
    assert 0 < fb.metrics["e_frac_with_tokens:mean"] <= 1
    # The decode path runs the MoE blocks too (KV cache, one token at a time).
    sampler = tc.save_weights_and_get_sampling_client(name="moe")
    res = sampler.sample(types.ModelInput.from_ints(tok.encode("The quick")), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert len(res.sequences[0].tokens) == 4


def test_plain_peft_adapter_loads(trained, folder: Path, tmp_path: Path) -> None:
    """A folder PEFT itself wrote (get_peft_model + save_pretrained, random non-zero
    factors, no tinsmith.json) loads as a run with PEFT's logprobs: our reading of PEFT's
    expert naming and layout does not just mirror our own writing."""
    import peft

    _, trainer = trained
    torch.manual_seed(7)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf_base(folder), config).eval()
        pm.save_pretrained(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    trainer.load_run("from-peft", files, with_optimizer=False)
    data = [datum(60), datum(61, n=5)]
    ours = _forward(trainer, "from-peft", data)
    for d, o in zip(data, ours.outputs):
        np.testing.assert_allclose(_hf_logprobs(pm, d), o["logprobs"], atol=PEFT_ATOL, rtol=0)
