"""Preference losses computed on the server in one pass: `dpo` and `bradley_terry`.

Layout (both losses): datums come in pairs, datum 2i is the CHOSEN sequence and datum
2i+1 the REJECTED one for the same prompt, so a request holds an even number of datums.
Every datum has `target_tokens` [N] and `weights` [N] (which positions count: usually 1
on the response, 0 on the prompt); `dpo` also needs `ref_logprobs` [N], the reference
model's log-probabilities of the same targets (e.g. from `forward` before training).

For datum d let S_d = sum_t weights_t * lp_t (the learner's weighted sequence logprob).

  dpo            h_d = beta * (S_d - sum_t weights_t * ref_logprobs_t)   (implicit reward)
                 z = h_chosen - h_rejected,
                 loss per pair = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)
                 config: beta (default 0.1), label_smoothing eps (default 0, conservative DPO)
  bradley_terry  a reward model whose score is s_d = S_d (e.g. weight 1 on one judgement
                 token); z = s_chosen - s_rejected, same pair loss with label_smoothing.

Like every loss here the total is a SUM over pairs (the SDK may split a large call into
several requests, so a mean could not be exact); scale the learning rate for the number
of pairs, or send weights pre-divided by it.
Metrics: `pair_accuracy:mean` (fraction of pairs with z > 0), `margin:mean` (mean z),
`chosen_reward:mean`, `rejected_reward:mean` (mean h or s), `pairs:sum`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F

from tinsmith.engine.losses.base import LossBatch, LossSpec, Tensor, nonzero
from tinsmith.types import UserError


def pairwise_logistic(chosen: Tensor, rejected: Tensor, eps: float) -> tuple[Tensor, dict[str, float]]:
    """Sum over pairs of -(1-eps) log sigmoid(z) - eps log sigmoid(-z), z = chosen - rejected."""
    z = chosen - rejected
    loss = -((1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)).sum()
    zd = z.detach()
    n = max(int(z.shape[0]), 1)
    return loss, {
        "pair_accuracy:mean": float((zd > 0).sum()) / n,
        "margin:mean": float(zd.sum()) / n,
        "chosen_reward:mean": float(chosen.detach().sum()) / n,
        "rejected_reward:mean": float(rejected.detach().sum()) / n,
        "pairs:sum": float(z.shape[0]),
    }


def dpo(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    w = b.inputs["weights"]
    h = float(config["beta"]) * b.per_datum_sum(w * (b.lp - b.inputs["ref_logprobs"]))
    return pairwise_logistic(h[0::2], h[1::2], float(config["label_smoothing"]))


def bradley_terry(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    s = b.per_datum_sum(b.inputs["weights"] * b.lp)
    return pairwise_logistic(s[0::2], s[1::2], float(config["label_smoothing"]))


def check_preference_config(config: Mapping[str, float]) -> None:
    eps = config.get("label_smoothing", 0.0)
    if not 0.0 <= eps < 0.5:
        raise UserError(f"loss_fn_config label_smoothing must be in [0, 0.5), got {eps}")
    if config.get("beta", 1.0) <= 0:
        raise UserError(f"loss_fn_config beta must be > 0, got {config['beta']}")


PREFERENCE = {
    "dpo": LossSpec(
        dpo, ("weights", "ref_logprobs"), config={"beta": 0.1, "label_smoothing": 0.0},
        paired=True, check_config=check_preference_config, grad_positions=nonzero("weights"),
        doc="DPO on (chosen, rejected) datum pairs with reference logprobs",
    ),
    "bradley_terry": LossSpec(
        bradley_terry, ("weights",), config={"label_smoothing": 0.0}, paired=True,
        check_config=check_preference_config, grad_positions=nonzero("weights"),
        doc="Bradley-Terry reward model on (chosen, rejected) datum pairs",
    ),
}
