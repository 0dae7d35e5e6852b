"""Preference training through the SDK: server-side `dpo` / `bradley_terry` in one pass
against the same losses written client-side with `forward_backward_custom`, and the
SDK's `LossHandle` (create_custom_loss) against the server's cross_entropy.

To compare the updates (not just the losses) the optimizer runs with eps = 1, where
Adam's first step is lr * g / (|g| + 1) ~ a plain gradient step: with the usual tiny eps
it is lr * sign(g), which turns float noise in near-zero gradients into full-size steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, logprobs_of
from tinker import types

from tinsmith.recipes.dpo import client_dpo

GRAD_STEP = types.AdamParams(learning_rate=0.05, eps=1.0)
PAIRS = [
    ("Q: What do bees make? A:", " Honey, from nectar.", " Cheese, from milk."),
    ("Q: What is ice? A:", " Frozen water.", " A kind of fire."),
    ("Q: Where do fish live? A:", " In water.", " In the desert sand."),
]


def twin_runs(service_client, seed: int):
    """Two runs with identical initial weights (same rank and seed)."""
    return [service_client.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()
            for _ in range(2)]


def pair_data(tokenizer, ref_run=None) -> list[types.Datum]:
    """Datums 2i (chosen) and 2i+1 (rejected); weights 1 on the response tokens only,
    and the reference logprobs from `ref_run` when given (the dpo layout)."""
    data = []
    for prompt, chosen, rejected in PAIRS:
        p = tokenizer.encode(prompt)
        for response in (chosen, rejected):
            ids = p + tokenizer.encode(response)
            weights = [0.0] * (len(p) - 1) + [1.0] * (len(ids) - len(p))
            data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                    loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}))
    if ref_run is not None:
        refs = logprobs_of(ref_run.forward(data, "cross_entropy").result())
        data = [types.Datum(model_input=d.model_input,
                            loss_fn_inputs={**d.loss_fn_inputs, "ref_logprobs": r.astype(np.float32)})
                for d, r in zip(data, refs)]
    return data


def _w(d: types.Datum, key: str) -> torch.Tensor:
    return torch.tensor(d.loss_fn_inputs[key].to_numpy(), dtype=torch.float32)


def client_bradley_terry(data, logprobs):
    s = torch.stack([(lp * _w(d, "weights")).sum() for d, lp in zip(data, logprobs)])
    return -F.logsigmoid(s[0::2] - s[1::2]).sum(), {}


def _after(run, data) -> list[np.ndarray]:
    return logprobs_of(run.forward(data, "cross_entropy").result())


def assert_same_update(server, client, data) -> None:
    """One GRAD_STEP on each run leaves them giving the same logprobs on `data`."""
    server.optim_step(GRAD_STEP).result()
    client.optim_step(GRAD_STEP).result()
    for a, b in zip(_after(server, data), _after(client, data)):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(("beta", "eps"), [(0.1, 0.0), (0.5, 0.2)])
def test_server_dpo_matches_client_dpo(service_client, tokenizer, beta, eps) -> None:
    server, client = twin_runs(service_client, seed=11)
    data = pair_data(tokenizer, ref_run=server)  # reference = the initial policy
    # One step first, so the policy differs from the reference and the loss is not log 2.
    for run in (server, client):
        run.forward_backward(data[:2], "cross_entropy").result()
        run.optim_step(GRAD_STEP).result()
    out_s = server.forward_backward(data, "dpo", {"beta": beta, "label_smoothing": eps}).result()
    out_c = client.forward_backward_custom(data, client_dpo(beta, eps)).result()
    assert out_s.metrics["loss:sum"] == pytest.approx(out_c.metrics["loss:sum"], abs=1e-4)
    assert out_s.metrics["loss:sum"] != pytest.approx(len(PAIRS) * np.log(2), abs=1e-3)
    assert out_s.metrics["pairs:sum"] == len(PAIRS)
    assert out_s.metrics["pair_accuracy:mean"] == pytest.approx(out_c.metrics["pair_accuracy"])
    before = _after(server, data)
    server.optim_step(GRAD_STEP).result()
    client.optim_step(GRAD_STEP).result()
    after_s, after_c = _after(server, data), _after(client, data)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(after_s, before))
    assert moved > 1e-3  # the update did something...
    for a, b in zip(after_s, after_c):  # ...and the same thing
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_server_bradley_terry_matches_client(service_client, tokenizer) -> None:
    server, client = twin_runs(service_client, seed=12)
    data = pair_data(tokenizer)
    out_s = server.forward_backward(data, "bradley_terry").result()
    out_c = client.forward_backward_custom(data, client_bradley_terry).result()
    assert out_s.metrics["loss:sum"] == pytest.approx(out_c.metrics["loss:sum"], abs=1e-4)
    assert_same_update(server, client, data)


def test_dpo_training_prefers_chosen(service_client, tokenizer) -> None:
    """A few server-side dpo steps raise the chosen-minus-rejected margin."""
    run = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=13).result()
    data = pair_data(tokenizer, ref_run=run)
    first = run.forward(data, "dpo", {"beta": 0.5}).result().metrics
    for _ in range(4):
        run.forward_backward(data, "dpo", {"beta": 0.5}).result()
        run.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    last = run.forward(data, "dpo", {"beta": 0.5}).result().metrics
    assert first["margin:mean"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert last["margin:mean"] > 0.5 and last["pair_accuracy:mean"] == 1.0
    assert last["loss:sum"] < first["loss:sum"]


def test_loss_handle_matches_server_cross_entropy(service_client, tokenizer) -> None:
    """The SDK's traced custom loss (run client-side) gives the server's gradients."""

    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    handle = service_client.create_custom_loss(neg_ll, {"logprobs": 1, "weights": 1}).result()
    server, client = twin_runs(service_client, seed=14)
    data = pair_data(tokenizer)
    out_s = server.forward_backward(data, "cross_entropy").result()
    out_c = client.forward_backward_custom(data, handle).result()
    assert out_c.metrics["loss:sum"] == pytest.approx(out_s.metrics["loss:sum"], rel=1e-5)
    assert_same_update(server, client, data)
