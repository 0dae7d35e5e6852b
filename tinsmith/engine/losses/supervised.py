"""Supervised losses: cross-entropy on hard ([N]) or top-K soft ([N, K]) targets."""

from __future__ import annotations

from collections.abc import Mapping

from tinsmith.engine.losses.base import LossBatch, LossSpec, Tensor, nonzero


def cross_entropy(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    """L = -sum(weights * lp) over every position (and every k for [N, K] targets).

    Any real weights, negative ones too: the SDK's client-side custom losses
    (forward_backward_custom) send weights = -dC/dlogprobs through this loss.
    """
    return -(b.inputs["weights"] * b.lp).sum(), {}


SUPERVISED = {
    "cross_entropy": LossSpec(
        cross_entropy, ("weights",), allow_2d_targets=True, grad_positions=nonzero("weights"),
        doc="-sum(weights * logprobs); [N] or [N, K] targets",
    ),
}
