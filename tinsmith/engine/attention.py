"""Grouped attention: when several requests share a training pass, each request's rows attend
over exactly its own width, as they would alone.

A packed pass right-pads every row to the longest request. With a causal mask the padding
never changes a real token's result in exact arithmetic, but the attention kernel's blocking
follows the padded length, so float rounding would differ from the request's own pass (about
1e-7) and Adam, with its tiny default eps, can turn such rounding on a near-zero gradient
into a visible weight difference. So in a separate pass (lora.LoraContext.separate) this
attention function, registered with transformers under `NAME` and used by the runner's model,
runs SDPA once per request group (lora.RowGroup) on the [rows, heads, width, dim] block the
request has alone; positions past a group's width (padding) get zeros.

A decoding step over the preallocated KV slab (engine/kv_cache.py) attends through the slab's
route instead: its queries are batch rows, its keys and values slab rows (see kv_cache).

Everything else goes to transformers' own SDPA function unchanged: single-request passes,
sampling prefills, legacy decoding steps (which bring their own 4-D mask), so those stay
bitwise what they were. Shapes: query/key/value [B, heads, T, D]; output [B, T, heads, D] as HF expects.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tinsmith.engine.families import VISION_TOWER_PREFIX
from tinsmith.engine.kv_cache import slab_route
from tinsmith.engine.lora import LoraContext, pad_positions

NAME = "tinsmith_grouped_sdpa"


def _attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, **kwargs,
) -> tuple[torch.Tensor, None]:
    route = slab_route(module)
    if route is not None:
        return route.attend(module, query, key, value, kwargs.get("scaling"))
    ctx: LoraContext | None = getattr(module, _CTX, None)
    T = query.shape[2]
    if ctx is None or not ctx.separate or attention_mask is not None or key.shape[2] != T:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    parts = []
    start = 0
    for g in ctx.groups:
        rows, cols = slice(start, start + g.rows), slice(0, g.width)
        part, _ = sdpa_attention_forward(
            module, _solo_layout(query[rows, :, cols]), _solo_layout(key[rows, :, cols]),
            _solo_layout(value[rows, :, cols]), None, **kwargs,
        )
        parts.append(pad_positions(part, T))  # [rows, T, heads, D]
        start += g.rows
    return torch.cat(parts, dim=0), None


def _solo_layout(t: torch.Tensor) -> torch.Tensor:
    """A [rows, heads, width, D] block laid out as the request's own pass lays it out: the
    attention layer transposes a contiguous [rows, width, heads, D] projection, and the
    kernel's path (and rounding) depends on those strides."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


# The registry is process-wide, so the function is registered once and finds each model's
# row groups on the attention module itself (several models may share the process).
_CTX = "_tinsmith_row_groups"
AttentionInterface.register(NAME, _attention)


def install(model: torch.nn.Module, ctx: LoraContext) -> None:
    """Make `model` attend through grouped SDPA, reading the row groups from `ctx`. A VL
    model's vision tower is left out: it attends over its own patch sequences, never in the
    runner's row groups (it has no context, so it takes the plain path)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        raise ValueError(f"{model.config.model_type}: expected SDPA attention, found "
                         f"{model.config._attn_implementation!r}")
    for path, module in model.named_modules():
        if path.startswith(VISION_TOWER_PREFIX):
            continue
        if hasattr(module, "num_key_value_groups") or module.__class__.__name__.endswith("Attention"):
            setattr(module, _CTX, ctx)
    model.set_attn_implementation(NAME)
