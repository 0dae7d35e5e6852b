"""Memory planner: what each device holds to train K LoRA runs on a base model, from the
model's config alone (`tinsmith plan`).

No weights are allocated and nothing is downloaded: the model is built on the `meta` device,
which gives every parameter's shape, and the runner's LoRA targets are found on it as the
runner finds them (lora.inject_lora, moe.inject_moe). Per device, for one training pass of
T tokens, under FSDP2 full sharding over N devices (N = 1: one device, nothing sharded):

    weights      base parameters and buffers in the serving dtype, / N
    adapters     K runs x (factors + gradients + AdamW's two moments), float32, / N
                 (budget.adapter_bytes; a MoE expert layer holds one pair per expert)
    gathered     N > 1 only: FSDP2 unshards one unit at a time and prefetches the next, so
                 the two largest units (a decoder layer, the embedding, the head) are whole
    activations  T / N tokens x budget.saved_bytes_per_token (in the dtype, float32 where
                 the model computes in float32: the norms' inputs)
    logits       one chunk of the unembedding: min(T / N, chunk) positions x vocab x 3
                 float32 vectors (logits, log-softmax, its gradient), the chunk being
                 runner.LOGIT_CHUNK_BYTES of float32 logits

tests/test_plan.py holds the whole figure to a pass measured on the CPU (float32).
Not counted: the CUDA context and cuBLAS workspaces (about 1 GiB), allocator fragmentation,
the sampler's KV cache, and the collectives' buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinsmith.engine.adapter import target_leaves
from tinsmith.engine.budget import adapter_bytes, adapter_layer_shapes, saved_bytes_per_token
from tinsmith.engine.families import FAMILIES
from tinsmith.engine.lora import LoraContext, inject_lora, leaf_name
from tinsmith.engine.moe import inject_moe
from tinsmith.engine.runner import logit_chunk_positions
from tinsmith.types import LoraSpec, UserError

LOGIT_COPIES = 3  # float32 [chunk, vocab] tensors alive at once in the unembedding's backward


@dataclass(frozen=True)
class ModelFacts:
    """What a plan needs of one model, in bytes of its serving dtype."""

    name: str
    config: Any  # the transformers config
    dtype: torch.dtype  # the base model's
    params: int  # parameters, a tied embedding once
    weight_bytes: int  # parameters and buffers
    unit_bytes: tuple[int, ...]  # FSDP2 units: embedding, each decoder layer, the rest (head)
    lora_shapes: tuple[tuple[int, int], ...]  # (in, out) of each LoRA pair of one run
    vocab: int

    @property
    def logit_chunk(self) -> int:
        """Positions one chunk of the unembedding holds (as the runner's `logit_chunk`)."""
        return logit_chunk_positions(self.vocab)


def load_config(name: str):
    """A model's transformers config, offline, without its weights: a `synthetic/` shape,
    a folder with config.json, a hosted name found locally, or a catalog name (prepared)."""
    from transformers import AutoConfig

    from tinsmith.models import synthetic
    from tinsmith.models.catalog import resolve_model_dir
    from tinsmith.models.local import find_local

    key = name.removeprefix(synthetic.PREFIX)
    if name.startswith(synthetic.PREFIX) and key in synthetic.SHAPES:
        return synthetic.config_for(key)
    if (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name)
    found = find_local(name) if "/" in name else None
    if found is not None and (found.path / "config.json").is_file():
        return AutoConfig.from_pretrained(found.path)
    return AutoConfig.from_pretrained(resolve_model_dir(name))  # catalog, or a UserError


def _bytes(module: nn.Module, seen: set[int]) -> int:
    """Bytes of `module`'s parameters and buffers not already in `seen` (tied ones once)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_facts(name: str, dtype: torch.dtype = torch.bfloat16, spec: LoraSpec | None = None,
                config=None) -> ModelFacts:
    """The facts of model `name` (or of `config`, under that name) served in `dtype`, with
    adapters of `spec` (default: every group, as LoraSpec's defaults; its rank is not used)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = config if config is not None else load_config(name)
    spec = spec or LoraSpec()
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # a vision-language model: its tower counts as weights
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    seen: set[int] = set()
    embed = _bytes(model.get_input_embeddings(), seen)
    blocks = max((m for m in model.get_decoder().children() if isinstance(m, nn.ModuleList)),
                 key=len, default=[])  # the decoder layers (`layers`, `h`, ...)
    layers = [_bytes(layer, seen) for layer in blocks]
    rest = _bytes(model, seen)  # final norm, lm_head (when untied), rotary buffers
    units = (embed, *layers, rest)
    # The runner's LoRA targets (runner.ModelRunner.__init__), and those `spec` trains.
    ctx = LoraContext()
    try:
        targets: dict[str, Any] = dict(inject_lora(model, ctx))
        family = FAMILIES.get(str(config.model_type).lower())
        if family is not None and family.experts:
            targets.update(inject_moe(model, ctx, family.experts))
    except ValueError as e:  # a family Tinsmith refuses or does not know
        raise UserError(f"{name}: {e}") from e
    leaves = set(target_leaves(spec))
    shapes = adapter_layer_shapes(m for p, m in targets.items() if leaf_name(p) in leaves)
    text = config.get_text_config()
    return ModelFacts(name, config, dtype, params, sum(units), units, tuple(shapes),
                      int(text.vocab_size))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one pass of `pass_tokens` tokens with `runs` resident runs."""

    devices: int
    runs: int
    rank: int
    pass_tokens: int  # the whole pass, over every device
    weights: int
    adapters: int
    gathered: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gathered + self.activations + self.logits


def plan_memory(facts: ModelFacts, *, pass_tokens: int, devices: int = 1, runs: int = 1,
                rank: int = 32) -> MemoryPlan:
    """Per-device memory of a pass of `pass_tokens` tokens (see the module docstring)."""
    if devices < 1 or runs < 0 or rank < 1 or pass_tokens < 0:
        raise UserError(f"devices >= 1, runs >= 0, rank >= 1, tokens >= 0; got {devices}, "
                        f"{runs}, {rank}, {pass_tokens}")
    tokens = math.ceil(pass_tokens / devices)
    return MemoryPlan(
        devices=devices, runs=runs, rank=rank, pass_tokens=pass_tokens,
        weights=math.ceil(facts.weight_bytes / devices),
        adapters=math.ceil(runs * adapter_bytes(facts.lora_shapes, rank) / devices),
        gathered=sum(sorted(facts.unit_bytes)[-2:]) if devices > 1 else 0,
        activations=tokens * saved_bytes_per_token(facts.config, facts.dtype),
        logits=min(tokens, facts.logit_chunk) * facts.vocab * 4 * LOGIT_COPIES,
    )


def max_pass_tokens(facts: ModelFacts, device_bytes: int, *, devices: int = 1, runs: int = 1,
                    rank: int = 32) -> int:
    """The most tokens one pass may hold (over all devices) so that each device's plan fits
    in `device_bytes`; 0 when the weights and adapters alone do not fit."""
    fixed = plan_memory(facts, pass_tokens=0, devices=devices, runs=runs, rank=rank).total
    free = device_bytes - fixed
    per_token = saved_bytes_per_token(facts.config, facts.dtype)
    per_logit = facts.vocab * 4 * LOGIT_COPIES
    if free <= 0:
        return 0
    tokens = free // (per_token + per_logit)  # the logits grow with the pass up to one chunk
    if tokens > facts.logit_chunk:
        tokens = (free - facts.logit_chunk * per_logit) // per_token
    return int(tokens) * devices
