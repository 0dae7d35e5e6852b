"""Model families as data: which linear layers of an architecture LoRA adapts.

Keyed by the Hugging Face config's `model_type`, each `Family` names the *leaf* module names
(the last component of a module path, e.g. `q_proj` in `model.layers.3.self_attn.q_proj`) of
the attention projections, the MLP projections and the unembedding. `LoraSpec.train_attn`,
`train_mlp` and `train_unembed` select among these three groups.

Every layout below was checked against the modules transformers builds for a tiny config of
that type (tests/test_families.py checks it again on the installed version), and the types
are ones whose logits are plain `lm_head(final hidden state)`, as the runner requires.

Looking up a type:
- a type in `FAMILIES`: its layout;
- a type in `UNSUPPORTED`: a ValueError saying why (logit soft-capping, an MoE layout
  Tinsmith does not compute, ...);
- any other type: a ValueError listing the known types, unless the caller passes the model's
  linear leaf names, in which case the documented fallback applies: the Llama layout if the
  model has every one of its leaves (a Llama-shaped fine-tune with its own `model_type`).

Mixture-of-experts families also name `experts`: the fused 3-D expert weights of their
sparse MoE blocks (e.g. `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] of
`model.layers.N.mlp.experts`), which moe.py adapts with one LoRA pair per expert; they
belong to the MLP group (`train_mlp`). The router is never a LoRA target. A dense MLP that
a Qwen3-MoE keeps in its `mlp_only_layers` (none in the published models) is not one either:
PEFT 0.21 on transformers 5 rewrites every `gate_proj`/`up_proj`/`down_proj` target of a
qwen3_moe model into the fused expert parameters, so no checkpoint could name it.

This module is engine-level data: it imports nothing from Tinsmith.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("tinsmith.families")


@dataclass(frozen=True)
class Family:
    """Leaf names of one architecture's LoRA candidates, grouped as LoraSpec trains them."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    unembed: tuple[str, ...] = ("lm_head",)
    # Fused 3-D expert parameters of the MoE blocks (not nn.Linear), in the order the
    # experts module registers them; trained with the MLP group.
    experts: tuple[str, ...] = ()

    @property
    def leaves(self) -> tuple[str, ...]:
        """The nn.Linear leaves (expert parameters are not modules)."""
        return self.attn + self.mlp + self.unembed


# Separate q/k/v/o projections and a gated MLP: Llama and most of its descendants.
LLAMA = Family(attn=("q_proj", "k_proj", "v_proj", "o_proj"),
               mlp=("gate_proj", "up_proj", "down_proj"))
# Separate attention projections, an ungated MLP (up -> activation -> down).
UNGATED = Family(attn=LLAMA.attn, mlp=("up_proj", "down_proj"))
# Phi-3: one fused q|k|v projection and one fused gate|up projection.
PHI3 = Family(attn=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"))
# GLM / GLM-4: separate q/k/v/o, fused gate|up.
GLM = Family(attn=LLAMA.attn, mlp=("gate_up_proj", "down_proj"))
# Phi-1/2: attention output is `dense`, the MLP is fc1 -> fc2.
PHI = Family(attn=("q_proj", "k_proj", "v_proj", "dense"), mlp=("fc1", "fc2"))
# StarCoder2: Llama attention, GPT-2-style MLP names.
STARCODER2 = Family(attn=LLAMA.attn, mlp=("c_fc", "c_proj"))
# Qwen3-MoE: Llama attention; sparse blocks `mlp.gate` (router) + `mlp.experts` (fused
# gate_up_proj [E, 2I, H], down_proj [E, H, I]); `mlp_only_layers` stay untrained (above).
QWEN3_MOE = Family(attn=LLAMA.attn, mlp=(), experts=("gate_up_proj", "down_proj"))
# Mixtral: the same router and fused experts in transformers 5 (its router renormalises the
# top-k weights always; its jitter noise applies in training mode only, never used here).
MIXTRAL = QWEN3_MOE

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,  # Llama 2/3/3.1/3.2, SmolLM2, TinyLlama, ...
    "mistral": LLAMA,
    "ministral": LLAMA,
    "qwen2": LLAMA,  # Qwen2, Qwen2.5 (q/k/v carry biases; LoRA does not care)
    "qwen3": LLAMA,  # Qwen3 dense (q_norm/k_norm are norms, not LoRA targets)
    "gemma": LLAMA,  # Gemma 1 (scaled embeddings live in the body, the head is plain)
    "gemma3_text": LLAMA,  # Gemma 3 text models (no logit soft-capping, unlike Gemma 2)
    "olmo": LLAMA,
    "olmo2": LLAMA,
    "olmo3": LLAMA,
    "exaone4": LLAMA,
    "smollm3": LLAMA,
    "stablelm": LLAMA,
    "helium": LLAMA,
    "hunyuan_v1_dense": LLAMA,
    "seed_oss": LLAMA,
    "ernie4_5": LLAMA,
    "nemotron": UNGATED,
    "arcee": UNGATED,
    "apertus": UNGATED,
    "phi3": PHI3,  # Phi-3, Phi-3.5, Phi-4 (mini)
    "glm": GLM,
    "glm4": GLM,
    "phi": PHI,  # Phi-1, Phi-1.5, Phi-2
    "starcoder2": STARCODER2,
    "qwen3_moe": QWEN3_MOE,  # Qwen3-30B-A3B, Qwen3-235B-A22B
    "mixtral": MIXTRAL,  # Mixtral-8x7B, 8x22B
}

# Vision-language types -> the family of their language model. LoRA adapts the language model
# (`model.language_model.layers.N...`) and lm_head; the vision tower's linears (attn.qkv/proj,
# mlp and merger linear_fc1/fc2) have other leaf names and stay frozen (engine/vision.py).
VISION_LANGUAGE: dict[str, str] = {
    "qwen3_vl": "qwen3",  # Qwen3-VL-2B/4B/8B/32B (dense)
    "qwen2_5_vl": "qwen2",  # Qwen2.5-VL-3B/7B/32B/72B (q/k/v biases, like Qwen2.5)
}
# The vision tower's module paths: never LoRA targets, even where its leaves share the
# language model's names (Qwen2.5-VL's vision MLPs are gate_proj/up_proj/down_proj).
VISION_TOWER_PREFIX = "model.visual."
# The same for PEFT: LoraConfig.exclude_modules (a regex fullmatched against module paths),
# written into the checkpoints of vision-language models so PEFT adapts what Tinsmith did.
VISION_TOWER_EXCLUDE = r"model\.visual(\..*)?"
# Where a vision-language model's language model lives (its adapted layers' paths).
VL_LANGUAGE_PREFIX = "model.language_model."

# Types that are known and deliberately refused, with the reason the error gives.
UNSUPPORTED: dict[str, str] = {
    "gemma2": "its logits are soft-capped (final_logit_softcapping) and it needs eager attention",
    "granite": "its logits are scaled (logits_scaling), not plain lm_head outputs",
    "cohere": "its logits are scaled (logit_scale), not plain lm_head outputs",
    "cohere2": "its logits are scaled (logit_scale), not plain lm_head outputs",
    "gpt_neox": "its decoder body is not at `.model` and q/k/v are one fused `query_key_value`",
    "gpt2": "its projections are Conv1D, and `c_proj` names both attention and MLP outputs",
    "qwen2_moe": "its MoE block has a gated shared expert that Tinsmith's expert LoRA does not compute",
    "gpt_oss": "its experts are transposed with biases and a clamped activation, and it needs "
               "eager attention (attention sinks)",
    "deepseek_v3": "multi-head latent attention and shared/grouped-routed experts are not supported",
}

# Which layout an unknown type falls back to, when its modules have all of that layout's leaves.
FALLBACK = LLAMA


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Distinct names in first-seen order (so the Llama names come first)."""
    return tuple(dict.fromkeys(name for group in groups for name in group))


# Every family's leaves per group. Code that only has a LoraSpec (no model), e.g. reading a
# checkpoint, uses these: matched against a model's own adapted layers they select exactly
# that model's family's leaves, because the groups never share a name (checked below).
ALL_ATTN = _union([LLAMA.attn] + [f.attn for f in FAMILIES.values()])
ALL_MLP = _union([LLAMA.mlp] + [f.mlp + f.experts for f in FAMILIES.values()])
ALL_UNEMBED = _union([LLAMA.unembed] + [f.unembed for f in FAMILIES.values()])
assert not (set(ALL_ATTN) & set(ALL_MLP) or set(ALL_ATTN) & set(ALL_UNEMBED)
            or set(ALL_MLP) & set(ALL_UNEMBED)), "a leaf name would belong to two LoRA groups"


def family_for(model_type: str, linear_leaves: Iterable[str] | None = None) -> Family:
    """The LoRA layout of HF `model_type`; ValueError if it is refused or unknown.

    `linear_leaves`: the leaf names of the model's nn.Linear modules. When given, an unknown
    type whose modules include every leaf of the Llama layout gets that layout (the fallback).
    """
    key = model_type.lower()
    key = VISION_LANGUAGE.get(key, key)
    if key in FAMILIES:
        return FAMILIES[key]
    if key in UNSUPPORTED:
        raise ValueError(f"model type {model_type!r} is not supported: {UNSUPPORTED[key]}")
    if linear_leaves is not None and set(FALLBACK.leaves) <= set(linear_leaves):
        log.warning("model type %r is not in the families table; its modules have every "
                    "Llama projection, so LoRA targets those: %s", model_type, FALLBACK.leaves)
        return FALLBACK
    raise ValueError(
        f"unknown model type {model_type!r}: LoRA target modules are known for "
        f"{', '.join(sorted(FAMILIES))}. Add its attention/MLP/unembedding leaf names to "
        "FAMILIES in tinsmith/engine/families.py"
    )
