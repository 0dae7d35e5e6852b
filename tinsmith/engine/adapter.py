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

from tinsmith.engine.families import family_for
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


def target_leaves(spec: LoraSpec, model_type: str | None = None) -> tuple[str, ...]:
    """Leaf module names an adapter with this spec trains: those of `model_type`'s family
    (families.py), or with no type those of every known family, which select the same
    layers among one model's adapted layers (the families' groups never share a name)."""
    if model_type is not None:
        family = family_for(model_type)
        attn, mlp, unembed = family.attn, family.mlp, family.unembed
    else:
        attn, mlp, unembed = ATTN_TARGETS, MLP_TARGETS, UNEMBED_TARGETS
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
        if grads:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        else:
            grad_norm = 0.0
        if adam.grad_clip_norm > 0 and grad_norm > adam.grad_clip_norm:
            coef = adam.grad_clip_norm / (grad_norm + 1e-6)
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

    # ----- state in PEFT naming -------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors named as PEFT saves them (`adapter_model.safetensors`)."""
        out: dict[str, torch.Tensor] = {}
        for path, w in self.weights.items():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = w.A.detach().cpu().contiguous()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = w.B.detach().cpu().contiguous()
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
                out[f"{key}.exp_avg"] = st["exp_avg"].cpu().contiguous()
                out[f"{key}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                out[f"{key}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        return out

    def load_optimizer_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        params = self.parameters()
        self.optimizer = _adamw(params)
        for path, w in self.weights.items():
            for factor, p in (("lora_A", w.A), ("lora_B", w.B)):
                key = f"{PEFT_PREFIX}{path}.{factor}.weight"
                if f"{key}.exp_avg" not in state:
                    continue
                self.optimizer.state[p] = {
                    "step": _step_for(state[f"{key}.step"].reshape(()), p),
                    "exp_avg": state[f"{key}.exp_avg"].to(p.device, copy=True),
                    "exp_avg_sq": state[f"{key}.exp_avg_sq"].to(p.device, copy=True),
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
            dev = layer.weight.device
            weights[path] = LoraWeights(
                a.to(dev, torch.float32, copy=True).requires_grad_(),
                b.to(dev, torch.float32, copy=True).requires_grad_(), scale,
            )
        if not weights:
            raise ValueError("checkpoint holds no LoRA tensors for this base model")
        return cls(spec, weights)

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


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
