"""One training run's LoRA state on one rank: master factors and AdamW state sharded as
DTensors, plus the gathered factors the pass computes with.

Per adapted layer, each factor (A [r, in], B [out, r]) is a float32 DTensor `Shard(0)` over
the group's 1-D mesh: a rank holds rows [k*n/N, (k+1)*n/N) of it (torch.chunk's split, so
uneven sizes and empty shards are fine), and AdamW's `exp_avg` / `exp_avg_sq` are DTensors of
the same layout (AdamW's foreach kernel makes them with zeros_like). That is the state that
grows with the number of runs and steps, 3x the factors, and it is 1/N per rank.

The decoder's MultiLoraLinear layers compute with plain tensors, so the run also keeps
`full`: an `Adapter` whose factors are the all-gathered values (one `full_tensor()` per
factor after each optimizer step or load), attached to a runner slot exactly like a local
run's. They are autograd leaves: a pass accumulates into their `.grad` this rank's partial
gradient (over its rows only). `optim_step` reduce-scatters those partials into the shards'
gradients (Partial -> Shard(0), a sum), clips by the global norm (an all-reduce of the
shards' squared norms), steps AdamW on the shards, and gathers the new factors.

A Dimuon run is not sharded (`replicated`): its Newton-Schulz step needs each factor's whole
matrix, so every rank all-reduces the gradient and runs the ordinary `Adapter.optim_step` on
the full factors, keeping identical copies (its momentum is 1x the factors, not 2x).

Every method here is collective: all ranks call it in the same order with the same
arguments (the coordinator sends each command to every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.lora import LoraWeights
from tinsmith.types import ADAMW, AdamSpec, OptimSpec

_BUFFERS = ("exp_avg", "exp_avg_sq")  # AdamW's per-factor state besides `step`


def _shard(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """A full tensor that every rank holds identically -> its Shard(0) DTensor, no
    communication (each rank keeps its own chunk)."""
    return distribute_tensor(t.detach().to(mesh.device_type, torch.float32), mesh, [Shard(0)],
                             src_data_rank=None)


class ShardedRun:
    """A run's sharded masters and optimizer, and its gathered compute copy (`full`)."""

    def __init__(self, full: Adapter, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.full = full  # leaves [r, in] / [out, r], attached to a runner slot by the rank
        self.has_grad = False  # a backward reached this run since its last step (all ranks agree)
        # Dimuon's Newton-Schulz step needs each factor's whole matrix: such a run is
        # replicated instead (every rank steps the full factors, with the all-reduced gradient).
        self.replicated = full.optimizer_config.type != ADAMW.type
        self.shards: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.AdamW | None = None
        if self.replicated:
            return
        # Masters, in `full.parameters()` order (per layer A then B).
        self.shards = [torch.nn.Parameter(_shard(p, mesh)) for p in full.parameters()]
        if full.optimizer is not None:  # loaded with optimizer state: shard it too
            self.optimizer = self._new_optimizer()
            for p, s in zip(full.parameters(), self.shards):
                st = full.optimizer_state(p)
                if st:
                    self.optimizer.state[s] = {
                        "step": st["step"].detach().to("cpu", torch.float32, copy=True),
                        **{b: _shard(st[b], mesh) for b in _BUFFERS}}
            full.optimizer = None  # the full copy never steps

    @property
    def spec(self):
        return self.full.spec

    def _new_optimizer(self) -> torch.optim.AdamW:
        # foreach over DTensors: elementwise on each rank's local shards, no communication.
        return torch.optim.AdamW(self.shards, foreach=True)

    def optim_step(self, params: OptimSpec) -> dict[str, float]:
        """Adapter.optim_step's contract, sharded: clip by the global norm, AdamW, zero grads.
        ValueError for params of the other family."""
        if self.replicated:
            return self._replicated_step(params)
        if not isinstance(params, AdamSpec):
            raise ValueError(  # noqa: TRY004 - the engine's contract: ValueError -> UserError
                f"this run's optimizer is adamw, fixed at its creation; got "
                f"{type(params).__name__} ({params.family})")
        grad_norm = 0.0
        if self.has_grad:
            for p, s in zip(self.full.parameters(), self.shards):
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                # Partial (each rank's sum over its rows) -> Shard(0): one reduce-scatter.
                s.grad = DTensor.from_local(g.detach(), self.mesh, [Partial()]).redistribute(
                    self.mesh, [Shard(0)])
            grad_norm = self._clip(params.grad_clip_norm)
        if self.optimizer is None:
            self.optimizer = self._new_optimizer()
        for group in self.optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        self.optimizer.step()  # shards with grad None (no backward since the last step) skip
        for p, s in zip(self.full.parameters(), self.shards):
            p.grad, s.grad = None, None
        self.has_grad = False
        self.full.num_steps += 1
        self.gather()
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": params.learning_rate}

    def _replicated_step(self, params: OptimSpec) -> dict[str, float]:
        """The whole Adapter.optim_step on every rank, on the summed gradient (all-reduce):
        every rank's factors and optimizer state stay identical."""
        params_ = self.full.parameters()
        if self.has_grad:
            for p in params_:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.mesh.get_group())
        else:  # as in one process: no loss since the last step, no gradient at all
            for p in params_:
                p.grad = None
        self.has_grad = False
        return self.full.optim_step(params)

    def _clip(self, max_norm: float) -> float:
        """The global L2 norm of the run's gradient (before clipping), from the shards; scale
        them by max_norm / (norm + 1e-6) when max_norm > 0 and the norm is above it."""
        local = [s.grad.to_local() for s in self.shards if s.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.mesh.device_type)
        for g in local:
            sq += g.double().pow(2).sum()
        dist.all_reduce(sq, group=self.mesh.get_group())
        grad_norm = float(sq.sqrt())
        if max_norm > 0 and grad_norm > max_norm:
            coef = max_norm / (grad_norm + 1e-6)
            for g in local:
                g.mul_(coef)
        return grad_norm

    def gather(self) -> None:
        """Refresh the compute copy from the masters (an all-gather per factor)."""
        with torch.no_grad():
            for p, s in zip(self.full.parameters(), self.shards):
                p.copy_(s.full_tensor())

    def export(self, include_optimizer: bool) -> Adapter:
        """A full, host-side Adapter of the run (factors, and with `include_optimizer` its
        gathered AdamW state), for checkpoint.adapter_to_files; collective."""
        if self.replicated:  # every rank holds it all: a host copy (optimizer state included)
            return self.full.to_device(torch.device("cpu"))
        weights = {path: LoraWeights(w.A.detach().cpu().clone(), w.B.detach().cpu().clone(), w.scale)
                   for path, w in self.full.weights.items()}
        out = Adapter(self.full.spec, weights, self.full.optimizer_config)
        out.num_steps = self.full.num_steps
        if include_optimizer and self.optimizer is not None:
            states = {}
            for p, s in zip(out.parameters(), self.shards):
                st = self.optimizer.state.get(s)
                if st:
                    states[p] = {"step": st["step"], **{b: st[b].full_tensor().cpu() for b in _BUFFERS}}
            if states:
                out.set_optimizer_state(states)
        return out
