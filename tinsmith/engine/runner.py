"""The model runner: one frozen base model with LoRA slots, and the batched forward pass.

A runner loads a Hugging Face causal LM from a local folder, freezes it, wraps its
projections in `MultiLoraLinear` layers (and, in a mixture-of-experts model, its sparse
blocks in `moe.MultiLoraMoe`, whose fused expert weights are `ExpertLora` targets), and
hands out adapter slots. Its one compute
primitive for training is `target_logprobs`: rows of (slot, datum) in, per-datum
log-probabilities of the targets out, with the autograd graph kept when asked.

Rows are sorted by slot so every slot's rows are contiguous (see lora.LoraContext), and
right-padded: with a causal mask a real token never attends to the padding after it, so
no attention mask is needed and SDPA takes its causal fast path.

The model lives on one device in one dtype (engine/device.py, `Placement`); token ids go to
the device once per pass, and logprobs come back float32 on the device (the trainer moves
results to the host). A synthetic model folder (no weights) is built with seeded random
weights directly on the device.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from tinsmith.engine import attention
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.compiled import CompiledPasses, decoder_layers, is_compile_error
from tinsmith.engine.device import Placement
from tinsmith.engine.families import FAMILIES
from tinsmith.engine.lora import LoraContext, MultiLoraLinear, RowGroup, inject_lora
from tinsmith.engine.moe import ExpertLora, inject_moe, moe_blocks
from tinsmith.engine.moe_routing import RoutingStats
from tinsmith.engine.vision import Prepared, Vision, is_vision_config
from tinsmith.types import DatumIn, SampleSpec

log = logging.getLogger("tinsmith.runner")

# Float32 logits one chunk of the unembedding may hold: [k, V] is never built whole for a big
# pass (16k positions x 128k vocabulary would be 8 GiB per copy), and under autograd each
# chunk is recomputed in the backward instead of kept.
LOGIT_CHUNK_BYTES = 256 * 2**20


def logit_chunk_positions(vocab_size: int) -> int:
    """Positions whose float32 logits one chunk of the unembedding holds (LOGIT_CHUNK_BYTES)."""
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))

SYNTHETIC_MARKER = "synthetic.json"  # a folder with this and no weights: random weights, built here


def load_base_model(model_dir: Path, config, placement: Placement) -> torch.nn.Module:
    """The folder's model in the placement's dtype, on its device. A synthetic folder
    (tinsmith/models/synthetic.py: config and tokenizer, no weights) gets seeded random
    weights of the config's shapes, made directly on the device (seconds, even for 8B)."""
    marker = model_dir / SYNTHETIC_MARKER
    # A vision-language model (Qwen3-VL) loads whole: vision tower, language model, lm_head.
    auto = AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM
    if placement.device.type == "meta":  # shapes only (a coordinator whose ranks hold the weights)
        with torch.device("meta"):
            return auto.from_config(config, dtype=placement.dtype, attn_implementation="sdpa")
    if marker.is_file() and not any(model_dir.glob("*.safetensors")):
        seed = int(json.loads(marker.read_text()).get("seed", 0))
        torch.manual_seed(seed)
        if placement.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        with torch.device(placement.device):
            return auto.from_config(config, dtype=placement.dtype, attn_implementation="sdpa")
    model = auto.from_pretrained(model_dir, dtype=placement.dtype, attn_implementation="sdpa")
    return model.to(placement.device)


class ModelRunner:
    """A base model shared by every adapter; adapters are attached to integer slots."""

    def __init__(
        self, model_dir: str | Path, name: str, placement: Placement | None = None,
        *, exact_packing: bool | None = None, compile_passes: str | Callable[..., object] | None = None,
    ) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self.placement = placement or Placement(torch.device("cpu"), torch.float32)
        # Exact (per-request block) packing by default only on a CPU: there it costs nothing
        # measurable, while on a GPU sharing the base GEMMs is the point of packing.
        self.exact_packing = (self.device.type == "cpu") if exact_packing is None else exact_packing
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.model = load_base_model(self.model_dir, self.config, self.placement)
        self.model.eval()  # no dropout: training and sampling see the same function
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.ctx = LoraContext(batched=not self.exact_packing)
        self.layers: dict[str, MultiLoraLinear | ExpertLora] = dict(inject_lora(self.model, self.ctx))
        family = FAMILIES.get(self.arch.lower())
        if family is not None and family.experts:  # MoE: sparse blocks -> moe.MultiLoraMoe
            self.layers.update(inject_moe(self.model, self.ctx, family.experts))
        self.moe_blocks = moe_blocks(self.model)  # empty for a dense model
        attention.install(self.model, self.ctx)
        # Vision-language: images are decoded by vision.py; the vision tower is frozen (no
        # LoRA) and attends over its own patch sequences, never in the runner's row groups.
        self.vision = Vision(self.model_dir, self.config) if is_vision_config(self.config) else None
        self._rope_offsets: torch.Tensor | None = None  # see rope_offsets()
        if self.vision is not None:
            self.model.model.language_model.register_forward_pre_hook(self._offset_positions,
                                                                      with_kwargs=True)
        self._slots: dict[int, Adapter] = {}
        self._slot_ids = itertools.count(1)
        self.logit_chunk = logit_chunk_positions(self.vocab_size)
        self._check_plain_unembedding()
        # Compiled shared passes (engine/compiled.py), `compile_passes` naming torch.compile's
        # backend; dense text models only (MoE blocks and vision inputs stay eager).
        self.compiled: CompiledPasses | None = None
        if compile_passes and not self.moe_blocks and self.vision is None and self.device.type != "meta":
            layers = decoder_layers(self.model)
            if layers is None:
                log.warning("%s: no uniform decoder layers at model.model.layers; passes stay eager", name)
            else:
                self.compiled = CompiledPasses(layers, compile_passes)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    def _check_plain_unembedding(self) -> None:
        """target_logprobs computes logits as lm_head(decoder output): make sure that is
        what this architecture's forward does (no logit scaling or soft-capping). A runner
        on the meta device has no values to compare: its rank processes check."""
        if self.device.type == "meta":
            return
        ids = torch.tensor([[1, 2, 3, 4]], device=self.device)
        with torch.no_grad():
            full = self.model(input_ids=ids, use_cache=False).logits.float()
            split = self.model.lm_head(self.model.model(input_ids=ids, use_cache=False).last_hidden_state).float()
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        if not torch.allclose(full, split, rtol=tol, atol=tol):
            raise ValueError(f"{self.name}: logits are not lm_head(hidden states); this model "
                             f"family ({self.arch}) is not supported")

    # ----- model facts ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.config.get_text_config().vocab_size)  # a VL config's text model's

    @property
    def max_context(self) -> int:
        return int(getattr(self.config.get_text_config(), "max_position_embeddings", 2048))

    @property
    def arch(self) -> str:
        return str(self.config.model_type)

    # ----- slots ----------------------------------------------------------------------
    def attach(self, adapter: Adapter) -> int:
        """Point every adapted layer's new slot at the adapter's tensors; return the slot."""
        slot = next(self._slot_ids)
        for path, w in adapter.weights.items():
            self.layers[path].adapters[slot] = w
        self._slots[slot] = adapter
        return slot

    def attached(self, slot: int) -> bool:
        return slot in self._slots

    def detach(self, slot: int) -> None:
        adapter = self._slots.pop(slot, None)
        if adapter is None:
            return
        for path in adapter.weights:
            self.layers[path].adapters.pop(slot, None)

    # ----- compute --------------------------------------------------------------------
    @staticmethod
    def _groups(
        slot_rows: Sequence[tuple[int | None, torch.Tensor]], parts: Sequence[int] | None = None
    ) -> list[RowGroup]:
        """Adjacent rows of one slot (and one part, when given) as RowGroups; with parts,
        each group's width is its own longest row."""
        keys = [(slot, parts[i] if parts is not None else 0) for i, (slot, _) in enumerate(slot_rows)]
        out, start = [], 0
        for (slot, _), group in itertools.groupby(keys):
            n = len(list(group))
            width = max(int(t.shape[0]) for _, t in slot_rows[start : start + n]) if parts is not None else None
            out.append(RowGroup(slot, n, width))
            start += n
        return out

    def _pad(self, slot_rows: Sequence[tuple[int | None, torch.Tensor]]) -> torch.Tensor:
        """Right-padded token ids [B, T] on the model's device (one host-to-device copy)."""
        width = max(int(t.shape[0]) for _, t in slot_rows)
        ids = torch.zeros(len(slot_rows), width, dtype=torch.long)
        for i, (_, t) in enumerate(slot_rows):
            ids[i, : t.shape[0]] = t
        return ids.to(self.device, non_blocking=True)

    def _model_rows(
        self, rows: Sequence[tuple[int | None, DatumIn]]
    ) -> tuple[list[tuple[int | None, torch.Tensor]], list[Prepared]]:
        """Each row's model token ids (images expanded into image tokens, vision.py) and the
        pass's prepared images in row-major order, as the model consumes them."""
        out: list[tuple[int | None, torch.Tensor]] = []
        images: list[Prepared] = []
        for i, (slot, d) in enumerate(rows):
            if d.images:
                assert self.vision is not None, "image inputs reached a text-only model"
                ids, prepared = self.vision.expand(d.tokens, d.images, f"datum {i}")
                images += prepared
            else:
                ids = d.tokens
            out.append((slot, torch.as_tensor(ids, dtype=torch.long)))
        return out, images

    # ----- vision-language sampling ---------------------------------------------------
    def prompt_ids(self, spec: SampleSpec) -> torch.Tensor:
        """A sampling prompt's model token ids [P] (images expanded; vision.py), on the host."""
        if not spec.images:
            return torch.as_tensor(np.asarray(spec.prompt), dtype=torch.long).reshape(-1)
        assert self.vision is not None, "image inputs reached a text-only model"
        return torch.as_tensor(self.vision.expand(spec.prompt, spec.images, "prompt")[0])

    def prefill_inputs(self, spec: SampleSpec, ids: torch.Tensor) -> tuple[dict[str, object], int]:
        """Extra keyword arguments of a whole-prompt prefill of ids [1, P] (pixel features and
        multimodal RoPE positions; none for a text prompt), and the prompt's RoPE delta: its
        decoding steps sit at position (cache length + delta), see rope_offsets()."""
        if not spec.images or self.vision is None:
            return {}, 0
        _, prepared = self.vision.expand(spec.prompt, spec.images, "prompt")
        extra, deltas = self.vision.model_inputs(self.model, ids, prepared)
        return extra, int(deltas[0])

    @contextmanager
    def rope_offsets(self, offsets: torch.Tensor | None) -> Iterator[None]:
        """Within: a decoding step's 2-D position ids [B, 1] are shifted by offsets [B] (each
        row's prompt RoPE delta) and given as multimodal RoPE's [3, B, 1], as HF's generate
        does with rope_deltas (kept off the shared model here). None: unchanged."""
        previous, self._rope_offsets = self._rope_offsets, offsets
        try:
            yield
        finally:
            self._rope_offsets = previous

    def _offset_positions(self, _module, args, kwargs):
        pos, offsets = kwargs.get("position_ids"), self._rope_offsets
        if offsets is None or pos is None or pos.dim() != 2 or pos.shape[0] != offsets.shape[0]:
            return None
        shifted = pos + offsets.to(pos.device)[:, None]  # [B, T]
        return args, {**kwargs, "position_ids": shifted[None].expand(3, -1, -1)}

    def logits(self, slot_rows: Sequence[tuple[int | None, torch.Tensor]]) -> torch.Tensor:
        """Logits [B, T, V] for right-padded token rows, each row under its slot: the plain
        dense path, kept as the reference the tests hold `target_logprobs` to.

        `slot_rows` must already be grouped by slot (equal slots adjacent).
        """
        with self.ctx.rows(self._groups(slot_rows)):
            return self.model(input_ids=self._pad(slot_rows), use_cache=False).logits

    def _head_logprobs(
        self, hidden: torch.Tensor, index: torch.Tensor, groups: list[RowGroup], separate: bool
    ) -> torch.Tensor:
        """log p(index) [k, K] (float32) from final hidden states [k, H] of k positions.
        `separate`: each group on its own (an exact packed pass), so every request's logits
        are exactly those of its own pass. Otherwise in chunks of `logit_chunk` positions:
        no [k, V] logits of the whole pass are ever built, and under autograd each chunk is
        recomputed in the backward (torch.utils.checkpoint) rather than kept."""
        if separate:
            parts, start = [], 0
            for g in groups:
                end = start + g.rows
                parts.append(self._head_logprobs(hidden[start:end], index[start:end], [g], False))
                start = end
            return torch.cat(parts)
        k = hidden.shape[0]
        if k <= self.logit_chunk:
            return self._head_chunk(hidden, index, groups)
        parts = []
        for start in range(0, k, self.logit_chunk):
            end = min(k, start + self.logit_chunk)
            fn = partial(self._head_chunk, groups=_slice_groups(groups, start, end))
            if torch.is_grad_enabled():
                parts.append(checkpoint(fn, hidden[start:end], index[start:end], use_reentrant=False))
            else:
                parts.append(fn(hidden[start:end], index[start:end]))
        return torch.cat(parts)

    def _head_chunk(self, hidden: torch.Tensor, index: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
        with self.ctx.rows(groups):  # set here, so a checkpointed recompute sees the same groups
            logits = self.model.lm_head(hidden)  # [k, V]
        # Float32 log-softmax (a no-op cast on a float32 model). log_softmax + gather: ~1.8x
        # faster fwd+bwd on CPU than gather - logsumexp.
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, index)

    def _decode(self, ids: torch.Tensor, extra: dict[str, object], groups: list[RowGroup],
                separate: bool) -> torch.Tensor:
        """The decoder's final hidden states [B, T, H] for padded ids [B, T] under `groups`:
        through the compiled layers when that applies (engine/compiled.py), else eager."""
        compiled = self.compiled
        if compiled is not None and compiled.applies(groups, separate):
            try:
                with self.ctx.rows(groups), compiled.active(groups, self.dtype):
                    return self.model.model(input_ids=ids, use_cache=False, **extra).last_hidden_state
            except Exception as e:
                if not is_compile_error(e):
                    raise
                compiled.disable(e)  # and the pass runs eagerly below
        with self.ctx.rows(groups, separate=separate):
            return self.model.model(input_ids=ids, use_cache=False, **extra).last_hidden_state

    def target_logprobs(
        self,
        rows: Sequence[tuple[int | None, DatumIn]],
        *,
        grad: bool,
        active: Sequence[np.ndarray | None] | None = None,
        parts: Sequence[int] | None = None,
        routing: RoutingStats | None = None,
    ) -> list[torch.Tensor]:
        """log p(target) per datum, float32 on the model's device: [N] for 1-D targets,
        [N, K] for 2-D ones.

        `routing` (MoE models): filled with every MoE block's routing of this pass, per row
        (moe_routing.py; its `request(rows)` takes indices into `rows`).

        Returned in the order of `rows`; internally rows are grouped by slot, and by `parts`
        (one id per row: the request it belongs to) when several requests share the pass.
        With `exact_packing`, each request's adapter computation then has the shapes it has
        alone (bitwise equal to its own pass); otherwise the base GEMMs run once over every
        row of the pass and each request's LoRA delta is a grouped matmul (equal within
        float tolerance). `active` (one bool [N] per row, None = every position) marks the
        positions whose logprob the loss can have a non-zero gradient for. With `grad`, only
        those go through the unembedding and log-softmax under autograd; the others are
        computed without it, which is exact (their gradient is zero) and skips their share
        of the [B, T, V] backward, e.g. every prompt position of an RL or preference batch.
        """
        part = (lambda i: parts[i]) if parts is not None else (lambda i: 0)
        order = sorted(range(len(rows)), key=lambda i: (rows[i][0] is None, rows[i][0] or 0, part(i)))
        slot_rows, images = self._model_rows([(rows[i][0], rows[i][1]) for i in order])
        targets = [torch.as_tensor(rows[i][1].inputs["target_tokens"], dtype=torch.long) for i in order]
        lengths = torch.tensor([t.shape[0] for t in targets])
        batch, width = len(rows), int(lengths.max())
        k_max = max(1 if t.dim() == 1 else t.shape[1] for t in targets)
        index = torch.zeros(batch, width, k_max, dtype=torch.long)  # [B, T, K]
        for b, t in enumerate(targets):
            index[b, : t.shape[0]] = t.reshape(t.shape[0], -1)
        valid = torch.arange(width)[None, :] < lengths[:, None]  # [B, T], False on padding
        hot = valid.clone() if grad else torch.zeros_like(valid)  # positions under autograd
        if grad and active is not None:
            for b, i in enumerate(order):
                if active[i] is not None:
                    hot[b, : lengths[b]] = torch.as_tensor(active[i], dtype=torch.bool)
        cold = valid & ~hot
        # Group sizes are read on the host (masks still there); the kernels get device copies.
        separate = parts is not None and self.exact_packing
        groups = self._groups(slot_rows, [part(i) for i in order] if separate else None)
        cold_groups, hot_groups = _counts(groups, cold), _counts(groups, hot)
        any_cold, any_hot = bool(cold.any()), bool(hot.any())
        dev = self.device
        index, cold, hot = (t.to(dev, non_blocking=True) for t in (index, cold, hot))
        if routing is not None and self.moe_blocks:
            tok_len = torch.tensor([int(t.shape[0]) for _, t in slot_rows])
            tok_valid = torch.arange(int(tok_len.max()))[None, :] < tok_len[:, None]  # [B, T]
            routing.start(tok_valid.to(dev, non_blocking=True), order, len(self.moe_blocks))
            self.ctx.routing = routing
        with torch.set_grad_enabled(grad):
            try:
                ids = self._pad(slot_rows)
                extra = self.vision.model_inputs(self.model, ids, images)[0] if images else {}
                hidden = self._decode(ids, extra, groups, separate)
            finally:
                self.ctx.routing = None
            lp_all = torch.zeros(batch, width, k_max, dtype=torch.float32, device=dev)  # [B, T, K]
            with torch.no_grad():
                if any_cold:
                    lp_all[cold] = self._head_logprobs(hidden[cold], index[cold], cold_groups, separate)
            if any_hot:
                # One gather over the whole batch: slicing [B, T, V] logits per datum would
                # make autograd materialise a full-size gradient buffer for every slice.
                lp_hot = self._head_logprobs(hidden[hot], index[hot], hot_groups, separate)
                lp_all = lp_all.index_put(hot.nonzero(as_tuple=True), lp_hot)
            out: list[torch.Tensor | None] = [None] * len(rows)
            for b, i in enumerate(order):
                t = targets[b]
                lp = lp_all[b, : t.shape[0]]  # [N, K]
                out[i] = lp[:, 0] if t.dim() == 1 else lp[:, : t.shape[1]]
        return out  # type: ignore[return-value]


def _counts(groups: list[RowGroup], mask: torch.Tensor) -> list[RowGroup]:
    """Row groups -> groups of the selected positions: mask [B, T] flattened row-major keeps
    each group's positions contiguous, so a group's count is its rows' selected positions."""
    out, start = [], 0
    for g in groups:
        out.append(RowGroup(g.slot, int(mask[start : start + g.rows].sum())))
        start += g.rows
    return out


def _slice_groups(groups: list[RowGroup], start: int, end: int) -> list[RowGroup]:
    """The row groups covering rows [start, end) of a pass, clipped to that range."""
    out, at = [], 0
    for g in groups:
        lo, hi = max(at, start), min(at + g.rows, end)
        if hi > lo:
            out.append(RowGroup(g.slot, hi - lo))
        at += g.rows
    return out
