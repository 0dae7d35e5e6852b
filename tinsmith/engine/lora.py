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
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinsmith.engine.families import VISION_TOWER_PREFIX, family_for

if TYPE_CHECKING:
    from tinsmith.engine.moe_routing import RoutingStats


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

    def __init__(self, batched: bool = False) -> None:
        self.groups: list[RowGroup] = []
        self.separate = False
        # Several groups of equal rows take the batched (bmm) delta instead of a loop of
        # per-group GEMMs; off where results must stay bitwise those of today's CPU path.
        self.batched = batched
        # Set for one training pass: MoE blocks (moe.py) record their routing into it.
        self.routing: RoutingStats | None = None
        # Set for one graph decode step (engine/graph_decode.py): a bgmv.SlotTable whose
        # `apply(layer, x, y)` adds every row's delta in fixed shapes, replacing the groups.
        self.table = None

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
        # Set for one compiled pass (engine/compiled.py): the pass's G groups' factors stacked
        # in the activations' dtype, A [G, r, in] and B [G, out, r] with the scales folded in.
        # The layer then reads no row groups or adapter slots, so a compiled decoder layer has
        # nothing per-pass in its guards but these tensors' shapes.
        self.pass_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of this layer's LoRA factors A and B at `rank` (moe.ExpertLora has its own)."""
        return (rank, self.in_features), (self.out_features, rank)

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
        folds the add into the second GEMM: ~15% off a LoRA forward+backward on CPU. The
        float32 factors are cast to the activations' dtype for the GEMMs (a no-op on a
        float32 model); their gradients flow back to the float32 masters through the cast.
        """
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, w.A.to(x.dtype))  # [rows, r]
        if w.scale != 1.0:  # alpha = rank (the default) multiplies by exactly 1: no kernel
            h = h * w.scale
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, w.B.t().to(y.dtype)).reshape(y.shape)

    def group_weights(self, groups: Sequence[RowGroup]) -> list[LoraWeights | None]:
        """Each group's adapter of this layer (None: the base model, or not adapted here)."""
        return [self.adapters.get(g.slot) if g.slot is not None else None for g in groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pass_factors is not None:  # a compiled pass: G equal groups, factors stacked
            return _grouped_delta(self.base(x), x, *self.pass_factors)
        if self.ctx.table is not None:  # a static decode step (engine/bgmv.py)
            return self.ctx.table.apply(self, x, self.base(x))
        groups = self.ctx.groups
        if self.ctx.separate:
            return self._separate(x, groups)
        # The view gathers this layer's two gradients (base and delta) before they join the
        # other layers reading the same input (q, k and v; gate and up), the order in which a
        # separate pass adds them, so both passes give bitwise the same input gradient.
        x = x.view_as(x)
        y = self.base(x)  # one base GEMM over every row of the pass
        if not groups:
            return y
        if len(groups) == 1:  # fast path: the whole batch uses one slot, no slicing
            (w,) = self.group_weights(groups)
            return y if w is None else self._add_delta(y, x, w)
        assert sum(g.rows for g in groups) == x.shape[0], "LoraContext rows do not match batch"
        weights = self.group_weights(groups)
        if self.ctx.batched and len({g.rows for g in groups}) == 1 and sum(w is not None for w in weights) > 1:
            return self._batched_delta(y, x, weights)
        parts = []
        start = 0
        for g, w in zip(groups, weights):
            ys = y[start : start + g.rows]
            parts.append(ys if w is None else self._add_delta(ys, x[start : start + g.rows], w))
            start += g.rows
        return torch.cat(parts, dim=0)

    @staticmethod
    def _batched_delta(
        y: torch.Tensor, x: torch.Tensor, weights: list[LoraWeights | None]
    ) -> torch.Tensor:
        """Every group's LoRA delta in two batched GEMMs, for G groups of equal row counts:
        x viewed as [G, n, in] @ A_g^T [G, in, r] -> [G, n, r], times scale_g, @ B_g^T ->
        [G, n, out], added to y. A few kernels per layer whatever G is, instead of five per
        group. Ranks below the largest are zero-padded (exact: the padded columns add 0,
        and their gradients are sliced away); a group without this layer adds zeros."""
        A, B = stacked_factors(weights, x.shape[-1], y.shape[-1], x.dtype)
        # A group without this layer has zero factors: any scale serves it.
        scales = {w.scale for w in weights if w is not None}
        if len(scales) > 1:
            per_group = [w.scale if w is not None else 0.0 for w in weights]
            scale = torch.tensor(per_group, dtype=x.dtype).to(x.device, non_blocking=True)[:, None, None]
            return _grouped_delta(y, x, A, B, scale)
        return _grouped_delta(y, x, A, B, None if scales == {1.0} else scales.pop())

    def _separate(self, x: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
        """Each group on its own contiguous block [rows, width, in] of x [B, T, in], exactly
        as its own pass computes it; positions past a group's width (padding of longer
        groups) are zero. Assembled by cat, whose backward only slices (assigning into a
        preallocated output would copy the whole gradient once per group). Only the decoder
        body runs separate: the runner computes the unembedding group by group itself."""
        assert x.dim() == 3 and sum(g.rows for g in groups) == x.shape[0], "LoraContext rows do not match batch"
        parts = []
        start = 0
        for g, w in zip(groups, self.group_weights(groups)):
            rows = slice(start, start + g.rows)
            xs = x[rows, : g.width].contiguous()
            ys = self.base(xs)
            parts.append(pad_positions(ys if w is None else self._add_delta(ys, xs, w), x.shape[1]))
            start += g.rows
        return torch.cat(parts, dim=0)


class _StackFactors(torch.autograd.Function):
    """A stack of G factors [G, ...] (float32 masters) cast to the activations' dtype, whose
    backward casts and lays out the stack's gradient contiguously in one kernel. A bmm's
    gradient arrives transposed, and autograd would then copy it once per adapter before
    accumulating it (16 kernels a layer for 8 runs: over a third of a small packed pass's
    launches); laid out here, the stack's backward (unbind) gives each adapter a contiguous
    view that autograd accumulates without a copy."""

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.master = stacked.dtype
        # A view when no cast is needed: `.to` would return the input itself, and autograd
        # would then bypass this backward.
        return stacked.view_as(stacked) if dtype == stacked.dtype else stacked.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.empty(grad.shape, dtype=ctx.master, device=grad.device).copy_(grad), None


def _grouped_delta(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """y + (x @ A_g^T) * scale @ B_g^T for G equal groups of rows: x viewed as [G, n, in],
    A [G, r, in], B [G, out, r], `scale` a number or [G, 1, 1] (None: 1, no kernel)."""
    G = A.shape[0]
    h = torch.bmm(x.reshape(G, -1, x.shape[-1]), A.transpose(1, 2))  # [G, n, r]
    if scale is not None:
        h = h * scale
    return torch.baddbmm(y.reshape(G, -1, y.shape[-1]), h, B.transpose(1, 2)).reshape(y.shape)


def stacked_factors(weights: Sequence[LoraWeights | None], in_f: int, out_f: int, dtype: torch.dtype,
                    *, fold_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A [G, r, in] and B [G, out, r] in `dtype` for G groups' weights of one layer (at least
    one not None), ranks zero-padded to the largest; None: zeros. `fold_scales`: each B
    times its scale (otherwise the caller applies the scales)."""
    r = max(w.A.shape[0] for w in weights if w is not None)
    A = stack_factors([None if w is None else w.A for w in weights], (r, in_f), dtype)
    B = stack_factors([None if w is None else w.B if not fold_scales or w.scale == 1.0 else w.B * w.scale
                       for w in weights], (out_f, r), dtype)
    return A, B


def stack_factors(factors: list[torch.Tensor | None], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """[G, *shape] in `dtype` from G factors, each zero-padded on the right to `shape`
    (exact: padded rank columns add 0, and their gradients are sliced away); None: zeros."""
    like = next(f for f in factors if f is not None)
    parts = []
    for f in factors:
        if f is None:
            parts.append(like.new_zeros(shape))
        elif tuple(f.shape) != shape:
            parts.append(F.pad(f, (0, shape[1] - f.shape[1], 0, shape[0] - f.shape[0])))
        else:
            parts.append(f)
    return _StackFactors.apply(torch.stack(parts), dtype)


def pad_positions(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [rows, width, ...] on the right of dim 1 to [rows, length, ...]."""
    missing = length - t.shape[1]
    return t if missing == 0 else F.pad(t, [0, 0] * (t.dim() - 2) + [0, missing])


def inject_lora(
    model: nn.Module, ctx: LoraContext, model_type: str | None = None
) -> dict[str, MultiLoraLinear]:
    """Wrap every candidate linear layer of `model` in place; return them by module path.

    Candidates are the attention, MLP and unembedding projections of the model's family
    (families.py, by `model_type`, default `model.config.model_type`), matched by leaf name.
    Which of them a given adapter trains is decided per adapter (LoraSpec.train_*), not here.
    ValueError for a refused or unknown family (see families.family_for for the fallback).
    """
    model_type = model_type or str(model.config.model_type)  # type: ignore[union-attr]
    linear_leaves = {p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                     if isinstance(m, nn.Linear)}
    family = family_for(model_type, linear_leaves)
    wanted = set(family.leaves)
    found: dict[str, MultiLoraLinear] = {}
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if path.startswith(VISION_TOWER_PREFIX):  # a VL model's vision tower stays frozen
            continue
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
