"""Grouped expert computation of a mixture-of-experts MLP, with per-expert multi-LoRA.

The experts of a Qwen3-MoE-style block are two fused 3-D weights (transformers' layout):
`gate_up_proj` [E, 2I, H] (gate rows then up rows) and `down_proj` [E, H, I]. Every token
goes to its router's top-K experts: `y = sum_k w_k * down_e(act(gate_e(x)) * up_e(x))`.

An adapter holds one LoRA pair per expert per projection: A [E, r, in], B [E, out, r], so
expert e's projection becomes `W_e x + scale * B_e (A_e x)` (PEFT's per-expert layout, see
moe_checkpoint.py). Several adapters share a pass: token n belongs to adapter group
`token_group[n]` (one per row group of lora.LoraContext).

`experts_forward` is the production path and has no Python loop over experts: the (token,
expert) pairs are sorted by key `expert * G + group`, so each expert's pairs are contiguous
(base GEMM: E groups) and within an expert each adapter's pairs are too (LoRA GEMMs: E * G
groups). Each projection is then one grouped matmul (`torch.nn.functional.grouped_mm` where
the device, dtype and strides allow it) or, elsewhere, one bmm over zero-padded groups.
`experts_forward_loop` is the plain per-expert loop, kept as the reference tests compare to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tinsmith.engine.lora import LoraWeights

Act = Callable[[torch.Tensor], torch.Tensor]
# LoRA ranks are zero-padded to a multiple of this in the grouped path (exact: the padded
# columns add 0), so every operand's row stride is 16-byte aligned, as grouped_mm requires.
RANK_ALIGN = 8


def _aligned(t: torch.Tensor) -> bool:
    """Every non-unit stride and the base address are multiples of 16 bytes."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def _native_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel takes these operands: a CPU (any float dtype) or a
    CUDA device of compute capability >= 8.0 in bfloat16, with 16-byte aligned strides."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    return _aligned(x) and _aligned(w)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects an expanded (stride-0) incoming gradient, such as the
    # one a .sum() sends; a hook hands it a dense copy instead.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _padded_bmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm without the kernel: the G groups of rows of x [S, in] (group g is rows
    offs[g-1]:offs[g]) zero-padded to [G, n_max, in], one bmm with w [G, in, out], and the
    real rows gathered back. One host sync (n_max); memory G * n_max * in."""
    G, S = w.shape[0], x.shape[0]
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [G]
    group = torch.repeat_interleave(torch.arange(G, device=x.device), counts, output_size=S)
    pos = torch.arange(S, device=x.device) - (ends - counts)[group]  # row within its group
    n_max = max(1, int(counts.max()))
    padded = x.new_zeros(G, n_max, x.shape[1]).index_put((group, pos), x)
    return torch.bmm(padded, w)[group, pos]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, in] (rows sorted by group) @ w [G, in, out] per group -> [S, out]; `offs` [G]
    int32: cumulative row counts (empty groups allowed), offs[-1] == S."""
    if _native_ok(x, w):
        return _contiguous_grad(F.grouped_mm(x, w, offs=offs))
    return _padded_bmm(x, w, offs)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _stack_lora(loras: Sequence[LoraWeights | None], E: int, in_f: int, out_f: int,
                dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's per-expert factors as [E * G, in, r] and [E * G, r, out] (index
    e * G + g, the sort order), ranks zero-padded to a common aligned r, each group's
    scale folded into its B, cast to the activations' dtype (gradients reach the float32
    masters through the pad, scale and cast). A group without this layer adds zeros."""
    r = _round_up(max(w.A.shape[1] for w in loras if w is not None), RANK_ALIGN)
    As, Bs = [], []
    for w in loras:
        if w is None:
            As.append(torch.zeros(E, r, in_f, device=device))
            Bs.append(torch.zeros(E, out_f, r, device=device))
            continue
        pad = r - w.A.shape[1]
        As.append(F.pad(w.A, (0, 0, 0, pad)) if pad else w.A)
        Bs.append((F.pad(w.B, (0, pad)) if pad else w.B) * w.scale)
    A = torch.stack(As, 1).reshape(-1, r, in_f).to(dtype)  # [E*G, r, in]
    B = torch.stack(Bs, 1).reshape(-1, out_f, r).to(dtype)  # [E*G, out, r]
    return A.transpose(1, 2), B.transpose(1, 2)


def _project(x: torch.Tensor, base: torch.Tensor, offs_e: torch.Tensor,
             loras: Sequence[LoraWeights | None], offs_key: torch.Tensor) -> torch.Tensor:
    """Sorted pairs x [S, in] through their experts' base weight [E, out, in], plus each
    pair's adapter delta (grouped by expert and adapter)."""
    y = grouped_mm(x, base.transpose(1, 2), offs_e)  # [S, out]
    if len(loras) == 1 and loras[0] is not None and loras[0].A.shape[1] % RANK_ALIGN == 0:
        # One adapter of an aligned rank: its factors as they are (no stacked copy), the
        # scale on the rank-r intermediate; offs_key == offs_e here.
        w = loras[0]
        h = grouped_mm(x, w.A.to(x.dtype).transpose(1, 2), offs_e) * w.scale  # [S, r]
        return y + grouped_mm(h, w.B.to(x.dtype).transpose(1, 2), offs_e)
    if any(w is not None for w in loras):
        E, out_f, in_f = base.shape
        A_t, B_t = _stack_lora(loras, E, in_f, out_f, x.dtype, x.device)
        y = y + grouped_mm(grouped_mm(x, A_t, offs_key), B_t, offs_key)
    return y


def experts_forward(
    x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor,
    gate_up: torch.Tensor, down: torch.Tensor, act: Act,
    lora_gate_up: Sequence[LoraWeights | None], lora_down: Sequence[LoraWeights | None],
    token_group: torch.Tensor | None,
) -> torch.Tensor:
    """The experts' output [N, H] for tokens x [N, H] routed to top_idx [N, K] (long) with
    weights top_w [N, K]; gate_up [E, 2I, H], down [E, H, I]. `lora_*[g]`: adapter group g's
    factors (or None); `token_group` [N] long: each token's group (None: all group 0)."""
    N, K = top_idx.shape
    E, G = gate_up.shape[0], len(lora_gate_up)
    tok = torch.arange(N * K, device=x.device) // K  # [S]: the token of each pair
    key = top_idx.reshape(-1) * G  # [S]: expert-major, adapter group minor
    if token_group is not None:
        key = key + token_group[tok]
    perm = torch.sort(key, stable=True).indices
    counts = torch.zeros(E * G, dtype=torch.long, device=x.device).scatter_add_(
        0, key, torch.ones_like(key))  # pairs per (expert, group); no host sync
    offs_key = counts.cumsum(0).to(torch.int32)
    offs_e = counts.view(E, G).sum(1).cumsum(0).to(torch.int32)
    xs = x[tok[perm]]  # [S, H], sorted
    h = _project(xs, gate_up, offs_e, lora_gate_up, offs_key)  # [S, 2I]
    g, u = h.chunk(2, dim=-1)
    h = act(g) * u  # [S, I]
    y = _project(h, down, offs_e, lora_down, offs_key)  # [S, H]
    y = y * top_w.reshape(-1)[perm, None].to(y.dtype)
    # Back to (token, k) order and summed over k: a deterministic reduction (no atomics).
    unsorted = torch.empty_like(y).index_copy(0, perm, y)
    return unsorted.view(N, K, -1).sum(1).to(x.dtype)


def experts_forward_loop(
    x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor,
    gate_up: torch.Tensor, down: torch.Tensor, act: Act,
    lora_gate_up: Sequence[LoraWeights | None], lora_down: Sequence[LoraWeights | None],
    token_group: torch.Tensor | None,
) -> torch.Tensor:
    """The reference: `experts_forward` as a loop over adapter groups and experts, each
    pair's LoRA as `scale * (x A^T) B^T` on its own rows (transformers' eager loop, plus
    LoRA). For tests and CPU checks only: a GPU would launch E * G tiny GEMMs per layer."""
    N = top_idx.shape[0]
    out = torch.zeros_like(x)
    groups = token_group if token_group is not None else torch.zeros(N, dtype=torch.long, device=x.device)

    def proj(v: torch.Tensor, base: torch.Tensor, w: LoraWeights | None, e: int) -> torch.Tensor:
        y = F.linear(v, base[e])
        if w is not None:
            y = y + F.linear(F.linear(v, w.A[e].to(v.dtype)) * w.scale, w.B[e].to(v.dtype))
        return y

    for grp in range(len(lora_gate_up)):
        for e in range(gate_up.shape[0]):
            token, k = torch.where((top_idx == e) & (groups == grp)[:, None])
            if token.numel() == 0:
                continue
            g, u = proj(x[token], gate_up, lora_gate_up[grp], e).chunk(2, dim=-1)
            y = proj(act(g) * u, down, lora_down[grp], e) * top_w[token, k, None].to(x.dtype)
            out = out.index_add(0, token, y)
    return out
