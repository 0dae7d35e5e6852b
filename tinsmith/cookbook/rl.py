"""Pieces the RL-style recipes share: the policy-gradient step and reference logprobs.

`policy_step` sends forward_backward and optim_step before waiting for either (the server
runs them in order, with no round trip between) and returns the server's policy metrics
under short names. `forward_logprobs` reads the logprobs a client gives each datum's
targets, for reference-model terms (DPO's reference, a KL penalty to the base model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import tinker
from tinker import types

# Server metrics (docs/losses.md) logged by the recipes, under these names.
SERVER_METRICS = {"ratio:mean": "ratio", "kl_sampler:mean": "kl_sampler",
                  "clip_fraction:mean": "clip_fraction"}


def policy_step(client: tinker.TrainingClient, data: list[types.Datum], adam: types.AdamParams,
                loss_fn: str = "importance_sampling",
                loss_fn_config: Mapping[str, float] | None = None) -> dict[str, float]:
    """One forward_backward + optim_step; the finite SERVER_METRICS it reported."""
    fwd_bwd = client.forward_backward(data, loss_fn=loss_fn, loss_fn_config=loss_fn_config)
    optim = client.optim_step(adam)
    metrics = fwd_bwd.result().metrics
    optim.result()
    return {name: metrics[key] for key, name in SERVER_METRICS.items()
            if key in metrics and math.isfinite(metrics[key])}


def reference_client(service: tinker.ServiceClient, model_name: str) -> tinker.TrainingClient:
    """A client that scores with the base model: a fresh LoRA adapter is exactly zero."""
    return service.create_lora_training_client(base_model=model_name, rank=1).result()


def forward_logprobs(client: tinker.TrainingClient, data: Sequence[types.Datum]) -> list[np.ndarray]:
    """float32 log p(target) per datum under `client`'s weights (a forward pass; only the
    targets are sent, so the datums may carry inputs of any loss)."""
    scored = [types.Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "weights": np.zeros(len(d.loss_fn_inputs["target_tokens"].to_numpy()), np.float32)})
        for d in data]
    outs = client.forward(scored, "cross_entropy").result().loss_fn_outputs
    return [o["logprobs"].to_numpy().astype(np.float32) for o in outs]
