"""What every loss function sees and returns: the batch layout and the loss spec.

A loss is a small pure function `fn(batch, config) -> (loss, metrics)`:
- `batch.lp` holds the learner's log-probabilities of the targets of ALL datums of one
  request, concatenated along the first axis: [T] (T = total positions), or [T, K] for
  top-K targets. `batch.inputs[name]` are that request's loss_fn_inputs, concatenated the
  same way, and `batch.datum[t]` is the index of the datum position t belongs to.
- `config` is the request's loss_fn_config merged over the spec's defaults.
- It returns the scalar loss (differentiable in `lp`) and metrics as `name:reduction`
  floats, the key form the SDK requires (it splits on the one colon).

Semantics are the hosted service's: a loss is a SUM over positions and datums, with no
hidden normalisation (clients normalise through `weights` or `advantages`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossBatch:
    lp: Tensor  # [T] or [T, K]: learner log p(target), datums back to back
    inputs: Mapping[str, Tensor]  # each [T] or [T, K], same layout as lp
    datum: Tensor  # int64 [T]: datum index of each position
    num_datums: int

    def per_datum_sum(self, x: Tensor) -> Tensor:
        """Sum of x [T] over each datum's positions: [num_datums]."""
        out = torch.zeros(self.num_datums, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.datum, x)

    @classmethod
    def from_datums(cls, lps: list[Tensor], inputs: list[Mapping[str, Tensor]]) -> LossBatch:
        """Concatenate per-datum logprobs and inputs (every datum has the same input keys)."""
        keys = inputs[0].keys() if inputs else ()
        lengths = torch.tensor([lp.shape[0] for lp in lps], dtype=torch.long)
        lp = torch.cat(lps)
        return cls(
            lp=lp,
            inputs={k: torch.cat([d[k] for d in inputs]).to(lp.device) for k in keys},
            datum=torch.repeat_interleave(torch.arange(len(lps)), lengths).to(lp.device),
            num_datums=len(lps),
        )


LossFn = Callable[[LossBatch, Mapping[str, float]], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LossSpec:
    """A loss function and the contract checked before a request is queued."""

    fn: LossFn
    required_inputs: tuple[str, ...]
    """loss_fn_inputs keys it needs besides target_tokens (shaped like target_tokens)."""
    optional_inputs: tuple[str, ...] = ()
    config: Mapping[str, float] = field(default_factory=dict)
    """Accepted loss_fn_config keys and their defaults."""
    allow_2d_targets: bool = False
    """Whether target_tokens may be [N, K] (soft / top-K targets)."""
    paired: bool = False
    """Datums come as (chosen, rejected) pairs: 2i is chosen, 2i+1 its rejected partner."""
    check_config: Callable[[Mapping[str, float]], None] | None = None
    """Raises UserError for config values out of range (defaults already merged)."""
    grad_positions: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = None
    """From one datum's inputs, a bool [N] that is True wherever d loss / d lp can be
    non-zero (a superset is fine, a subset is a bug); None = every position. The runner
    skips autograd through the unembedding at the other positions."""
    server_inputs: tuple[str, ...] = ()
    """Inputs the server adds itself (resolved from provenance spans); never sent by clients."""
    doc: str = ""

    def active(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """`grad_positions` of one datum's inputs, None when the loss has no such rule."""
        return self.grad_positions(inputs) if self.grad_positions else None


def nonzero(key: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """grad_positions for a loss that is zero-gradient wherever inputs[key] is 0 ([N] or [N, K])."""

    def positions(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        x = inputs[key] != 0
        return x.any(axis=1) if x.ndim == 2 else x

    return positions


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """Mean of x over the bool mask (0.0 when the mask is empty, so metrics never become NaN)."""
    n = int(mask.sum())
    return float(torch.where(mask, x, torch.zeros_like(x)).sum()) / n if n else 0.0
