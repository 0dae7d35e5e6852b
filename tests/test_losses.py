"""Each loss against a NumPy reference: value and gradient with respect to the logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinsmith.engine.losses import LOSSES, get_loss


def _run(name: str, lp: np.ndarray, inputs: dict[str, np.ndarray], config=None):
    t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    loss, metrics = get_loss(name).fn(t, {k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()},
                                      config or {})
    loss.backward()
    return float(loss.detach()), t.grad.numpy(), metrics


@pytest.mark.parametrize("shape", [(7,), (5, 3)])
def test_cross_entropy_matches_numpy(shape) -> None:
    rng = np.random.default_rng(0)
    lp = -rng.random(shape) * 5
    w = rng.normal(size=shape)  # any real weights, negative ones included
    value, grad, metrics = _run("cross_entropy", lp, {"weights": w})
    assert value == pytest.approx(float(-(w * lp).sum()), rel=1e-12)  # a sum: no normalisation
    np.testing.assert_allclose(grad, -w, rtol=1e-12)
    assert metrics == {}


def test_cross_entropy_edge_cases() -> None:
    lp = np.array([-1.0, -2.0, -3.0])
    value, grad, _ = _run("cross_entropy", lp, {"weights": np.zeros(3)})  # forward-only pass of custom losses
    assert value == 0.0 and (grad == 0).all()
    value, grad, _ = _run("cross_entropy", np.zeros(0), {"weights": np.zeros(0)})  # empty completion
    assert value == 0.0 and grad.shape == (0,)
    value, _, _ = _run("cross_entropy", lp, {"weights": np.array([0.0, 1.0, 0.0])})  # masked tokens
    assert value == pytest.approx(2.0)


def test_registry_names_and_unknown() -> None:
    assert "cross_entropy" in LOSSES
    with pytest.raises(KeyError):
        get_loss("no_such_loss")
