"""Loss functions: small pure functions in a registry, one per loss name.

Semantics are the hosted service's: every loss is a SUM over tokens (and over datums),
with no hidden normalisation; callers normalise through `weights` / `advantages`.

Each loss takes the learner's target log-probabilities `lp` ([N] or [N, K]) of ONE datum,
that datum's loss inputs as float tensors, and the loss config, and returns the scalar
loss and metrics (`name:reduction` keys, summed over datums by the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required_inputs: tuple[str, ...]  # keys of loss_fn_inputs besides target_tokens
    config_keys: tuple[str, ...] = ()  # accepted loss_fn_config keys
    allow_2d_targets: bool = False


def cross_entropy(lp: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]):
    """L = -sum(weights * lp). Any real weights (negative ones too: the SDK's client-side
    custom losses send -dC/dlogprobs as weights). [N] or [N, K] (soft / top-K targets)."""
    loss = -(inputs["weights"] * lp).sum()
    return loss, {}


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("weights",), allow_2d_targets=True),
}


def get_loss(name: str) -> LossSpec:
    spec = LOSSES.get(name)
    if spec is None:
        raise KeyError(name)
    return spec
