"""One LoRA adapter: its factors for every adapted layer, and its own optimizer state.

The optimizer family (AdamW or Dimuon, engine/dimuon.py; docs/optimizers.md) is fixed when
the adapter is made and travels with it (host copies, spills, checkpoints).

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

from tinsmith.engine.dimuon import Dimuon
from tinsmith.engine.families import ALL_ATTN, ALL_MLP, ALL_UNEMBED, family_for
from tinsmith.engine.lora import (
    LoraWeights,
    MultiLoraLinear,
    leaf_name,
)
from tinsmith.types import ADAMW, AdamSpec, DimuonSpec, LoraSpec, OptimizerConfig, OptimSpec


def target_leaves(spec: LoraSpec, model_type: str | None = None) -> tuple[str, ...]:
    """Leaf module names an adapter with this spec trains: those of `model_type`'s family
    (families.py), or with no type those of every known family, which select the same
    layers among one model's adapted layers (the families' groups never share a name)."""
    if model_type is not None:
        family = family_for(model_type)
        attn, mlp, unembed = family.attn, family.mlp + family.experts, family.unembed
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

    def __init__(self, spec: LoraSpec, weights: dict[str, LoraWeights],
                 optimizer: OptimizerConfig = ADAMW) -> None:
        self.spec = spec
        self.weights = weights
        self.optimizer_config = optimizer  # the family; fixed for the adapter's life
        self.optimizer: torch.optim.Optimizer | None = None  # made at the first step
        self.num_steps = 0

    # ----- construction -------------------------------------------------------------
    @classmethod
    def create(cls, spec: LoraSpec, layers: dict[str, MultiLoraLinear],
               optimizer: OptimizerConfig = ADAMW) -> Adapter:
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
            a_shape, b_shape = layer.factor_shapes(spec.rank)  # MoE experts: [E, r, in], [E, out, r]
            a = torch.empty(a_shape)
            # kaiming_uniform_(a=sqrt(5)) as nn.Linear/PEFT do: bound = 1/sqrt(fan_in).
            bound = 1.0 / math.sqrt(layer.in_features)
            a.uniform_(-bound, bound, generator=gen)
            b = torch.zeros(b_shape)
            # Drawn on the host, so a seed gives the same adapter on every device.
            dev = layer.weight.device
            weights[path] = LoraWeights(a.to(dev).requires_grad_(), b.to(dev).requires_grad_(), scale)
        if not weights:
            raise ValueError(f"the base model has none of the layers {sorted(leaves)}")
        return cls(spec, weights, optimizer)

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
        """A copy on `device` with everything a run holds (factors, pending gradients, the
        optimizer's state and step counts), bit-exact; `pin`: page-locked host memory, for
        fast copies back to a GPU. Used to move idle runs off a GPU (engine/pool.py)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if pin:
                return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)
            return t.to(device, copy=True)

        moved = Adapter(self.spec, {p: LoraWeights(move(w.A).requires_grad_(), move(w.B).requires_grad_(),
                                                   w.scale) for p, w in self.weights.items()},
                        self.optimizer_config)
        moved.num_steps = self.num_steps
        for old, new in zip(self.parameters(), moved.parameters()):
            if old.grad is not None:
                new.grad = move(old.grad)
        if self.optimizer is not None:
            moved.optimizer = moved._new_optimizer()
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

    def optim_step(self, params: OptimSpec) -> dict[str, float]:
        """Clip (global norm), apply the adapter's optimizer (AdamW or Dimuon), zero the
        gradients. Returns optimizer metrics. ValueError for params of the other family."""
        if params.family != self.optimizer_config.type:
            raise ValueError(f"this run's optimizer is {self.optimizer_config.type}, fixed at its "
                             f"creation; got {type(params).__name__} ({params.family})")
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grad_norm = clip_grad_norm(grads, params.grad_clip_norm)
        if self.optimizer is None:
            self.optimizer = self._new_optimizer()
        for group in self.optimizer.param_groups:
            group["lr"] = params.learning_rate
            if isinstance(params, AdamSpec):
                group["betas"] = (params.beta1, params.beta2)
                group["eps"] = params.eps
                group["weight_decay"] = params.weight_decay
            else:
                assert isinstance(params, DimuonSpec)
                group["beta1"] = params.beta1
        self.optimizer.step()
        self.zero_grad()
        self.num_steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": params.learning_rate}

    # ----- optimizer state ------------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = self.parameters()
        return Dimuon(params) if self.optimizer_config.type == "dimuon" else _adamw(params)

    def optimizer_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimizer's state of one factor where its kernel keeps it: AdamW's `step`,
        `exp_avg`, `exp_avg_sq`, or Dimuon's `step`, `momentum`; empty before its first step."""
        if self.optimizer is None:
            return {}
        return self.optimizer.state.get(param) or {}

    def set_optimizer_state(self, states: Mapping[torch.Tensor, Mapping[str, torch.Tensor]]) -> None:
        """A fresh optimizer of the adapter's family holding `states` (per factor: `step` and
        the family's buffers, on any device), copied to where its kernel keeps them; factors
        left out start fresh."""
        self.optimizer = self._new_optimizer()
        for p, st in states.items():
            self.optimizer.state[p] = {k: _step_for(v, p) if k == "step" else v.to(p.device, copy=True)
                                       for k, v in st.items()}


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> float:
    """The global L2 norm of `grads` (before clipping); if `max_norm` > 0 and the norm is
    above it, scales every gradient in place by max_norm / (norm + 1e-6)."""
    if not grads:
        return 0.0
    on_gpu = grads[0].is_cuda
    # On a GPU one multi-tensor kernel for every tensor's norm (hundreds of launches
    # otherwise); on a CPU today's per-tensor norms, so results stay bitwise the same.
    norms = torch._foreach_norm(grads) if on_gpu else [torch.linalg.vector_norm(g) for g in grads]
    grad_norm = float(torch.linalg.vector_norm(torch.stack(norms)))  # the step's one sync
    if max_norm > 0 and grad_norm > max_norm:
        coef = max_norm / (grad_norm + 1e-6)
        if on_gpu:
            torch._foreach_mul_(grads, coef)
        else:
            for g in grads:
                g.mul_(coef)
    return grad_norm


def _adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    """AdamW over an adapter's float32 factors: the fused kernel on a GPU (one launch for
    every tensor), the foreach one on a CPU (today's exact path). Hyperparameters are set
    per step from the request's AdamParams."""
    if params and params[0].is_cuda:
        return torch.optim.AdamW(params, fused=True)
    return torch.optim.AdamW(params, foreach=True)


def _step_for(step: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """An optimizer's step count placed as its kernel keeps it: on the GPU for AdamW's fused
    kernel (and Dimuon's there), a host scalar for the foreach one."""
    return step.detach().to(param.device if param.is_cuda else "cpu", torch.float32, copy=True)
