"""One short end-to-end run on the bundled SmolLM2-135M-Instruct model: the demo itself
(through the SDK over HTTP), with few steps. Slow-ish (~1 min); the only test on it."""

from __future__ import annotations

import pytest

from tinsmith.config import DEFAULT_MODEL
from tinsmith.demo import FACTS, run_demo


@pytest.mark.slow
def test_demo_trains_the_bundled_model(tmp_path) -> None:
    result = run_demo(model=DEFAULT_MODEL, steps=6, learning_rate=1e-3, data_dir=tmp_path)
    losses = result["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(result["before"]) == len(result["after"]) == len(FACTS)
    assert all(isinstance(a, str) and a for a in result["after"])
    assert result["before"] != result["after"]
