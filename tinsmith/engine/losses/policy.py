"""Policy-gradient losses (the hosted service's formulas) and their shared metrics.

Notation (per position t): lp = learner log p(target), lq = the sampler's logprob
(`logprobs` input), A = `advantages`, r = exp(lp - lq). sg() = stop-gradient.

  importance_sampling  -sum r*A
  ppo                  -sum min(r*A, clip(r, lo, hi)*A)
  cispo                -sum sg(clip(r, lo, hi)) * lp * A
  dro                  -sum (lp*A - beta/2 * (lp - lq)^2)
  gspo                 GSPO-token: s = exp(mean over the sequence_ratio_mask of (sg(lp) - lq))
                       per datum; s_t = sg(s) * exp(lp - sg(lp)) (value s, gradient of lp);
                       -sum min(s_t*A, clip(s_t, lo, hi)*A)
  stable_reinforce     see stable_reinforce() below (uses what the server recorded at sampling)

lo / hi are `clip_low_threshold` / `clip_high_threshold` (config, default 0.8 / 1.2; they
may also come per position as loss_fn_inputs of the same names).

Positions with A == 0 contribute nothing to the ratio-based losses, so their ratio is
computed as 1: prompt positions usually carry lq = 0, and exp(lp - 0) * 0 must not become
inf * 0 = NaN when lp - lq is large.

Metrics (over "action" positions: A != 0 or lq != 0 — the cookbook gives prompt positions
lq = 0 and A = 0): `ratio:mean`; `kl_sampler:mean`, the k3 estimate r - 1 - log r of
KL(sampler || learner); `action_tokens:sum`; and `clip_fraction:mean` for clipped losses.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tinsmith.engine.losses.base import LossBatch, LossSpec, Tensor, masked_mean, nonzero
from tinsmith.types import UserError

CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")
PG_INPUTS = ("logprobs", "advantages")


def _live_log_ratio(b: LossBatch) -> tuple[Tensor, Tensor]:
    """(log r with 0 where A == 0, the bool mask A != 0)."""
    live = b.inputs["advantages"] != 0
    diff = b.lp - b.inputs["logprobs"]
    return torch.where(live, diff, torch.zeros_like(diff)), live


def _bounds(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """Clip bounds as tensors, per position when sent as inputs, else from config."""
    lo, hi = (
        b.inputs[k] if k in b.inputs else torch.full_like(b.lp.detach(), float(config[k]))
        for k in CLIP_INPUTS
    )
    return lo, hi


def policy_metrics(
    lp: Tensor, lq: Tensor, mask: Tensor, clipped: Tensor | None = None
) -> dict[str, float]:
    """Diagnostics over the bool `mask` positions; lq = the sampler's logprobs."""
    log_r = (lp.detach() - lq).clamp(-30.0, 30.0)  # metrics only: keep them finite
    ratio = log_r.exp()
    out = {
        "ratio:mean": masked_mean(ratio, mask),
        "kl_sampler:mean": masked_mean(ratio - 1.0 - log_r, mask),
        "action_tokens:sum": float(mask.sum()),
    }
    if clipped is not None:
        out["clip_fraction:mean"] = masked_mean(clipped.to(lp.dtype), mask)
    return out


def _action_mask(b: LossBatch) -> Tensor:
    return (b.inputs["advantages"] != 0) | (b.inputs["logprobs"] != 0)


def importance_sampling(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    log_r, _ = _live_log_ratio(b)
    loss = -(log_r.exp() * b.inputs["advantages"]).sum()
    return loss, policy_metrics(b.lp, b.inputs["logprobs"], _action_mask(b))


def _clipped_surrogate(log_ratio: Tensor, adv: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """(-sum min(r*A, clip(r)*A) with r = exp(log_ratio), where the clip took effect).

    The branch of the min is chosen explicitly: where the clip takes effect (A > 0 and
    r > hi, or A < 0 and r < lo) the term is the constant clip(r)*A, with zero gradient;
    elsewhere it is r*A. Through torch.minimum/maximum instead, ties (r exactly at a bound)
    would split the gradient (giving 3/4 of it even where the loss is smooth), and an
    overflowing r on a clipped position would back-propagate 0 * inf = NaN.
    """
    r = log_ratio.detach().exp()
    active = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
    ratio = torch.where(active, torch.zeros_like(log_ratio), log_ratio).exp()
    clipped_r = torch.minimum(torch.maximum(r, lo), hi)
    loss = -torch.where(active, clipped_r * adv, ratio * adv).sum()
    return loss, active


def ppo(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    log_r, live = _live_log_ratio(b)
    lo, hi = _bounds(b, config)
    loss, clipped = _clipped_surrogate(log_r, b.inputs["advantages"], lo, hi)
    return loss, policy_metrics(b.lp, b.inputs["logprobs"], _action_mask(b), clipped & live)


def cispo(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    log_r, live = _live_log_ratio(b)
    lo, hi = _bounds(b, config)
    r = log_r.detach().exp()
    coef = torch.minimum(torch.maximum(r, lo), hi)  # already detached
    loss = -(coef * b.lp * b.inputs["advantages"]).sum()
    clipped = live & ((r < lo) | (r > hi))
    return loss, policy_metrics(b.lp, b.inputs["logprobs"], _action_mask(b), clipped)


def dro(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    lq, adv = b.inputs["logprobs"], b.inputs["advantages"]
    beta = float(config["beta"])
    loss = -(b.lp * adv - 0.5 * beta * (b.lp - lq) ** 2).sum()
    return loss, policy_metrics(b.lp, lq, _action_mask(b))


def gspo(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    lq, adv = b.inputs["logprobs"], b.inputs["advantages"]
    in_seq = b.inputs["sequence_ratio_mask"] != 0
    diff = torch.where(in_seq, b.lp.detach() - lq, torch.zeros_like(lq))
    count = b.per_datum_sum(in_seq.to(lq.dtype))
    # Mean log-ratio per datum over its masked positions; 0 (s = 1) for an empty mask.
    seq_log_ratio = b.per_datum_sum(diff) / count.clamp(min=1.0)  # [num_datums]
    live = adv != 0
    log_s = seq_log_ratio[b.datum] + b.lp - b.lp.detach()
    log_s = torch.where(live, log_s, torch.zeros_like(log_s))
    lo, hi = _bounds(b, config)
    loss, clipped = _clipped_surrogate(log_s, adv, lo, hi)
    metrics = policy_metrics(b.lp, lq, in_seq | _action_mask(b), clipped & live)
    has_seq = count > 0
    metrics["sequence_ratio:mean"] = masked_mean(seq_log_ratio.clamp(-30, 30).exp(), has_seq)
    return loss, metrics


def stable_reinforce(b: LossBatch, config: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    """Truncated-importance-weighted REINFORCE on the server's own sampling record.

    m_t = 1 where position t is a token the server sampled and recorded (a
    SampledProvenanceSpan), lr_t = the logprob the sampler recorded for it,
    r_t = exp(lp_t - lr_t), C = clip_high_threshold (default 2.0), k = kl_coeff (default 0):

        L = -sum_t m_t * sg(min(r_t, C)) * A_t * lp_t  +  k * sum_t m_t * (lp_t - lr_t)^2 / 2

    The gradient flows through lp (REINFORCE form), never through the ratio, and the
    ratio weight is capped, so stale samples cannot blow the update up; the optional
    quadratic term pulls the learner back toward the policy that sampled. Positions
    outside sampled spans (the prompt) contribute nothing, whatever their advantage.
    """
    adv, lr = b.inputs["advantages"], b.inputs["recorded_logprobs"]
    m = b.inputs["recorded_mask"] != 0
    diff = torch.where(m, b.lp - lr, torch.zeros_like(lr))
    r = diff.detach().exp()
    cap = float(config["clip_high_threshold"])
    weight = torch.where(m, r.clamp(max=cap), torch.zeros_like(r))
    loss = -(weight * adv * b.lp).sum() + float(config["kl_coeff"]) * 0.5 * (diff**2).sum()
    return loss, policy_metrics(b.lp, lr, m, m & (r > cap))


def check_policy_config(config: Mapping[str, float]) -> None:
    lo, hi = config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 1.0)
    if not 0.0 <= lo <= hi or hi <= 0.0:
        raise UserError(
            f"loss_fn_config needs 0 <= clip_low_threshold <= clip_high_threshold and "
            f"clip_high_threshold > 0, got {lo} and {hi}"
        )
    for key in ("beta", "kl_coeff"):
        if config.get(key, 0.0) < 0:
            raise UserError(f"loss_fn_config {key} must be >= 0, got {config[key]}")


def _spec(fn, inputs=PG_INPUTS, optional=(), config=None, **kw) -> LossSpec:
    # Every ratio-based loss here has zero gradient where A == 0 (see the module docstring).
    kw.setdefault("grad_positions", nonzero("advantages"))
    return LossSpec(fn, inputs, optional, config or {}, check_config=check_policy_config, **kw)


POLICY = {
    "importance_sampling": _spec(importance_sampling, doc="-sum exp(lp - lq) * A"),
    "ppo": _spec(ppo, optional=CLIP_INPUTS, config=CLIP_DEFAULTS, doc="-sum min(r*A, clip(r, lo, hi)*A)"),
    "cispo": _spec(cispo, optional=CLIP_INPUTS, config=CLIP_DEFAULTS, doc="-sum sg(clip(r, lo, hi)) * lp * A"),
    "dro": _spec(dro, config={"beta": 0.05}, grad_positions=None, doc="-sum (lp*A - beta/2 (lp - lq)^2)"),
    "gspo": _spec(gspo, (*PG_INPUTS, "sequence_ratio_mask"), CLIP_INPUTS, CLIP_DEFAULTS,
                  doc="GSPO-token with the sequence ratio over sequence_ratio_mask"),
    "stable_reinforce": _spec(
        stable_reinforce, config={"kl_coeff": 0.0, "clip_high_threshold": 2.0},
        server_inputs=("recorded_logprobs", "recorded_mask"), grad_positions=nonzero("recorded_mask"),
        doc="truncated-IS REINFORCE on the server's sampling record (provenance spans)",
    ),
}
