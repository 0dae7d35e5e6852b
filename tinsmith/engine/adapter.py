"""One LoRA adapter: its factors for every adapted layer, and its own AdamW state.

Adapters are created against the `MultiLoraLinear` layers of a model runner, but own
their tensors: attaching an adapter to a slot just points each layer's slot entry at them.
Gradients therefore land only in the adapter whose rows produced them.

Initialisation follows PEFT's default (A ~ kaiming-uniform(a=sqrt(5)), B = 0), drawn
from a generator seeded by `LoraSpec.seed`, so a given seed gives the same adapter.
"""

from __future__ import annotations

import math

import torch

from tinsmith.engine.lora import (
    ATTN_TARGETS,
    MLP_TARGETS,
    UNEMBED_TARGETS,
    LoraWeights,
    MultiLoraLinear,
    leaf_name,
)
from tinsmith.types import AdamSpec, LoraSpec

PEFT_PREFIX = "base_model.model."


def target_leaves(spec: LoraSpec) -> tuple[str, ...]:
    """Leaf module names an adapter with this spec trains."""
    leaves: tuple[str, ...] = ()
    if spec.train_attn:
        leaves += ATTN_TARGETS
    if spec.train_mlp:
        leaves += MLP_TARGETS
    if spec.train_unembed:
        leaves += UNEMBED_TARGETS
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
            weights[path] = LoraWeights(a.requires_grad_(), b.requires_grad_(), scale)
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
        if grads:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        else:
            grad_norm = 0.0
        if adam.grad_clip_norm > 0 and grad_norm > adam.grad_clip_norm:
            coef = adam.grad_clip_norm / (grad_norm + 1e-6)
            for g in grads:
                g.mul_(coef)
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=adam.learning_rate, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = adam.learning_rate
            group["betas"] = (adam.beta1, adam.beta2)
            group["eps"] = adam.eps
            group["weight_decay"] = adam.weight_decay
        self.optimizer.step()
        self.zero_grad()
        self.num_steps += 1
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": adam.learning_rate}

    # ----- state in PEFT naming -------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors named as PEFT saves them (`adapter_model.safetensors`)."""
        out: dict[str, torch.Tensor] = {}
        for path, w in self.weights.items():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = w.A.detach().contiguous()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = w.B.detach().contiguous()
        return out

    def optimizer_state_dict(self) -> dict[str, torch.Tensor]:
        """Adam moments in the same naming, with `.exp_avg` / `.exp_avg_sq` suffixes, plus step."""
        out: dict[str, torch.Tensor] = {}
        if self.optimizer is None:
            return out
        for path, w in self.weights.items():
            for factor, p in (("lora_A", w.A), ("lora_B", w.B)):
                st = self.optimizer.state.get(p)
                if not st:
                    continue
                key = f"{PEFT_PREFIX}{path}.{factor}.weight"
                out[f"{key}.exp_avg"] = st["exp_avg"].contiguous()
                out[f"{key}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                out[f"{key}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        return out

    def load_optimizer_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        params = self.parameters()
        self.optimizer = torch.optim.AdamW(params, foreach=True)
        for path, w in self.weights.items():
            for factor, p in (("lora_A", w.A), ("lora_B", w.B)):
                key = f"{PEFT_PREFIX}{path}.{factor}.weight"
                if f"{key}.exp_avg" not in state:
                    continue
                self.optimizer.state[p] = {
                    "step": state[f"{key}.step"].reshape(()).clone(),
                    "exp_avg": state[f"{key}.exp_avg"].clone(),
                    "exp_avg_sq": state[f"{key}.exp_avg_sq"].clone(),
                }

    @classmethod
    def from_peft_state_dict(
        cls, spec: LoraSpec, tensors: dict[str, torch.Tensor], layers: dict[str, MultiLoraLinear]
    ) -> Adapter:
        """Rebuild an adapter from PEFT-named tensors; shapes are checked against the model."""
        scale = spec.alpha / spec.rank
        weights: dict[str, LoraWeights] = {}
        for path, layer in layers.items():
            a = tensors.get(f"{PEFT_PREFIX}{path}.lora_A.weight")
            b = tensors.get(f"{PEFT_PREFIX}{path}.lora_B.weight")
            if a is None or b is None:
                continue
            if tuple(a.shape) != (spec.rank, layer.in_features) or tuple(b.shape) != (
                layer.out_features,
                spec.rank,
            ):
                raise ValueError(
                    f"checkpoint tensor shapes for {path} do not fit this base model "
                    f"(A {tuple(a.shape)}, B {tuple(b.shape)})"
                )
            weights[path] = LoraWeights(
                a.float().clone().requires_grad_(), b.float().clone().requires_grad_(), scale
            )
        if not weights:
            raise ValueError("checkpoint holds no LoRA tensors for this base model")
        return cls(spec, weights)

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
