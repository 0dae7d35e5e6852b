"""Continuous batching over the preallocated KV slab (engine/kv_cache.py): the decoding
state of every live row, with the same interface as decode.DecodeBatch (join, forward,
keep, clear, rows, width, slots, cache), so the sampler drives either.

Per step the only cache traffic is one new column per row, written in place; a joining
request copies its prompt's KV (one prefill, batch 1) into each of its sample rows, and a
leaving row just frees its slab row. Bookkeeping (lengths, slab rows, adapter slots) stays
on the host; the model's inputs go to the device once per step.

A row's logits differ from decoding it alone by float rounding only (its attention reads a
wider, masked slab view; matmuls run over more rows), as with DecodeBatch.

With a `GraphDecoder` (engine/graph_decode.py) the step runs in static shapes (rows padded
to a bucket, attention over a bucketed view of the slab, the LoRA delta from a slot table),
captured in CUDA graphs on a GPU. The slab is then kept (not dropped) when the last row
leaves, so its graphs stay valid.
"""

from __future__ import annotations

import itertools

import torch
from transformers import DynamicCache

from tinsmith.engine.graph_decode import GraphDecoder
from tinsmith.engine.kv_cache import SlabCache, route_of
from tinsmith.engine.runner import ModelRunner


class SlabBatch:
    """Rows decoding together under one model; touched only by the model's worker thread."""

    def __init__(self, runner: ModelRunner, graphs: GraphDecoder | None = None) -> None:
        self.runner = runner
        self.route = route_of(runner.model)
        self.graphs = graphs  # None: the eager step below
        self._slab: SlabCache | None = None
        self.clear()

    def clear(self, keep_slab: bool = False) -> None:
        """No rows (at start, when the last row leaves, and after a failed step): the slab
        goes, unless `keep_slab` (static steps: its captured graphs stay valid)."""
        if not keep_slab:
            self._slab = None
        self.slots: list[int | None] = []  # [B] adapter slot per batch row
        self.slab_rows: list[int] = []  # [B] slab row per batch row
        self.lens = torch.zeros(0, dtype=torch.long)  # [B] filled columns = next position id
        self.next_tok = torch.zeros(0, dtype=torch.long)  # [B] token each row feeds next
        self._used: set[int] = set()  # occupied slab rows

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        """The columns the longest live row fills."""
        return int(self.lens.max()) if self.rows else 0

    @property
    def cache(self) -> SlabCache | None:
        """The slab (None while no row decodes); its layers' keys/values are [hi, Hkv, W, D]."""
        if self._slab is not None:
            self._slab.hi, self._slab.width = self._hi(), self.width
        return self._slab

    def _hi(self) -> int:
        return max(self._used) + 1 if self._used else 0

    def _free_rows(self, k: int) -> list[int]:
        """The k lowest free slab rows."""
        out: list[int] = []
        for r in itertools.count():
            if len(out) == k:
                return out
            if r not in self._used:
                out.append(r)
        raise AssertionError("unreachable")

    def join(self, cache: DynamicCache, length: int, tokens: torch.Tensor, slot: int | None, at: int) -> None:
        """Insert k new rows before batch row `at`: `cache` holds their prefix (per layer
        [1 or k, Hkv, length, D]; one row is shared by all k) and `tokens` [k] the token
        each feeds next."""
        k = int(tokens.shape[0])
        layer_kv = [(layer.keys, layer.values) for layer in cache.layers]
        if self._slab is None:
            _, heads, _, head_dim = layer_kv[0][0].shape
            self._slab = SlabCache(len(layer_kv), heads, head_dim, self.runner.dtype, self.runner.device,
                                   rows=max(8, k), cols=max(64, length + 1))
        new = self._free_rows(k)
        self._slab.reserve(max(new) + 1, length + 1)
        self._slab.write_prefix(new, layer_kv)
        self._used.update(new)
        self.slab_rows[at:at] = new
        self.slots[at:at] = [slot] * k
        self.lens = torch.cat([self.lens[:at], torch.full((k,), length, dtype=torch.long), self.lens[at:]])
        self.next_tok = torch.cat([self.next_tok[:at], tokens, self.next_tok[at:]])

    def forward(self) -> torch.Tensor:
        """Feed every row its next token; fp32 logits [B, V] (on the host) of the token after it."""
        slab = self._slab
        assert slab is not None and self.rows, "forward() on an empty batch"
        missing = {s for s in self.slots if s is not None and not self.runner.attached(s)}
        if missing:
            raise RuntimeError(f"adapter slots {sorted(missing)} were detached while decoding")
        dev = self.runner.device
        hi, width = self._hi(), self.width + 1  # after this step the longest row has width cols
        if self.graphs is not None:  # it reserves the (bucketed) view it reads itself
            logits = self.graphs.step(slab, self.next_tok, self.lens, self.slab_rows, self.slots)
            self.lens = self.lens + 1
            return logits
        slab.reserve(hi, width)
        rows = torch.tensor(self.slab_rows, dtype=torch.long)
        identity = self.slab_rows == list(range(hi))
        mask = None  # no holes and every row as long as the longest: nothing to mask
        if not identity or not bool((self.lens == width - 1).all()):
            # [hi, W] True where a slab row attends: its filled columns and the one written
            # now; holes (free rows below hi) attend to column 0 only, so softmax stays finite.
            limit = torch.ones(hi, dtype=torch.long)
            limit[rows] = self.lens + 1
            mask = (torch.arange(width)[None, :] < limit[:, None])[:, None, None, :].to(dev)
        rows_dev = rows.to(dev)
        slab.prepare(rows_dev, self.lens.to(dev), hi, width)
        route = self.route
        route.rows, route.hi, route.mask, route.identity = rows_dev, hi, mask, identity
        groups = [(slot, len(list(g))) for slot, g in itertools.groupby(self.slots)]
        try:
            with self.runner.ctx.rows(groups):
                out = self.runner.model(
                    input_ids=self.next_tok[:, None].to(dev), position_ids=self.lens[:, None].to(dev),
                    attention_mask=mask, past_key_values=slab, use_cache=True,
                )
        finally:
            route.rows = route.mask = None
            slab.flat_dev = None
        self.lens = self.lens + 1
        return out.logits[:, -1].float().cpu()

    def keep(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Keep only batch `rows` (ascending), which feed `tokens` [len(rows)] next; the
        others' slab rows are freed (nothing is copied)."""
        if not rows:
            self.clear(keep_slab=self.graphs is not None)
            return
        if len(rows) < self.rows:
            gone = set(range(self.rows)) - set(rows)
            self._used.difference_update(self.slab_rows[b] for b in gone)
            self.slab_rows = [self.slab_rows[b] for b in rows]
            self.slots = [self.slots[b] for b in rows]
            self.lens = self.lens[torch.tensor(rows, dtype=torch.long)]
            self.compact()
        self.next_tok = tokens

    def compact(self) -> None:
        """When holes below hi outnumber live rows (plus a margin), move the rows above B
        into the lowest holes: each moved row copies only its own columns."""
        b, hi = self.rows, self._hi()
        if self._slab is None or hi <= max(2 * b, b + 8):
            return
        for i, r in enumerate(self.slab_rows):
            if r >= b:
                (dst,) = self._free_rows(1)
                self._slab.move_row(r, dst, int(self.lens[i]))
                self._used.discard(r)
                self._used.add(dst)
                self.slab_rows[i] = dst
