"""PEFT naming and layout of per-expert LoRA factors (fused 3-D expert weights).

PEFT 0.21 adapts a 3-D parameter through `LoraConfig.target_parameters` (e.g.
`["experts.gate_up_proj", "experts.down_proj"]`) with a `ParamWrapper` that holds, for a
weight [E, out, in] (transformers' non-transposed expert layout), ONE pair of per-expert
factors of a common rank r and scale alpha / r:

- `lora_A.weight` [E * r, in]: expert-major, rows e * r .. e * r + r - 1 are expert e's A_e;
- `lora_B.weight` [out, r * E]: rank-major, column j * E + e is column j of expert e's B_e;

and adds `scale * B_e @ A_e` to expert e's weight (peft.tuners.lora.layer.ParamWrapper
.get_delta_weight). That is exactly Tinsmith's per-expert LoRA (A [E, r, in], B [E, out, r]).

Names: several targeted parameters of one module are nested wrappers, the first registered
parameter innermost, so with `gate_up_proj` then `down_proj` registered (Qwen3-MoE) both
targeted, PEFT saves
  `<block>.experts.base_layer.lora_{A,B}.weight`  (gate_up_proj)
  `<block>.experts.lora_{A,B}.weight`             (down_proj)
i.e. parameter i of n gets n - 1 - i `base_layer.` levels. (The order PEFT nests in is the
module's, not the config's; checked against PEFT in tests/test_moe.py.)

Everything here is pure naming and reshaping; engine/checkpoint.py calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

# The fused expert parameters Tinsmith adapts, in the order transformers registers them.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def is_expert_path(path: str) -> bool:
    """`<...>.experts.<fused parameter>`: an expert LoRA target's path (moe.ExpertLora)."""
    parent, _, leaf = path.rpartition(".")
    return leaf in EXPERT_PARAMS and parent.rpartition(".")[2] == "experts"


def peft_paths(paths: Iterable[str]) -> dict[str, str]:
    """Each LoRA target path -> the module path PEFT names its factors under: the path
    itself for a Linear, the nested-wrapper name for an expert parameter (see above)."""
    paths = list(paths)
    by_module: dict[str, list[str]] = {}
    for p in paths:
        if is_expert_path(p):
            by_module.setdefault(p.rpartition(".")[0], []).append(p.rpartition(".")[2])
    out = {p: p for p in paths if not is_expert_path(p)}
    for module, names in by_module.items():
        ordered = [n for n in EXPERT_PARAMS if n in names]
        for i, name in enumerate(ordered):
            out[f"{module}.{name}"] = module + ".base_layer" * (len(ordered) - 1 - i)
    return out


def target_parameters(paths: Iterable[str]) -> list[str]:
    """`LoraConfig.target_parameters` for the expert paths among `paths` (sorted)."""
    return sorted({"experts." + p.rpartition(".")[2] for p in paths if is_expert_path(p)})


def to_peft(t: torch.Tensor, factor: str) -> torch.Tensor:
    """A per-expert factor in PEFT's layout: A [E, r, in] -> [E * r, in]; B [E, out, r] ->
    [out, r * E] (column j * E + e). A 2-D factor is returned as it is."""
    if t.dim() != 3:
        return t
    E = t.shape[0]
    if factor == "A":
        return t.reshape(E * t.shape[1], t.shape[2])
    return t.permute(1, 2, 0).reshape(t.shape[1], t.shape[2] * E)


def from_peft(t: torch.Tensor, factor: str, num_experts: int) -> torch.Tensor:
    """The inverse of `to_peft` for a layer of `num_experts` experts; ValueError if the
    tensor's shape cannot hold E experts."""
    if t.dim() != 2 or (t.shape[0] if factor == "A" else t.shape[1]) % num_experts:
        raise ValueError(f"a per-expert lora_{factor} of shape {tuple(t.shape)} does not hold "
                         f"{num_experts} experts")
    if factor == "A":
        return t.reshape(num_experts, -1, t.shape[1])
    return t.reshape(t.shape[0], -1, num_experts).permute(2, 0, 1).contiguous()


def configured_paths(layers: Iterable[str], config: Mapping[str, Any]) -> list[str]:
    """The layer paths a PEFT config can name: every Linear and the expert parameters its
    `target_parameters` lists (all of them when it lists none, as our configs always do
    when they train experts), so that PEFT's nesting is rebuilt as it was written."""
    wanted = set(config.get("target_parameters") or [])
    return [p for p in layers if not is_expert_path(p) or not wanted
            or "experts." + p.rpartition(".")[2] in wanted]


KeyFn = Callable[[str, str], str]  # (layer path, "A" | "B") -> tensor name (checkpoint.peft_key)


def experts_to_peft(state: Mapping[str, torch.Tensor], key: KeyFn) -> dict[str, torch.Tensor]:
    """A state dict in Tinsmith's naming (every target under its own path, expert factors
    3-D) -> PEFT's: expert factors renamed and reshaped as PEFT saves them; others as are."""
    paths = {k.rpartition(".lora_")[0] for k in state}
    prefix = key("", "A").partition(".lora_")[0]  # what the key function puts before a path
    names = peft_paths(p.removeprefix(prefix) for p in paths)
    out = dict(state)
    for path, peft_path in names.items():
        if path == peft_path:
            continue
        for f in ("A", "B"):
            t = out.pop(key(path, f), None)
            if t is not None:
                out[key(peft_path, f)] = to_peft(t, f).contiguous()
    return out


def experts_from_peft(state: Mapping[str, torch.Tensor], layers: Mapping[str, Any],
                      config: Mapping[str, Any], key: KeyFn) -> dict[str, torch.Tensor]:
    """The inverse of `experts_to_peft` against a model's LoRA targets (`layers`, whose
    expert targets have `num_experts`), for a checkpoint written with PEFT `config`."""
    names = peft_paths(configured_paths(layers, config))
    out = dict(state)
    for path, peft_path in names.items():
        if path == peft_path:
            continue
        for f in ("A", "B"):
            t = out.pop(key(peft_path, f), None)
            if t is not None:
                out[key(path, f)] = from_peft(t, f, int(layers[path].num_experts))
    return out
