"""Operator-defined losses: a Python module named at start-up, called by name like a built-in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, logprobs_of, text_datum

import tinsmith

MODULE = textwrap.dedent('''
    """A squared-error loss pulling logprobs toward a target value, with a metric."""
    from tinsmith.engine.losses import LossSpec, masked_mean

    def logprob_l2(batch, config):
        w = batch.inputs["weights"]
        err = batch.lp - config["target"]
        loss = config["scale"] * (w * err**2).sum()
        return loss, {"abs_error:mean": masked_mean(err.detach().abs(), w != 0)}

    LOSSES = {"logprob_l2": LossSpec(logprob_l2, ("weights",), config={"target": -1.0, "scale": 1.0})}
''')


def test_module_loss_is_served_like_a_builtin(tmp_path, tokenizer) -> None:
    path = tmp_path / "my_losses.py"
    path.write_text(MODULE)
    with tinsmith.local(models=[TINY], data_dir=tmp_path / "data", loss_modules=(str(path),)) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
        data = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
        out = tc.forward(data, "logprob_l2", {"scale": 0.5, "target": -2.0}).result()
        lps = np.concatenate(logprobs_of(out)).astype(np.float64)
        assert out.metrics["loss:sum"] == pytest.approx(0.5 * ((lps + 2.0) ** 2).sum(), rel=1e-5)
        assert out.metrics["abs_error:mean"] == pytest.approx(np.abs(lps + 2.0).mean(), rel=1e-5)
        with pytest.raises(Exception, match="unknown loss_fn_config key"):
            tc.forward(data, "logprob_l2", {"beta": 1.0}).result()
        first = out.metrics["loss:sum"]
        for _ in range(3):
            tc.forward_backward(data, "logprob_l2", {"scale": 0.5, "target": -2.0}).result()
            tc.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
        after = tc.forward(data, "logprob_l2", {"scale": 0.5, "target": -2.0}).result()
        assert after.metrics["loss:sum"] < first  # it trains
        assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] > 0  # built-ins too


def test_bad_loss_module_stops_the_server_with_a_message(tmp_path) -> None:
    clash = tmp_path / "clash.py"
    clash.write_text(MODULE.replace('"logprob_l2": LossSpec', '"ppo": LossSpec'))
    for module, message in ((str(tmp_path / "missing.py"), "does not exist"),
                            (str(clash), "redefines the loss 'ppo'")):
        r = subprocess.run([sys.executable, "-m", "tinsmith.cli", "serve", "--models", TINY,
                            "--data-dir", str(tmp_path / "d"), "--port", "0", "--loss-module", module],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2 and message in r.stderr, r.stderr
