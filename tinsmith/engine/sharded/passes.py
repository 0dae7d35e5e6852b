"""A packed training pass over a sharded model: each rank computes a share of every
request's rows, the logprobs are all-gathered, every rank computes every loss, and each rank
backpropagates its own rows.

Why this shape (exact for any loss, and safe for FSDP's collectives):
- A loss may couple a request's datums (preference pairs, group normalisations), so it is
  computed over the whole request, with the gathered logprobs as leaves (as
  LocalTrainer._chunked does for micro-batches); d loss / d logprob then flows back through
  each rank's own graph. One forward per pass, no recompute.
- FSDP2 all-gathers a decoder layer's weights in its forward and again in its backward
  (reshard_after_forward): every rank must run every layer's forward and backward the same
  number of times. So every rank takes a share of *every* request of the pass (a request with
  fewer datums than ranks lends a copy of its first datum to the ranks without one, with zero
  gradient), which makes the autograd graph's reach identical on all ranks, and the backward
  includes the final hidden states with a zero gradient, so it runs through every layer on
  every rank even where a rank's own rows had no position under autograd.
- Every rank computes every loss on identical gathered inputs, so all ranks agree on which
  requests failed and whether a backward happens at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tinsmith.engine.backend import TrainWork
from tinsmith.engine.losses import LossRegistry, LossSpec
from tinsmith.engine.moe_routing import check_dense
from tinsmith.engine.training import LocalTrainer
from tinsmith.types import FwdBwdOut, UserError

# Testing only: names a file; while it exists, a rank sleeps the seconds it holds in each pass,
# between its forward and the gather, so a test can kill a rank while a request is in flight.
PAUSE_ENV = "TINSMITH_DEBUG_RANK_PAUSE_FILE"


@dataclass(frozen=True)
class Row:
    work: int  # index into the pass's works
    datum: int  # index into that work's data
    dummy: bool  # a borrowed copy: computed (for FSDP's collectives), never used


def share(works: Sequence[TrainWork], live: Sequence[int], rank: int, world: int) -> list[Row]:
    """This rank's rows: for each live work, its datums split into `world` contiguous
    near-equal chunks (np.array_split), chunk `rank`; an empty chunk borrows datum 0."""
    rows: list[Row] = []
    for i in live:
        mine = np.array_split(np.arange(len(works[i].data)), world)[rank]
        rows += [Row(i, int(j), False) for j in mine] or [Row(i, 0, True)]
    return rows


def sharded_pass(
    works: Sequence[TrainWork], *, forward_only: bool, slot_of: Callable[[str], int],
    losses: LossRegistry, compute: Callable[..., list[torch.Tensor]],
    hidden: Callable[[], torch.Tensor | None], mark_grad: Callable[[str], None],
    rank: int, world: int,
) -> list[FwdBwdOut | Exception]:
    """LocalTrainer.forward_backward_many's contract over the group (collective).

    `compute(rows, grad=, active=, parts=)` is the FSDP-wrapped runner.target_logprobs;
    `hidden()` the final hidden states its last call produced; `mark_grad(run_id)` records
    that a run received gradients."""
    results: list[FwdBwdOut | Exception | None] = [None] * len(works)
    specs: dict[int, LossSpec] = {}
    for i, w in enumerate(works):
        try:
            slot_of(w.run_id)  # NotFound for an unknown run
            specs[i] = losses.get(w.loss_fn)
            check_dense(w.config)  # no MoE on a sharded server: refuse its loss terms
        except ValueError as e:
            results[i] = e if isinstance(e, UserError) else UserError(str(e))
        except Exception as e:  # noqa: BLE001 - fails this request alone, as in one process
            results[i] = e
    live = [i for i in range(len(works)) if i in specs and results[i] is None]
    if not live:
        return results  # type: ignore[return-value]
    rows = share(works, live, rank, world)
    data = [works[r.work].data[r.datum] for r in rows]
    lps = compute([(slot_of(works[r.work].run_id), d) for r, d in zip(rows, data)],
                  grad=not forward_only,
                  active=[specs[r.work].active(d.inputs) for r, d in zip(rows, data)],
                  parts=[r.work for r in rows])
    # As in one process, where a pass's logprobs are one tensor: every request's logprobs are
    # under autograd iff any position of the whole pass is (any rank's, so judged from all data).
    hot = not forward_only and any(_hot(specs[i].active(d.inputs), d) for i in live for d in works[i].data)
    pause = os.environ.get(PAUSE_ENV)
    if pause and os.path.isfile(pause):
        with open(pause) as f:
            time.sleep(float(f.read() or 0))
    # Every rank gets every request's logprobs (host copies; variable shapes, so as objects).
    mine = [(r.work, r.datum, lp.detach().float().cpu()) for r, lp in zip(rows, lps) if not r.dummy]
    gathered: list[list | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    per_work: dict[int, dict[int, torch.Tensor]] = {i: {} for i in live}
    for part in gathered:
        for i, j, lp in part or []:
            per_work[i][j] = lp
    grads: dict[tuple[int, int], torch.Tensor] = {}  # (work, datum) -> d loss / d logprob
    for i in live:
        work = works[i]
        leaves = [per_work[i][j].requires_grad_(hot) for j in range(len(work.data))]
        try:
            loss, out = LocalTrainer.work_loss(work, specs[i], leaves, forward_only)
            results[i] = out
        except Exception as e:  # noqa: BLE001 - fails this request alone, as in one process
            results[i] = e
            continue
        if forward_only or not loss.requires_grad:
            continue
        for j, g in enumerate(torch.autograd.grad(loss, leaves, allow_unused=True)):
            if g is not None:
                grads[(i, j)] = g
        mark_grad(work.run_id)
    if grads:  # the same decision on every rank: the losses were computed from the same inputs
        outs, outs_grads = [], []
        for r, lp in zip(rows, lps):
            if lp.requires_grad:
                g = grads.get((r.work, r.datum)) if not r.dummy else None
                outs.append(lp)
                outs_grads.append(torch.zeros_like(lp) if g is None else g.to(lp.device, lp.dtype))
        h = hidden()
        if h is not None and h.requires_grad:  # through every decoder layer, on every rank
            outs.append(h)
            outs_grads.append(torch.zeros_like(h))
        if outs:
            torch.autograd.backward(outs, outs_grads)
    return results  # type: ignore[return-value]


def _hot(active: np.ndarray | None, datum) -> bool:
    """Whether a datum has a position under autograd (runner.target_logprobs's `hot`)."""
    n = len(datum.inputs["target_tokens"])
    return n > 0 and (active is None or bool(np.asarray(active)[:n].any()))
