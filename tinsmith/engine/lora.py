"""Multi-LoRA linear layers: one frozen base weight, many adapter slots.

Every adapted `nn.Linear` of the base model is replaced by a `MultiLoraLinear` that holds
a dict of adapter slots. All layers of one model share a `LoraContext` saying which slot
each batch row uses; rows are grouped by slot (contiguous ranges), so each group costs two
small matmuls on its own rows and the base matmul runs once for the whole batch.

Shapes: x [B, T, in] (HF passes 3-D activations; rows = dim 0), A [r, in], B [out, r].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Leaf module names per target family (Llama, Qwen2/3, Mistral and friends share these).
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
UNEMBED_TARGETS = ("lm_head",)


@dataclass
class LoraWeights:
    """One adapter's factors for one layer. `scale` = alpha / rank."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


class RowGroup(NamedTuple):
    """`rows` consecutive batch rows under adapter `slot` (None = base model only); in a
    separate pass, `width` is the group's own padded length (its longest row)."""

    slot: int | None
    rows: int
    width: int | None = None


class LoraContext:
    """Row -> slot assignment for the current forward pass, shared by all layers of a model.

    `groups` lists RowGroups in batch-row order; an empty list means base model only.
    `separate` marks a pass that packs several requests: every projection (and attention,
    see attention.py) is then computed per group on the block [rows, width] the request has
    alone, so each request's results and gradients are bitwise what its own pass gives. A
    shared matmul would be cheaper, but BLAS rounding depends on where a row falls in the
    matrix, and Adam's tiny default eps turns such rounding on near-zero gradients into
    visible weight differences.
    """

    def __init__(self) -> None:
        self.groups: list[RowGroup] = []
        self.separate = False

    @contextmanager
    def rows(
        self, groups: Sequence[tuple[int | None, int] | RowGroup], separate: bool = False
    ) -> Iterator[None]:
        previous = self.groups, self.separate
        self.groups = [RowGroup(*g) for g in groups if g[1] > 0]
        self.separate = separate and len(self.groups) > 1
        try:
            yield
        finally:
            self.groups, self.separate = previous


class MultiLoraLinear(nn.Module):
    """`base(x) + scale_s * (x @ A_s^T) @ B_s^T` for the slot s of each row group."""

    def __init__(self, base: nn.Linear, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        # Not nn.Parameters of this module: adapters own their tensors (and optimizer state),
        # so base-model parameters() never include them.
        self.adapters: dict[int, LoraWeights] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # HF code paths read .weight (e.g. a tied lm_head)
        return self.base.weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:  # and tie_weights() assigns it
        self.base.weight = value

    @staticmethod
    def _add_delta(y: torch.Tensor, x: torch.Tensor, w: LoraWeights) -> torch.Tensor:
        """y + scale * (x @ A^T) @ B^T, as one GEMM-with-add on 2-D views.

        The scale multiplies the rank-r intermediate, not the [.., out] result, and addmm
        folds the add into the second GEMM: ~15% off a LoRA forward+backward on CPU.
        """
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, w.A) * w.scale  # [rows, r]
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, w.B.t()).reshape(y.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.ctx.groups
        if self.ctx.separate:
            return self._separate(x, groups)
        # The view gathers this layer's two gradients (base and delta) before they join the
        # other layers reading the same input (q, k and v; gate and up), the order in which a
        # separate pass adds them, so both passes give bitwise the same input gradient.
        x = x.view_as(x)
        y = self.base(x)
        if not groups:
            return y
        if len(groups) == 1:  # fast path: the whole batch uses one slot, no slicing
            w = self.adapters.get(groups[0].slot) if groups[0].slot is not None else None
            return y if w is None else self._add_delta(y, x, w)
        assert sum(g.rows for g in groups) == x.shape[0], "LoraContext rows do not match batch"
        parts = []
        start = 0
        for g in groups:
            ys = y[start : start + g.rows]
            w = self.adapters.get(g.slot) if g.slot is not None else None
            parts.append(ys if w is None else self._add_delta(ys, x[start : start + g.rows], w))
            start += g.rows
        return torch.cat(parts, dim=0)

    def _separate(self, x: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
        """Each group on its own contiguous block [rows, width, in] of x [B, T, in], exactly
        as its own pass computes it; positions past a group's width (padding of longer
        groups) are zero. Assembled by cat, whose backward only slices (assigning into a
        preallocated output would copy the whole gradient once per group). Only the decoder
        body runs separate: the runner computes the unembedding group by group itself."""
        assert x.dim() == 3 and sum(g.rows for g in groups) == x.shape[0], "LoraContext rows do not match batch"
        parts = []
        start = 0
        for g in groups:
            rows = slice(start, start + g.rows)
            xs = x[rows, : g.width].contiguous()
            ys = self.base(xs)
            w = self.adapters.get(g.slot) if g.slot is not None else None
            parts.append(pad_positions(ys if w is None else self._add_delta(ys, xs, w), x.shape[1]))
            start += g.rows
        return torch.cat(parts, dim=0)


def pad_positions(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [rows, width, ...] on the right of dim 1 to [rows, length, ...]."""
    missing = length - t.shape[1]
    return t if missing == 0 else F.pad(t, [0, 0] * (t.dim() - 2) + [0, missing])


def inject_lora(model: nn.Module, ctx: LoraContext) -> dict[str, MultiLoraLinear]:
    """Wrap every candidate linear layer of `model` in place; return them by module path.

    Candidates are the attention, MLP and unembedding projections (by leaf name). Which of
    them a given adapter trains is decided per adapter (LoraSpec.train_*), not here.
    """
    wanted = set(ATTN_TARGETS + MLP_TARGETS + UNEMBED_TARGETS)
    found: dict[str, MultiLoraLinear] = {}
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in wanted and isinstance(module, nn.Linear):
            wrapped = MultiLoraLinear(module, ctx)
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, leaf, wrapped)
            found[path] = wrapped
    if not found:
        raise ValueError(f"no LoRA-targetable linear layers found in {type(model).__name__}")
    return found


def leaf_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]
