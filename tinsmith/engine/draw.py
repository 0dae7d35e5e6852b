"""Drawing token indices from unnormalised probabilities.

- `race`, for the sampler's tokens: one exponential per candidate, the smallest E_i / w_i
  wins (the exponential race, i.e. Gumbel-max). A float perturbation of the weights can only
  change the winner when the best two ratios are that close, so a seeded request draws the
  same tokens whether it decodes alone or batched with others (whose rounding differs, see
  decode.py). Inverse CDF is not like that: a draw flips wherever its uniform falls between
  the old and new place of ANY boundary of the cumulative sum, so the chance per token is the
  sum of all V boundary shifts; with batching's rounding on the bundled model, 8 of 32
  temperature-1 sequences of 32 tokens diverged (bench/multi_tenant.py at commit 74f5a6d,
  the last with inverse-CDF sampling).
- `draw`, for k draws with replacement per row (prompt alternative tokens): inverse CDF, one
  uniform per draw instead of one exponential per candidate and draw.
"""

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


def race(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of non-negative weights [B, C] (need not sum to 1): [B]. Entries of
    weight zero can never win (their ratio is +inf)."""
    arrival = -torch.log1p(-torch.rand(probs.shape, generator=gen, dtype=probs.dtype))  # Exp(1)
    ratio = arrival / probs
    ratio.masked_fill_(probs <= 0, float("inf"))
    return ratio.argmin(dim=-1)
