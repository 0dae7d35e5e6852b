"""Drawing token indices from unnormalised probabilities by inverse CDF, for the sampler
and for prompt alternative tokens (one piece of code for both)."""

from __future__ import annotations

import torch


def draw(probs: torch.Tensor, gen: torch.Generator, k: int = 1) -> torch.Tensor:
    """k indices per row (with replacement) of non-negative weights [B, C] (need not sum to
    1), by inverse CDF: [B, k].

    torch.multinomial draws C exponentials per row on CPU (~10 ms for 4 x 49152); this draws
    k uniforms per row. Zero-weight entries can never be chosen: u < total, and
    searchsorted(right=True) returns the first index whose cdf is > u.
    """
    cdf = probs.double().cumsum(dim=-1)  # [B, C], fp64 so tiny probabilities keep their mass
    total = cdf[:, -1:]
    u = torch.rand(cdf.shape[0], k, generator=gen, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # keep u < total
    return torch.searchsorted(cdf, u, right=True)
