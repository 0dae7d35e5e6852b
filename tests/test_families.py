"""Model families: the LoRA target table (engine/families.py) against real architectures.

For every family in the table, a tiny random model of that type (built by transformers from a
config, saved with a byte tokenizer into a temporary folder) must expose exactly the table's
linear leaves, load in `ModelRunner`, and give base log-probabilities equal to the HF model's
own log_softmax(logits). A mixture-of-experts family (qwen3_moe, mixtral) also gets one LoRA
target per fused expert parameter. For the main families (llama, mistral, qwen2, qwen3, phi3
with its fused projections, qwen3_moe and mixtral with their experts) the whole path runs too: one training step through the local trainer
lowers the loss, and the exported checkpoint loads in `peft.PeftModel` with the same
log-probabilities. Tolerance: 1e-5 absolute on log-probabilities (float32 on a CPU; the
runner computes the unembedding on selected positions, HF on all of them).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from tinsmith.engine.adapter import Adapter, target_leaves
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.families import ALL_ATTN, FAMILIES, LLAMA, PHI3, UNSUPPORTED, family_for
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.models import byte_tokenizer
from tinsmith.types import AdamSpec, DatumIn, LoraSpec

VOCAB = 320  # more than the byte tokenizer's 256 + specials
ATOL = 1e-5
FULL_PATH = ["llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "mixtral"]
# MoE configs: 4 experts, top-2, expert width 48 (gate_up [4, 96, 64] is not square).
MOE = {"qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                     "norm_topk_prob": True},
       "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}}  # experts [4, 256, 64]
ADAM = AdamSpec(learning_rate=1e-2)


def tiny_config(model_type: str):
    """A 2-layer, hidden-64 config of `model_type`, with token ids inside VOCAB. A larger
    initializer range than the default spreads the logits, so a wrong projection shows."""
    style = byte_tokenizer.LLAMA3
    return AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=byte_tokenizer.token_id(style, style.bos),
        eos_token_id=byte_tokenizer.token_id(style, style.eos), pad_token_id=None,
        **MOE.get(model_type, {}),
    )


def tiny_model_dir(model_type: str, root: Path) -> Path:
    folder = root / model_type
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.save_pretrained(folder)
    byte_tokenizer.build_tokenizer(byte_tokenizer.LLAMA3, 512).save_pretrained(folder)
    return folder


def hf_model(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logprobs(model: nn.Module, datum: DatumIn) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(datum.tokens)[None]).logits[0]
    targets = torch.as_tensor(datum.inputs["target_tokens"])
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0].numpy()


def datum(seed: int, n: int = 11) -> DatumIn:
    toks = np.random.default_rng(seed).integers(0, 256, size=n + 1).astype(np.int64)
    return DatumIn(toks[:-1], {"target_tokens": toks[1:], "weights": np.ones(n, np.float32)})


def linear_leaves(model: nn.Module) -> set[str]:
    return {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def expert_paths(model: nn.Module, model_type: str) -> set[str]:
    """Paths of the fused 3-D expert parameters the family names (none for a dense one)."""
    names = set(FAMILIES[model_type].experts)
    return {p for p, t in model.named_parameters() if t.dim() == 3 and p.rsplit(".", 1)[-1] in names}


TABLE = [t for t in sorted(FAMILIES) if t in CONFIG_MAPPING]


# ----- the table --------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TABLE)
def test_table_matches_architecture_and_runner_loads_it(model_type: str, tmp_path: Path) -> None:
    folder = tiny_model_dir(model_type, tmp_path)
    hf = hf_model(folder)
    family = FAMILIES[model_type]
    assert linear_leaves(hf) == set(family.leaves), "the table names exactly its linear layers"
    runner = ModelRunner(folder, model_type)
    expected = {p for p, m in hf.named_modules() if isinstance(m, nn.Linear)}
    experts = expert_paths(hf, model_type)
    assert bool(experts) == bool(family.experts), "MoE families have their experts, dense ones none"
    assert set(runner.layers) == expected | experts
    d = datum(1)
    ours = runner.target_logprobs([(None, d)], grad=False)[0].numpy()
    theirs = hf_logprobs(hf, d)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    assert theirs.std() > 0.1, "logits too flat for the comparison to mean anything"


def test_lookup_errors_and_fallback() -> None:
    assert family_for("Qwen3") is FAMILIES["qwen3"] and family_for("phi3") is PHI3
    with pytest.raises(ValueError, match="not supported: its logits are soft-capped"):
        family_for("gemma2")
    assert set(UNSUPPORTED).isdisjoint(FAMILIES)
    with pytest.raises(ValueError, match="unknown model type 'my_arch'.*families.py"):
        family_for("my_arch")
    with pytest.raises(ValueError, match="unknown model type"):
        family_for("my_arch", ["qkv_proj", "o_proj"])
    assert family_for("my_arch", [*LLAMA.leaves, "router"]) is LLAMA  # the documented fallback


def test_target_leaves_per_family_and_across_families() -> None:
    spec = LoraSpec(rank=2, train_mlp=False, train_unembed=False)
    assert target_leaves(spec, "phi3") == ("qkv_proj", "o_proj")
    assert target_leaves(spec, "llama") == LLAMA.attn
    assert target_leaves(spec) == ALL_ATTN and {"qkv_proj", "q_proj", "dense"} <= set(ALL_ATTN)
    no_attn = LoraSpec(rank=2, train_attn=False)
    assert target_leaves(no_attn, "starcoder2") == ("c_fc", "c_proj", "lm_head")


# ----- the whole path for the main families ---------------------------------------------
@pytest.fixture(scope="module", params=[t for t in FULL_PATH if t in CONFIG_MAPPING])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tiny_model_dir(request.param, tmp_path_factory.mktemp("families"))
    return request.param, folder, ModelRunner(folder, request.param)


def test_lora_injected_into_exactly_the_familys_modules(family) -> None:
    model_type, folder, runner = family
    wanted = set(FAMILIES[model_type].leaves)
    hf = hf_model(folder)
    experts = expert_paths(hf, model_type)
    assert {p.rsplit(".", 1)[-1] for p in runner.layers} == wanted | set(FAMILIES[model_type].experts)
    assert set(runner.layers) == {p for p, m in hf.named_modules()
                                  if isinstance(m, nn.Linear) and p.rsplit(".", 1)[-1] in wanted} | experts
    adapter = Adapter.create(LoraSpec(rank=2, train_mlp=False, train_unembed=False), runner.layers)
    assert {p.rsplit(".", 1)[-1] for p in adapter.weights} == set(FAMILIES[model_type].attn)
    mlp = Adapter.create(LoraSpec(rank=2, train_attn=False, train_unembed=False), runner.layers)
    assert {p for p in mlp.weights if p in experts} == experts  # train_mlp trains the experts
    assert target_leaves(LoraSpec(rank=2, train_attn=False, train_unembed=False), model_type) == (
        FAMILIES[model_type].mlp + FAMILIES[model_type].experts)


def test_training_step_lowers_loss_and_peft_agrees(family, tmp_path: Path) -> None:
    import peft
    from transformers import AutoTokenizer

    model_type, folder, runner = family
    tokenizer = AutoTokenizer.from_pretrained(folder)
    trainer, _ = local_backends(runner, tokenizer, LossRegistry.load(()))
    trainer.create_run("r", LoraSpec(rank=4, seed=3))
    data = [datum(10), datum(11, n=7)]
    work = TrainWork("r", data, "cross_entropy", {})

    def forward():
        out = trainer.forward_backward_many([work], forward_only=True)[0]
        assert not isinstance(out, Exception), out
        return out

    before = forward()
    out = trainer.forward_backward_many([work], forward_only=False)[0]
    assert not isinstance(out, Exception), out
    trainer.optim_step("r", ADAM)
    after = forward()
    assert after.metrics["loss:sum"] < before.metrics["loss:sum"] - 1e-3

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    files = trainer.export_run("r", model_type, include_optimizer=True)
    for name, blob in files.items():
        (ckpt / name).write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about a tied lm_head
        pm = peft.PeftModel.from_pretrained(hf_model(folder), str(ckpt)).eval()
    for d, ours in zip(data, after.outputs):
        np.testing.assert_allclose(hf_logprobs(pm, d), ours["logprobs"], atol=ATOL, rtol=0)
        base = hf_logprobs(hf_model(folder), d)
        assert np.abs(ours["logprobs"] - base).max() > 1e-3, "the adapter changed nothing"

    # The checkpoint reads back into a new run with the same function.
    trainer.load_run("r2", files, with_optimizer=True)
    again = trainer.forward_backward_many([TrainWork("r2", data, "cross_entropy", {})],
                                          forward_only=True)[0]
    for a, b in zip(again.outputs, after.outputs):
        np.testing.assert_array_equal(a["logprobs"], b["logprobs"])
