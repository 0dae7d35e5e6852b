"""Dimuon: a Muon-style optimizer for LoRA, each of a layer's two factors orthogonalised apart.

The formula (docs/optimizers.md has the reasons): for every factor P (A [r, in] or B [out, r])
with gradient G, after the adapter's global-norm clipping,

    M <- beta1 * M + (1 - beta1) * G          momentum, an EMA (the SDK's "EMA coefficient")
    U <- beta1 * M + (1 - beta1) * G          Nesterov-style look-ahead (Muon's default)
    O <- NS5(U)                               ~ U's polar factor U V^T, float32
    P <- P - lr * 0.2 * sqrt(max(rows, cols)) * O

NS5 is the quintic Newton-Schulz iteration of the Muon literature (Keller Jordan's
coefficients (3.4445, -4.7750, 2.0315), 5 steps) on U / (||U||_F + 1e-7), run on the wide
orientation (rows <= cols) so its Gram matrices are r x r. The scale is Moonshot's RMS match
("Muon is scalable for LLM training"): an r-rank orthogonal matrix has RMS 1/sqrt(max(rows,
cols)), so every factor's update has RMS 0.2 * lr whatever its shape, as AdamW's roughly has.

Everything is float32 on the factors' device, in plain torch ops (no CUDA-only kernel):
factors of one shape are stacked and iterated as one batch ([G, r, d] matmuls). A factor with
leading dimensions (a mixture-of-experts layer's [E, r, in]) is E matrices, each its own.
A factor with no gradient (its run had no loss since the last step) is left alone, momentum
included, as torch's AdamW does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as in Muon
NS_STEPS = 5
NS_EPS = 1e-7  # added to the Frobenius norm before the first iteration
RMS_SCALE = 0.2  # target RMS of an update per unit learning rate (Moonshot's AdamW match)


def newton_schulz(u: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately orthogonalise matrices `u` [..., m, n] (each its own): float32, same
    shape. Singular vectors are kept, singular values pushed into about [0.7, 1.2]."""
    x = u.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: X @ X^T is min(m, n) square
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return x.mT if tall else x


def update_scale(rows: int, cols: int) -> float:
    """The factor an orthogonalised update is multiplied by (per unit learning rate)."""
    return RMS_SCALE * math.sqrt(max(rows, cols))


class Dimuon(torch.optim.Optimizer):
    """The formula above over float32 parameters of >= 2 dims (matrices in the last two);
    hyperparameters `lr` and `beta1` are set per step in `param_groups` (as the adapter does
    for AdamW). State per parameter: `momentum` (its shape) and `step` (a float32 scalar: the
    updates it has received)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.0, beta1: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta1": beta1})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            for p in live:
                if p.dim() < 2:
                    raise ValueError(f"Dimuon updates matrices; got a parameter of shape {tuple(p.shape)}")
                st = self.state[p]
                if not st:
                    st["momentum"] = torch.zeros_like(p)
                    # Placed as AdamW's step is (adapter._step_for): by the parameter on a GPU.
                    st["step"] = torch.zeros((), dtype=torch.float32,
                                             device=p.device if p.is_cuda else "cpu")
            beta = float(group["beta1"])
            grads = [p.grad for p in live]
            moms = [self.state[p]["momentum"] for p in live]
            torch._foreach_lerp_(moms, grads, 1.0 - beta)  # M = M + (1-b)(G - M)
            looks = torch._foreach_lerp(grads, moms, beta)  # U = G + b(M - G)
            torch._foreach_add_([self.state[p]["step"] for p in live], 1.0)
            by_shape: dict[tuple[tuple[int, ...], torch.device], list[int]] = {}
            for i, p in enumerate(live):
                by_shape.setdefault((tuple(p.shape), p.device), []).append(i)
            lr = float(group["lr"])
            for (shape, _), idx in by_shape.items():
                ortho = newton_schulz(torch.stack([looks[i] for i in idx]))  # [G, ..., rows, cols]
                torch._foreach_add_([live[i] for i in idx], list(ortho.unbind(0)),
                                    alpha=-lr * update_scale(*shape[-2:]))
