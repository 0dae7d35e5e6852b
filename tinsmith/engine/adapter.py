"""One LoRA adapter: its factors for every adapted layer, and its own AdamW state.

Adapters are created against the `MultiLoraLinear` layers of a model runner, but own
their tensors: attaching an adapter to a slot just points each layer's slot entry at them.
Gradients therefore land only in the adapter whose rows produced them.

Initialisation follows PEFT's default (A ~ kaiming-uniform(a=sqrt(5)), B = 0), drawn
from a generator seeded by `LoraSpec.seed`, so a given seed gives the same adapter.
How an adapter is named and stored in files (PEFT's format) is engine/checkpoint.py's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from tinsmith.engine.families import ALL_ATTN, ALL_MLP, ALL_UNEMBED, family_for
from tinsmith.engine.lora import (
    LoraWeights,
    MultiLoraLinear,
    leaf_name,
)
from tinsmith.types import AdamSpec, LoraSpec


def target_leaves(spec: LoraSpec, model_type: str | None = None) -> tuple[str, ...]:
    """Leaf module names an adapter with this spec trains: those of `model_type`'s family
    (families.py), or with no type those of every known family, which select the same
    layers among one model's adapted layers (the families' groups never share a name)."""
    if model_type is not None:
        family = family_for(model_type)
        attn, mlp, unembed = family.attn, family.mlp, family.unembed
    else:
        attn, mlp, unembed = ALL_ATTN, ALL_MLP, ALL_UNEMBED
    leaves: tuple[str, ...] = ()
    if spec.train_attn:
        leaves += attn
    if spec.train_mlp:
        leaves += mlp
    if spec.train_unembed:
        leaves += unembed
    return leaves


class Adapter:
    """LoRA factors keyed by module path, plus the optimizer that updates them."""

    def __init__(self, spec: LoraSpec, weights: dict[str, LoraWeights]) -> None:
        self.spec = spec
        self.weights = weights
        self.optimizer: torch.optim.AdamW | None = None
        self.num_steps = 0

    # ----- construction -------------------------------------------------------------
    @classmethod
    def create(cls, spec: LoraSpec, layers: dict[str, MultiLoraLinear]) -> Adapter:
        if spec.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
        leaves = set(target_leaves(spec))
        if not leaves:
            raise ValueError("LoRA config trains nothing: enable train_mlp, train_attn or train_unembed")
        gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else 0)
        scale = spec.alpha / spec.rank
        weights: dict[str, LoraWeights] = {}
        for path, layer in layers.items():
            if leaf_name(path) not in leaves:
                continue
            a = torch.empty(spec.rank, layer.in_features)
            # kaiming_uniform_(a=sqrt(5)) as nn.Linear/PEFT do: bound = 1/sqrt(fan_in).
            bound = 1.0 / math.sqrt(layer.in_features)
            a.uniform_(-bound, bound, generator=gen)
            b = torch.zeros(layer.out_features, spec.rank)
            # Drawn on the host, so a seed gives the same adapter on every device.
            dev = layer.weight.device
            weights[path] = LoraWeights(a.to(dev).requires_grad_(), b.to(dev).requires_grad_(), scale)
        if not weights:
            raise ValueError(f"the base model has none of the layers {sorted(leaves)}")
        return cls(spec, weights)

    def clone_frozen(self) -> Adapter:
        """A detached copy for sampling: same values, no grad, no optimizer."""
        return Adapter(
            self.spec,
            {
                p: LoraWeights(w.A.detach().clone(), w.B.detach().clone(), w.scale)
                for p, w in self.weights.items()
            },
        )

    def to_device(self, device: torch.device, *, pin: bool = False) -> Adapter:
        """A copy on `device` with everything a run holds (factors, pending gradients, AdamW
        moments and step count), bit-exact; `pin`: page-locked host memory, for fast copies
        back to a GPU. Used to move idle runs off a GPU (engine/pool.py)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if pin:
                return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)
            return t.to(device, copy=True)

        moved = Adapter(self.spec, {p: LoraWeights(move(w.A).requires_grad_(), move(w.B).requires_grad_(),
                                                   w.scale) for p, w in self.weights.items()})
        moved.num_steps = self.num_steps
        for old, new in zip(self.parameters(), moved.parameters()):
            if old.grad is not None:
                new.grad = move(old.grad)
        if self.optimizer is not None:
            moved.optimizer = _adamw(moved.parameters())
            for old, new in zip(self.parameters(), moved.parameters()):
                st = self.optimizer.state.get(old)
                if st:
                    moved.optimizer.state[new] = {k: (_step_for(v, new) if k == "step" else move(v))
                                                  for k, v in st.items()}
        return moved

    # ----- training -----------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for w in self.weights.values():
            out += [w.A, w.B]
        return out

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def optim_step(self, adam: AdamSpec) -> dict[str, float]:
        """Clip (global norm), apply AdamW, zero the gradients. Returns optimizer metrics."""
        params = self.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        on_gpu = bool(grads) and grads[0].is_cuda
        if grads:
            # On a GPU one multi-tensor kernel for every tensor's norm (hundreds of launches
            # otherwise); on a CPU today's per-tensor norms, so results stay bitwise the same.
            norms = torch._foreach_norm(grads) if on_gpu else [torch.linalg.vector_norm(g) for g in grads]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms)))  # the step's one sync
        else:
            grad_norm = 0.0
        if adam.grad_clip_norm > 0 and grad_norm > adam.grad_clip_norm:
            coef = adam.grad_clip_norm / (grad_norm + 1e-6)
            if on_gpu:
                torch._foreach_mul_(grads, coef)
            else:
                for g in grads:
                    g.mul_(coef)
        if self.optimizer is None:
            self.optimizer = _adamw(params)
        for group in self.optimizer.param_groups:
            group["lr"] = adam.learning_rate
            group["betas"] = (adam.beta1, adam.beta2)
            group["eps"] = adam.eps
            group["weight_decay"] = adam.weight_decay
        self.optimizer.step()
        self.zero_grad()
        self.num_steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": adam.learning_rate}

    # ----- optimizer state ------------------------------------------------------------
    def adam_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """AdamW's state of one factor (`step`, `exp_avg`, `exp_avg_sq`) where its kernel
        keeps it; empty before the first optimizer step."""
        if self.optimizer is None:
            return {}
        return self.optimizer.state.get(param) or {}

    def set_adam_state(self, states: Mapping[torch.Tensor, Mapping[str, torch.Tensor]]) -> None:
        """A fresh AdamW holding `states` (per factor: `step`, `exp_avg`, `exp_avg_sq`, on any
        device), copied to where its kernel keeps them; factors left out start fresh."""
        self.optimizer = _adamw(self.parameters())
        for p, st in states.items():
            self.optimizer.state[p] = {
                "step": _step_for(st["step"], p),
                "exp_avg": st["exp_avg"].to(p.device, copy=True),
                "exp_avg_sq": st["exp_avg_sq"].to(p.device, copy=True),
            }


def _adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    """AdamW over an adapter's float32 factors: the fused kernel on a GPU (one launch for
    every tensor), the foreach one on a CPU (today's exact path). Hyperparameters are set
    per step from the request's AdamParams."""
    if params and params[0].is_cuda:
        return torch.optim.AdamW(params, fused=True)
    return torch.optim.AdamW(params, foreach=True)


def _step_for(step: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """AdamW's step count placed as its kernel keeps it: on the GPU for the fused kernel, a
    host scalar for the foreach one."""
    return step.detach().to(param.device if param.is_cuda else "cpu", torch.float32, copy=True)
