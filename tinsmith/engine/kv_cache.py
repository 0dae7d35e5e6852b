"""A preallocated KV cache (a slab) for continuous batching: rows join and leave without
copying the other rows' cache, and a decoding step writes one column per row in place.

Layout, per model: keys and values are each one tensor [layers, S, Hkv, C, D] in the model's
dtype and device (S slab rows, C columns, Hkv key/value heads, D head dim). Slab row s holds
one sequence: its token at position p is column p (no padding on the left, so a column is
a position id), and `lens[b]` columns are filled. Columns past a row's length hold zeros or
a departed row's old (finite) values and are masked out. S and C grow by doubling when a
join or a step needs more (one copy of the slab each time, so amortised O(1) per token);
the slab is dropped when the last row leaves.

Batch rows are not slab rows: the sampler keeps batch rows sorted by adapter slot (so LoRA
does one pair of small matmuls per slot, lora.LoraContext), while a joining row takes the
lowest free slab row. `rows[b]` maps batch row b to its slab row. The projections, MLP and
LoRA run over the B batch rows; attention (`SlabRoute.attend`, called through
engine/attention.py) scatters the B queries into the first `hi` slab rows, attends over the
slab's [hi, Hkv, W, D] view in place (W = the longest row after this step) with a per-row
length mask, and gathers the B outputs back: only [B, heads, D] activations move, never
the cache. Slab rows below `hi` that no batch row uses (holes) attend to column 0 only;
when holes outnumber live rows the top rows move down (`compact`, their own cache only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache


class SlabLayer:
    """One layer's view of the slab, for code that reads `cache.layers[i].keys` (tests, the
    legacy DecodeBatch's interface): keys/values [hi, Hkv, W, D], a view, not a copy."""

    is_sliding = False

    def __init__(self, slab: SlabCache, index: int) -> None:
        self.slab, self.index = slab, index

    @property
    def keys(self) -> torch.Tensor:
        return self.slab.k[self.index, : self.slab.hi, :, : self.slab.width]

    @property
    def values(self) -> torch.Tensor:
        return self.slab.v[self.index, : self.slab.hi, :, : self.slab.width]


class SlabCache(Cache):
    """The slab, as a transformers `Cache` for decoding steps (one new token per row).

    `update` writes the step's keys/values [B, Hkv, 1, D] at column lens[b] of slab row
    rows[b] and returns the [hi, Hkv, W, D] views attention reads. `prepare` sets rows, lens
    and W before each forward pass; the sampler's DecodeBatch interface is in SlabBatch.
    """

    def __init__(self, n_layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, rows: int = 8, cols: int = 64) -> None:
        super().__init__(layers=[])
        shape = (n_layers, rows, heads, cols, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, S, Hkv, C, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [SlabLayer(self, i) for i in range(n_layers)]  # type: ignore[misc]
        self.hi = 0  # slab rows [0, hi) take part in attention
        self.width = 0  # W: columns [0, W) are read
        self.flat_dev: torch.Tensor | None = None  # [B * Hkv] long, see prepare()

    @property
    def capacity(self) -> tuple[int, int]:
        """(S, C): slab rows and columns allocated."""
        return int(self.k.shape[1]), int(self.k.shape[3])

    def reserve(self, rows: int, cols: int) -> None:
        """Grow (by doubling) to at least `rows` slab rows and `cols` columns; one copy."""
        s, c = self.capacity
        if rows <= s and cols <= c:
            return
        while s < rows:
            s *= 2
        while c < cols:
            c *= 2
        old_k, old_v = self.k, self.v
        n, _, h, _, d = old_k.shape
        self.k = torch.zeros((n, s, h, c, d), dtype=old_k.dtype, device=old_k.device)
        self.v = torch.zeros_like(self.k)
        self.k[:, : old_k.shape[1], :, : old_k.shape[3]] = old_k
        self.v[:, : old_v.shape[1], :, : old_v.shape[3]] = old_v

    def write_prefix(self, slab_rows: list[int], layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefill's cache (per layer keys/values [1 or k, Hkv, P, D]) into columns
        [0, P) of each of `slab_rows` (k rows: a prompt's KV shared by its samples)."""
        idx = torch.tensor(slab_rows, dtype=torch.long, device=self.k.device)
        for i, (keys, values) in enumerate(layer_kv):
            p = keys.shape[2]
            self.k[i, :, :, :p].index_copy_(0, idx, keys.expand(len(slab_rows), -1, -1, -1).to(self.k.dtype))
            self.v[i, :, :, :p].index_copy_(0, idx, values.expand(len(slab_rows), -1, -1, -1).to(self.v.dtype))

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy slab row `src`'s first `length` columns to row `dst` (compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def prepare(self, rows: torch.Tensor, cols: torch.Tensor, hi: int, width: int) -> None:
        """Before a decoding step: batch row b writes column cols[b] of slab row rows[b]
        (both [B] long, on the device); attention reads slab rows [0, hi), columns [0, width).
        In a layer viewed as [S * Hkv * C, D], head h of that cell is vector
        (rows[b] * Hkv + h) * C + cols[b]: `flat_dev` [B * Hkv] lists them in key order."""
        _, _, heads, c, _ = self.k.shape
        h = torch.arange(heads, device=rows.device)
        self.flat_dev = ((rows[:, None] * heads + h[None, :]) * c + cols[:, None]).reshape(-1)
        self.hi, self.width = hi, width

    # ----- the transformers Cache interface used by a decoding step -----------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.flat_dev is not None and key_states.shape[2] == 1, "SlabCache decodes one token per row"
        k, v = self.k[layer_idx], self.v[layer_idx]  # [S, Hkv, C, D], contiguous
        d = k.shape[-1]
        # One index_copy_ of B * Hkv vectors into the flattened layer (see `prepare`).
        k.view(-1, d).index_copy_(0, self.flat_dev, key_states[:, :, 0].reshape(-1, d))
        v.view(-1, d).index_copy_(0, self.flat_dev, value_states[:, :, 0].reshape(-1, d))
        return k[: self.hi, :, : self.width], v[: self.hi, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.width, 0

    @property
    def is_compileable(self) -> bool:
        return False


class SlabRoute:
    """Where a decoding step's attention reads: set on every attention module of a model
    (engine/attention.py looks for it) and filled only during a slab forward pass."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # [B] slab row of each batch row; None: inactive
        self.hi = 0
        self.identity = False  # rows == arange(hi): no scatter/gather needed
        self.mask: torch.Tensor | None = None  # [hi, 1, 1, W] bool, True = attend; None: all

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, scaling: float | None) -> tuple[torch.Tensor, None]:
        """query [B, Hq, 1, D] (batch rows), key/value [hi, Hkv, W, D] (slab views) ->
        output [B, 1, Hq, D] as transformers expects from an attention function."""
        assert self.rows is not None
        _, hq, t, d = query.shape
        hkv = key.shape[1]
        if self.identity:
            q = query
        else:  # scatter the batch's queries into slab-row order; holes get zeros
            q = query.new_zeros(self.hi, hq, t, d).index_copy_(0, self.rows, query)
        # Grouped-query attention without repeating K/V: the G = Hq / Hkv query heads of a
        # key/value head become G query positions of that head ([hi, Hkv, G, D]).
        q = q.reshape(self.hi, hkv, (hq // hkv) * t, d)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=self.mask, scale=scaling)
        out = out.reshape(self.hi, hq, t, d)
        if not self.identity:
            out = out.index_select(0, self.rows)
        return out.transpose(1, 2), None


_ROUTE = "_tinsmith_slab_route"


def route_of(model: torch.nn.Module) -> SlabRoute:
    """The model's SlabRoute, installed on its attention modules the first time."""
    route = getattr(model, _ROUTE, None)
    if route is None:
        route = SlabRoute()
        for module in model.modules():
            if hasattr(module, "num_key_value_groups") or module.__class__.__name__.endswith("Attention"):
                setattr(module, _ROUTE, route)
        setattr(model, _ROUTE, route)
    return route


def slab_route(module: torch.nn.Module) -> SlabRoute | None:
    """The active route of an attention module, or None outside a slab forward pass."""
    route = getattr(module, _ROUTE, None)
    return route if route is not None and route.rows is not None else None
