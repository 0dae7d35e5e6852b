"""A static adapter-slot table for the graph decode step (engine/graph_decode.py): the LoRA
delta of many adapters in one batch, with shapes and addresses that do not change from step
to step, so one captured CUDA graph serves any mix of adapters.

The eager path (lora.MultiLoraLinear) runs one pair of matmuls per run of rows sharing a
slot, a Python-side grouping that changes whenever a row joins or leaves. Here instead:

- the table has N "table slots" (a power of two) holding the factors of the adapters whose
  rows are in the batch, per adapted layer concatenated along the rank:
  A_cat [N * r, in] and B_cat [out, N * r], r the largest rank (smaller ranks zero-padded,
  which adds exact zeros), each adapter's `scale` folded into its B block;
- each batch row selects its table slot through one row of `onehot` [Bp, N] (1.0 at its
  slot, all zeros for base-model rows and bucket padding), shared by every layer;
- per layer: h = x @ A_cat^T [Bp, N * r], masked by the one-hot per rank block, then
  y += h @ B_cat^T. Two fixed-shape GEMMs whatever the mix (the "segment-free" form of a
  BGMV kernel: it reads each adapter's factors once, where gathering factors per row would
  read them once per row, at the price of N times the rank-r flops, small next to the base
  GEMM for the few adapters a batch holds).

A new adapter in a slot only copies its factors into the table's tensors in place (no
recapture); the tensors are reallocated (`generation` increases, graphs must be recaptured)
only when N or r must grow. Factors are kept in the model's dtype, on its device.
A slot's copy is refreshed when its adapter's tensors change: served samplers hold frozen
copies that never do, but a slot sampled directly while it trains is updated in place by
each optimizer step, which bumps the version counter of every factor; the first and last
layer's are checked every step (checking all ~200 layers cost ~1 ms a step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinsmith.engine.lora import LoraWeights, MultiLoraLinear


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


class SlotTable:
    """Stacked LoRA factors of up to N adapters for every adapted linear layer of a model."""

    def __init__(self, layers: dict[str, MultiLoraLinear], dtype: torch.dtype, device: torch.device) -> None:
        self.layers = layers  # module path -> layer (runner.layers)
        self.dtype, self.device = dtype, device
        self.n = 0  # N table slots allocated (0: no LoRA in the step)
        self.rank = 0  # r: rank columns per table slot
        self.generation = 0  # bumped whenever the factor tensors are reallocated
        # Per layer module: (A_cat [N*r, in], B_cat [out, N*r]); looked up by the module itself.
        self.factors: dict[MultiLoraLinear, tuple[torch.Tensor, torch.Tensor]] = {}
        self.holder: list[int | None] = []  # [N] runner slot held by each table slot
        self._stamp: list[tuple | None] = []  # [N] what was copied (see _signature)
        self._held: list[list[tuple[MultiLoraLinear, LoraWeights]]] = []  # [N] its factors
        self.onehot: torch.Tensor | None = None  # [Bp, N], set by the step for one pass

    # ----- assignment -------------------------------------------------------------------
    def assign(self, slots: Sequence[int | None]) -> list[int]:
        """Table slots for the runner `slots` of a step's rows (None = base model -> -1),
        loading adapters not yet in the table (evicting ones the step does not use) and
        refreshing copies whose weights changed. An adapter is read from the layers' own
        slot entries (lora.MultiLoraLinear.adapters), as the eager path reads it."""
        wanted = list(dict.fromkeys(s for s in slots if s is not None))
        where = {s: i for i, s in enumerate(self.holder) if s is not None}
        new = {s: self._weights(s) for s in wanted if s not in where}  # read once per entry
        rank = max((int(w.A.shape[0]) for ws in new.values() for _, w in ws), default=0)
        if len(wanted) > self.n or rank > self.rank:
            held = {s: self._held[i] for s, i in where.items() if s in wanted}
            self._grow(pow2(len(wanted)) if wanted else 0, pow2(rank) if rank else 0)
            where, new = {}, {**held, **new}
        free = [i for i, s in enumerate(self.holder) if s is None or s not in wanted]
        out: dict[int, int] = {}
        for s in wanted:
            i = where.get(s)
            if i is None:
                i = free.pop(0)
                self.holder[i], self._held[i], self._stamp[i] = s, new[s], None
            sig = _signature(self._held[i])
            if self._stamp[i] != sig:
                self._load(i, self._held[i])
                self._stamp[i] = sig
            out[s] = i
        return [out[s] if s is not None else -1 for s in slots]

    def _grow(self, n: int, rank: int) -> None:
        """Reallocate for max(n, N) slots of rank max(rank, r); copies are reloaded lazily."""
        self.n, self.rank = max(n, self.n), max(rank, self.rank)
        self.generation += 1
        self.holder = [None] * self.n
        self._stamp = [None] * self.n
        self._held = [[] for _ in range(self.n)]
        self.factors = {}
        if self.n == 0:
            return
        width = self.n * self.rank
        for layer in self.layers.values():
            if not isinstance(layer, MultiLoraLinear):
                continue  # MoE experts (moe.ExpertLora): the graph step refuses such models
            a = torch.zeros((width, layer.in_features), dtype=self.dtype, device=self.device)
            b = torch.zeros((layer.out_features, width), dtype=self.dtype, device=self.device)
            self.factors[layer] = (a, b)

    def _weights(self, slot: int) -> list[tuple[MultiLoraLinear, LoraWeights]]:
        """The (layer, factors) pairs of runner slot `slot`, in layer order."""
        return [(layer, layer.adapters[slot]) for layer in self.layers.values()
                if isinstance(layer, MultiLoraLinear) and slot in layer.adapters]

    def _load(self, i: int, weights: list[tuple[MultiLoraLinear, LoraWeights]]) -> None:
        """Copy an adapter's factors into table slot i (in place; zeros where it has none)."""
        r0, r1 = i * self.rank, (i + 1) * self.rank
        for a, b in self.factors.values():
            a[r0:r1].zero_()
            b[:, r0:r1].zero_()
        for layer, w in weights:
            a, b = self.factors[layer]
            r = w.A.shape[0]
            a[r0 : r0 + r].copy_(w.A.detach())
            b[:, r0 : r0 + r].copy_(w.B.detach() * w.scale)

    # ----- the delta, inside a step -------------------------------------------------------
    def apply(self, layer: MultiLoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the LoRA delta of each row's table slot: x [Bp, T, in], y [Bp, T, out]."""
        pair = self.factors.get(layer)
        if pair is None or self.onehot is None:
            return y
        a, b = pair
        rows, t = x.shape[0], x.shape[1]
        h = torch.nn.functional.linear(x.reshape(rows, t, -1), a)  # [Bp, T, N*r]
        h = (h.view(rows, t, self.n, self.rank) * self.onehot[:, None, :, None]).view(rows, t, -1)
        return y + torch.nn.functional.linear(h, b)  # [Bp, T, out]


def _signature(weights: list[tuple[MultiLoraLinear, LoraWeights]]) -> tuple:
    """Identity and version counters of the first and last layer's factors: equal while
    nothing wrote them (an optimizer step's in-place update bumps every layer's)."""
    ends = (weights[0], weights[-1]) if weights else ()
    return tuple((id(w.A), w.A._version, id(w.B), w.B._version, w.scale) for _, w in ends)
