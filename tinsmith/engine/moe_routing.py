"""Routing statistics of a training pass over a MoE model: load balance and auxiliary loss.

During a pass, every MoE block (moe.py) records into a `RoutingStats`, per batch row and
counting only the row's real tokens (not padding): how many of them the router sent to each
expert (top-k assignments, so a row of T tokens adds T * K) and, when gradients are wanted,
the sum of their router probabilities softmax(router_logits) (float32, in the graph).

Per request (`Routing`, summed over its rows) this gives

- the load-balance metrics, under the hosted service's keys (the SDK's ForwardBackwardOutput
  documents them): `e_frac_with_tokens:mean`, `e_frac_oversubscribed:mean`,
  `e_max_violation:mean`, `e_max_violation:max`, `e_min_violation:mean`; per MoE layer,
  with perfect balance = T * K / E assignments per expert, then over layers;
- the Switch-Transformer auxiliary load-balancing loss, exactly transformers'
  `load_balancing_loss_func` over the request's tokens:
  `aux = E * sum_e (C_e / (L * T)) * (P_e / (L * T))`, C_e / P_e the assignments / router
  probabilities of expert e summed over the L MoE layers and the request's T tokens
  (K at perfect balance). With `loss_fn_config["moe_aux_loss_coef"] = c > 0` the request
  backpropagates `loss + c * aux` and reports `moe_aux_loss:mean` (= aux); `loss:sum` stays
  the loss function's own value. The router is frozen, so the aux gradient reaches the
  adapters through the hidden states that feed the routers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

AUX_COEF = "moe_aux_loss_coef"
# loss_fn_config keys every loss accepts, with their defaults: the engine, not the loss,
# reads them (validation.py lets them through; training.py takes them out of the loss's config).
ENGINE_CONFIG: dict[str, float] = {AUX_COEF: 0.0}


@dataclass
class Routing:
    """One request's routing: counts [L, E] (detached), probs [L, E] (in the graph when the
    pass had gradients and `probs_grad`), tokens T (its real tokens)."""

    counts: torch.Tensor
    probs: torch.Tensor
    tokens: int

    def __add__(self, other: Routing) -> Routing:  # micro-batches of one request
        return Routing(self.counts + other.counts, self.probs + other.probs, self.tokens + other.tokens)


class RoutingStats:
    """Filled by the MoE blocks during one pass; made by the caller, started by the runner."""

    def __init__(self, probs_grad: bool = False) -> None:
        # Router probability sums are always kept ([B, E] per layer, for the aux value);
        # in the graph only with `probs_grad` (an aux term to backpropagate), since their
        # softmax would otherwise hold [tokens, E] float32 per layer until the backward.
        self.probs_grad = probs_grad
        self._counts: list[tuple[int, int, torch.Tensor]] = []  # (layer, first row, [b, E])
        self._probs: list[tuple[int, int, torch.Tensor]] = []
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # [L, B, E] each
        self.valid: torch.Tensor | None = None
        self.order: list[int] = []
        self.num_layers = 0

    def start(self, valid: torch.Tensor, order: Sequence[int], num_layers: int) -> None:
        """valid [B, T] bool on the device: real tokens of the pass's rows, in pass order;
        order[b]: the caller's index of pass row b."""
        self.valid, self.order, self.num_layers = valid, list(order), num_layers

    def record(self, layer: int, row0: int, b: int, t: int, logits: torch.Tensor, top_idx: torch.Tensor) -> None:
        """One block's routing of pass rows row0 .. row0 + b (width t): router logits
        [b * t, E], chosen experts [b * t, K]."""
        assert self.valid is not None, "RoutingStats.start was not called"
        v = self.valid[row0 : row0 + b, :t].reshape(-1, 1).float()  # [b*t, 1]
        E = logits.shape[-1]
        with torch.no_grad():
            hits = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            hits.scatter_add_(1, top_idx, torch.ones(top_idx.shape, device=logits.device))
            self._counts.append((layer, row0, (hits * v).view(b, t, E).sum(1)))
        with torch.set_grad_enabled(self.probs_grad and torch.is_grad_enabled()):
            probs = torch.softmax(logits.float(), dim=-1) * v
            self._probs.append((layer, row0, probs.view(b, t, E).sum(1)))

    @staticmethod
    def _per_layer(entries: list[tuple[int, int, torch.Tensor]], num_layers: int) -> torch.Tensor:
        """[L, B, E]: each layer's entries in row order (a separate pass records per group)."""
        return torch.stack([torch.cat([t for l, _, t in sorted(entries, key=lambda e: e[1]) if l == layer])
                            for layer in range(num_layers)])

    def request(self, rows: Sequence[int]) -> Routing:
        """The routing of the caller's rows `rows` (indices into the rows it passed)."""
        assert self.valid is not None and self._counts, "no MoE block recorded this pass"
        if self._stacked is None:  # once per pass, whatever the number of requests
            self._stacked = (self._per_layer(self._counts, self.num_layers),
                             self._per_layer(self._probs, self.num_layers))
        where = {i: b for b, i in enumerate(self.order)}
        pos = torch.tensor([where[i] for i in rows], device=self.valid.device)
        counts, probs = (t[:, pos].sum(1) for t in self._stacked)  # [L, E] each
        tokens = int(self.valid[pos].sum())
        return Routing(counts, probs, tokens)


def aux_loss(r: Routing) -> torch.Tensor:
    """transformers' load_balancing_loss_func over the request's tokens (a float32 scalar)."""
    L, E = r.counts.shape
    denom = float(L * max(r.tokens, 1))
    return E * ((r.counts.sum(0) / denom) * (r.probs.sum(0) / denom)).sum()


def balance_metrics(counts: torch.Tensor) -> dict[str, float]:
    """The hosted service's load-balance metrics of counts [L, E] (token assignments per
    layer and expert), over the layers that saw any token."""
    c = counts.detach().double().cpu()
    c = c[c.sum(1) > 0]
    if c.shape[0] == 0:
        return {}
    fair = c.sum(1, keepdim=True) / c.shape[1]  # [L, 1]: perfect balance
    over_max = (c.max(1).values - fair[:, 0]) / fair[:, 0]
    return {
        "e_frac_with_tokens:mean": float((c > 0).double().mean(1).mean()),
        "e_frac_oversubscribed:mean": float((c > fair).double().mean(1).mean()),
        "e_max_violation:mean": float(over_max.mean()),
        "e_max_violation:max": float(over_max.max()),
        "e_min_violation:mean": float(((c.min(1).values - fair[:, 0]) / fair[:, 0]).mean()),
    }


def moe_terms(loss: torch.Tensor, r: Routing, config: Mapping[str, object]
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """A request's loss with its auxiliary term (if its config asks for one) and its MoE
    metrics; a forward (no gradients) reports the aux value too."""
    metrics = balance_metrics(r.counts)
    coef = float(config.get(AUX_COEF, 0.0))  # type: ignore[arg-type]
    if coef:
        aux = aux_loss(r)
        metrics["moe_aux_loss:mean"] = float(aux.detach())
        loss = loss + coef * aux
    return loss, metrics


def wants_aux(configs: Iterable[Mapping[str, object]]) -> bool:
    """Whether any of these requests asks for an aux term (its probabilities need a graph)."""
    return any(float(c.get(AUX_COEF, 0.0)) for c in configs)  # type: ignore[arg-type]


def aux_probs_grad(r: Routing, config: Mapping[str, object]) -> torch.Tensor | None:
    """d (coef * aux) / d probs [L, E] of a request whose routing `r` was gathered without
    gradients (micro-batches, training.py): aux is linear in the probability sums given the
    counts, so each micro-batch backpropagates exactly its share. None without an aux term."""
    coef = float(config.get(AUX_COEF, 0.0))  # type: ignore[arg-type]
    if not coef:
        return None
    L, E = r.counts.shape
    denom = float(L * max(r.tokens, 1))
    return (coef * E * r.counts.sum(0) / denom**2).expand(L, E).contiguous()


def check_dense(config: Mapping[str, object]) -> None:
    """ValueError if a dense model's request asks for the MoE auxiliary loss."""
    if float(config.get(AUX_COEF, 0.0)):  # type: ignore[arg-type]
        raise ValueError(f"loss_fn_config[{AUX_COEF!r}] needs a mixture-of-experts base model")
