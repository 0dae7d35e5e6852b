"""Mixture-of-experts blocks with multi-LoRA experts (the Qwen3-MoE and Mixtral layout).

A sparse MoE block of transformers (`Qwen3MoeSparseMoeBlock`: a top-k router `gate` with a
[E, H] weight, and `experts` holding the fused 3-D weights `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]) is replaced in place by a `MultiLoraMoe` that keeps the same router
and weights (same state-dict names) and computes the experts with moe_kernels.py: grouped,
with every row group's adapter applied per expert.

LoRA targets: each fused expert weight gets an `ExpertLora`, the analogue of a
`MultiLoraLinear` for the adapter machinery (runner.layers, Adapter, checkpoints): a dict of
adapter slots whose factors are A [E, r, in], B [E, out, r] (one pair per expert). Its path
is the parameter's, e.g. `model.layers.0.mlp.experts.gate_up_proj`, so its leaf name is
the family's expert parameter name (families.py, trained with `train_mlp`).

The router stays frozen and is not a LoRA target (it is a bare [E, H] parameter, as in the
hosted service, whose exported adapters hold no router weights). Routing is transformers'
own code (`gate(hidden)`); gradients flow through the routing weights into the hidden
states, as in transformers.

With a `RoutingStats` set on the context (moe_routing.py), every block records, per batch
row, how many of its tokens went to each expert and the summed router probabilities: the
load-balance metrics and the optional auxiliary loss come from these.
"""

from __future__ import annotations

import torch
from torch import nn

from tinsmith.engine.lora import LoraContext, LoraWeights, RowGroup, pad_positions
from tinsmith.engine.moe_kernels import experts_forward, experts_forward_loop


class ExpertLora:
    """Adapter slots of one fused expert weight [E, out, in] (`experts.<name>`)."""

    def __init__(self, experts: nn.Module, name: str) -> None:
        self.experts = experts
        self.name = name
        self.adapters: dict[int, LoraWeights] = {}  # slot -> A [E, r, in], B [E, out, r]

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.name)

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:  # per expert
        return int(self.weight.shape[2])

    @property
    def out_features(self) -> int:  # per expert
        return int(self.weight.shape[1])

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of this layer's LoRA factors A and B at `rank`."""
        E = self.num_experts
        return (E, rank, self.in_features), (E, self.out_features, rank)


class MultiLoraMoe(nn.Module):
    """A sparse MoE block (router + fused experts) whose experts carry adapter slots."""

    # Set False to compute the experts with the reference loop (tests compare the two).
    grouped = True

    def __init__(self, block: nn.Module, ctx: LoraContext, index: int) -> None:
        super().__init__()
        self.gate = block.gate  # the router, frozen; its weight keeps its state-dict name
        self.experts = block.experts
        self.ctx = ctx
        self.index = index  # this block's rank among the model's MoE blocks (for stats)
        self.gate_up = ExpertLora(self.experts, "gate_up_proj")
        self.down = ExpertLora(self.experts, "down_proj")

    @property
    def num_experts(self) -> int:
        return self.gate_up.num_experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> [B, T, H]. In a separate (exact packing) pass each row group
        is computed on its own block [rows, width], as in its own pass (see LoraContext)."""
        groups = self.ctx.groups
        if not self.ctx.separate:
            return self._block(hidden, groups, 0)
        assert sum(g.rows for g in groups) == hidden.shape[0], "LoraContext rows do not match batch"
        parts, start = [], 0
        for g in groups:
            xs = hidden[start : start + g.rows, : g.width].contiguous()
            parts.append(pad_positions(self._block(xs, [g], start), hidden.shape[1]))
            start += g.rows
        return torch.cat(parts, dim=0)

    def _block(self, x: torch.Tensor, groups: list[RowGroup], row0: int) -> torch.Tensor:
        """The block on x [b, T, H], rows row0.. of the pass, under `groups` (may be empty)."""
        b, t, H = x.shape
        flat = x.reshape(-1, H)  # token n is row n // t
        router_logits, top_w, top_idx = self.gate(flat)  # [N, E], [N, K], [N, K]
        stats = self.ctx.routing
        if stats is not None:
            stats.record(self.index, row0, b, t, router_logits, top_idx)
        slots = [g.slot for g in groups] or [None]
        lora_gu = [self.gate_up.adapters.get(s) if s is not None else None for s in slots]
        lora_dn = [self.down.adapters.get(s) if s is not None else None for s in slots]
        token_group = None
        if len(groups) > 1:
            rows = torch.tensor([g.rows for g in groups])
            row_group = torch.repeat_interleave(torch.arange(len(groups)), rows)  # [b]
            token_group = row_group.repeat_interleave(t).to(x.device, non_blocking=True)  # [N]
        fn = experts_forward if self.grouped else experts_forward_loop
        y = fn(flat, top_idx, top_w, self.experts.gate_up_proj, self.experts.down_proj,
               self.experts.act_fn, lora_gu, lora_dn, token_group)
        return y.view(b, t, H)


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    return (experts is not None and gate is not None
            and all(isinstance(getattr(experts, n, None), nn.Parameter) and getattr(experts, n).dim() == 3
                    for n in ("gate_up_proj", "down_proj"))
            and isinstance(getattr(gate, "weight", None), nn.Parameter))


def inject_moe(model: nn.Module, ctx: LoraContext, expert_params: tuple[str, ...]) -> dict[str, ExpertLora]:
    """Replace every sparse MoE block of `model` by a MultiLoraMoe; return its expert LoRA
    targets by parameter path (`<block>.experts.<name>` for each of `expert_params`)."""
    if not expert_params:
        return {}
    assert set(expert_params) <= {"gate_up_proj", "down_proj"}, expert_params
    found: dict[str, ExpertLora] = {}
    blocks = [(p, m) for p, m in model.named_modules() if _is_moe_block(m)]
    for index, (path, block) in enumerate(blocks):
        wrapped = MultiLoraMoe(block, ctx, index)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapped)
        for name in expert_params:
            found[f"{path}.experts.{name}"] = wrapped.gate_up if name == "gate_up_proj" else wrapped.down
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE block with fused experts "
                         f"{list(expert_params)} and a router")
    return found


def moe_blocks(model: nn.Module) -> list[MultiLoraMoe]:
    return [m for m in model.modules() if isinstance(m, MultiLoraMoe)]
