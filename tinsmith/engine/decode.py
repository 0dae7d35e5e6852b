"""The shared decoding state of continuous batching: every row still decoding, whatever
request, adapter or prompt length it came from, in one left-padded KV cache.

Rows join after their request's own prefill (its private cache is padded on the left and
inserted), take one token per `forward()`, and leave as soon as they stop (`keep()`), so a
short request never waits for a long one and a new one never waits for the batch to drain.

Layout, for B rows and L cache columns (shapes of every cache layer's keys and values:
[B, Hkv, L, D]):
- row b's real tokens fill the LAST `len_b` columns; the columns before them are padding,
  zeros in the cache (so masked scores stay finite) and False in `valid` [B, L];
- `pos` [B] is the position id of the token each row feeds next (its real length), so
  rotary embeddings see every row at its own position, never at a padded one;
- when no row has padding the attention mask is left out, which is exactly the path a
  request decoding alone takes (bitwise the same as an unbatched decode);
- `slots` [B] are the rows' adapter slots; the sampler keeps rows of a slot adjacent, so the
  LoRA layers do one pair of small matmuls per slot (lora.LoraContext groups).
A row's logits differ from an unbatched decode only by float rounding: the masked attention
path and matmuls over more rows round differently (about 1e-6 relative; a few 1e-5 absolute
on the bundled model's logits).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tinsmith.engine.runner import ModelRunner


def mergeable(cache: DynamicCache) -> bool:
    """True when the cache's layers are plain full-attention layers whose rows can be padded
    and concatenated (sliding-window and other special layers decode one request at a time)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class DecodeBatch:
    """Rows decoding together under one model; touched only by the model's worker thread."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.clear()

    def clear(self) -> None:
        """No rows (at start, when the last row leaves, and after a failed step)."""
        self.cache: DynamicCache | None = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [B, L]
        self.pos = torch.zeros(0, dtype=torch.long)  # [B]
        self.next_tok = torch.zeros(0, dtype=torch.long)  # [B]
        self.slots: list[int | None] = []  # [B]

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        """L: the cache columns every row attends over (the longest live row)."""
        return int(self.valid.shape[1])

    def join(self, cache: DynamicCache, length: int, tokens: torch.Tensor, slot: int | None, at: int) -> None:
        """Insert k new rows before row `at`: `cache` holds their prefix ([k, Hkv, length, D]
        per layer, no padding) and `tokens` [k] the token each feeds next."""
        k = int(tokens.shape[0])
        new_valid = torch.ones(k, length, dtype=torch.bool)
        new_pos = torch.full((k,), length, dtype=torch.long)
        if self.cache is None:
            self.cache, self.valid, self.pos, self.next_tok = cache, new_valid, new_pos, tokens.clone()
            self.slots = [slot] * k
            return
        width = max(self.width, length)

        def splice(old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
            # Left-pad both to `width` columns along `dim`, then insert `new` at row `at`.
            old, new = _left_pad(old, width, dim), _left_pad(new, width, dim)
            return torch.cat([old[:at], new, old[at:]], dim=0)

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = splice(mine.keys, theirs.keys, 2)
            mine.values = splice(mine.values, theirs.values, 2)
        self.valid = splice(self.valid, new_valid, 1)
        self.pos = torch.cat([self.pos[:at], new_pos, self.pos[at:]])
        self.next_tok = torch.cat([self.next_tok[:at], tokens, self.next_tok[at:]])
        self.slots[at:at] = [slot] * k

    def forward(self) -> torch.Tensor:
        """Feed every row its next token; fp32 logits [B, V] (on the host) of the token after it."""
        assert self.cache is not None, "forward() on an empty batch"
        # A row whose adapter was detached would silently decode with the base model.
        missing = {s for s in self.slots if s is not None and not self.runner.attached(s)}
        if missing:
            raise RuntimeError(f"adapter slots {sorted(missing)} were detached while decoding")
        padded = not bool(self.valid.all())
        self.valid = torch.cat([self.valid, torch.ones(self.rows, 1, dtype=torch.bool)], dim=1)
        # A 4-D mask goes to attention as is (True = attend); HF builds none of its own.
        dev = self.runner.device  # bookkeeping stays on the host; the model's inputs go over
        mask = self.valid[:, None, None, :].to(dev) if padded else None
        groups = [(slot, len(list(g))) for slot, g in itertools.groupby(self.slots)]
        with self.runner.ctx.rows(groups):
            out = self.runner.model(
                input_ids=self.next_tok[:, None].to(dev), position_ids=self.pos[:, None].to(dev),
                attention_mask=mask, past_key_values=self.cache, use_cache=True,
            )
        self.pos = self.pos + 1
        return out.logits[:, -1].float().cpu()

    def keep(self, rows: list[int], tokens: torch.Tensor) -> None:
        """Keep only `rows` (ascending), which feed `tokens` [len(rows)] next; drop the
        columns no remaining row uses, so L stays the longest live row."""
        if not rows:
            self.clear()
            return
        if len(rows) < self.rows:
            index = torch.tensor(rows, dtype=torch.long)
            assert self.cache is not None
            self.cache.batch_select_indices(index.to(self.runner.device))
            self.valid, self.pos = self.valid[index], self.pos[index]
            self.slots = [self.slots[r] for r in rows]
            first = int(self.valid.any(dim=0).to(torch.int8).argmax())  # first column in use
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]
                self.valid = self.valid[:, first:]
        self.next_tok = tokens


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero/False-pad tensor `t` on the left of dimension `dim` (counted from the front)
    up to `width` entries."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]  # F.pad lists dims from the last
    return F.pad(t, pad)
