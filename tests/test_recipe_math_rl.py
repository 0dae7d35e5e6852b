"""Smoke tests of the math_rl recipe on the tiny model against an embedded server: metrics
with evaluation keys, checkpoints, transcripts, resume, the ppo loss and the KL penalty."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY
from test_recipes import (
    assert_checkpoint_files,
    assert_finite,
    assert_resumes_at_step_2,
    read_jsonl,
)
from tinker import types

from tinsmith.cookbook import arithmetic, hyperparams
from tinsmith.cookbook.recipe import parse_config
from tinsmith.cookbook.rl import grpo_datums
from tinsmith.recipes import math_rl

RL_KEYS = {"step", "reward", "correct", "format", "mixed_groups", "response_len", "num_datums",
           "sample_s", "step_s"}
EVAL_KEYS = {"eval/accuracy", "eval/format"}


def args(log_path: Path, max_steps: int, *extra: str) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=2", "group_size=4", "max_tokens=6", "lora_rank=4", "save_every=2",
            "eval_every=2", "eval_size=3", "num_transcripts=3", *extra]


@pytest.fixture
def odd_length_grader(monkeypatch):
    """The random tiny model never writes \\boxed{}: every group would score the same and be
    skipped. A stand-in grader rewards odd-length answers, so groups are mixed."""
    monkeypatch.setattr(math_rl, "grade", lambda text, answer: (
        float(len(text) % 2), {"correct": float(len(text) % 2), "format": 1.0}))


def test_math_rl_runs_evaluates_saves_and_resumes(tmp_path: Path, odd_length_grader,
                                                  capsys) -> None:
    log = tmp_path / "math"
    out = math_rl.main(args(log, 2, "learning_rate=1e-3"))
    assert out["start_step"] == 0 and not out["resumed"] and out["learning_rate"] == 1e-3
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    assert EVAL_KEYS <= set(rows[0]) and not EVAL_KEYS & set(rows[1])  # eval_every=2: step 0
    assert 0.0 <= rows[0]["eval/accuracy"] <= 1.0 and rows[0]["eval/format"] == 1.0
    assert any(r["num_datums"] > 0 for r in rows), rows
    for r in rows:
        assert RL_KEYS <= set(r)
        assert r["response_len"] <= 6
        assert r["num_datums"] == 4 * round(r["mixed_groups"] * 2)  # whole groups, 4 each
        if r["num_datums"]:  # importance_sampling: ratio and kl, no clipping
            assert r["ratio"] == pytest.approx(1.0, abs=1e-3) and abs(r["kl_sampler"]) < 1e-3
            assert "clip_fraction" not in r and "kl_ref" not in r
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])
    page = (log / "transcripts" / "step_000000.html").read_text()
    assert page.count("problem 0, sample") == 3 and "reward" in page
    assert not (log / "transcripts" / "step_000001.html").exists()
    assert json.loads((log / "config.json").read_text())["lr"] == 1e-3
    capsys.readouterr()

    rows = assert_resumes_at_step_2(math_rl.main, args(log, 3, "learning_rate=1e-3"), log, capsys,
                                    ckpts[-1]["state_path"], checkpoints=False)
    assert EVAL_KEYS <= set(rows[2])  # step 2 is an eval step
    assert (log / "transcripts" / "step_000002.html").is_file()
    assert [c["step"] for c in read_jsonl(log / "checkpoints.jsonl")] == [2, 3]


def test_ppo_loss_reports_clip_fraction_and_kl_penalty_runs(tmp_path: Path,
                                                           odd_length_grader) -> None:
    log = tmp_path / "ppo"
    math_rl.main(args(log, 1, "loss=ppo", "kl_coeff=0.1", "eval_every=0",
                      "clip_low_threshold=0.7", "clip_high_threshold=1.3"))
    [row] = read_jsonl(log / "metrics.jsonl")
    assert_finite([row])
    assert row["num_datums"] > 0, row
    assert 0.0 <= row["clip_fraction"] <= 1.0  # only ppo/cispo (of these losses) report it
    assert row["ratio"] == pytest.approx(1.0, abs=1e-3)
    # The policy starts as the base model: sampler and reference agree on the sampled tokens.
    assert abs(row["kl_ref"]) < 1e-3
    assert not EVAL_KEYS & set(row) and not (log / "transcripts").exists()


def test_kl_penalty_shifts_advantages_by_the_logprob_gap() -> None:
    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class Ref:  # a reference model whose logprob is -1 everywhere
        def forward(self, data, loss_fn):
            assert loss_fn == "cross_entropy"
            outs = [{"logprobs": types.TensorData.from_numpy(np.full(
                len(d.loss_fn_inputs["target_tokens"].to_numpy()), -1.0, np.float32))}
                for d in data]
            return Done(types.ForwardBackwardOutput(loss_fn_output_type="cross_entropy",
                                                    loss_fn_outputs=outs, metrics={}))

    seq = SimpleNamespace(tokens=[4, 5], logprobs=[-0.5, -2.0])  # advantages +-0.25:
    (datum, _), n_sampled, _ = grpo_datums([([1, 2, 3], seq)] * 2, [1.0, 0.5], group_size=2)
    [out], mean_gap = math_rl.with_kl_penalty(Ref(), [datum], n_sampled[:1], kl_coeff=0.5)
    advantages = out.loss_fn_inputs["advantages"].to_numpy()
    # prompt positions untouched; sampled: 0.25 - 0.5 * (lq - (-1))
    assert advantages.tolist() == pytest.approx([0.0, 0.0, 0.25 - 0.25, 0.25 + 0.5])
    assert mean_gap == pytest.approx(((-0.5 + 1) + (-2.0 + 1)) / 2)


def test_config_defaults_eval_set_and_learning_rate_rule() -> None:
    cfg = parse_config(math_rl.Config, ["loss=cispo", "kl_coeff=0.2", "batch_size=8"])
    assert cfg.loss == "cispo" and cfg.kl_coeff == 0.2 and cfg.learning_rate is None
    assert math_rl.loss_config(cfg) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert math_rl.loss_config(math_rl.Config()) is None
    with pytest.raises(SystemExit):
        parse_config(math_rl.Config, ["loss=dpo"])
    # Default LR: the hyperparams LoRA rate for the model, sqrt-scaled from 32 problems.
    from tinsmith.models.catalog import resolve_model_dir

    lora_lr = hyperparams.get_lora_lr_for_model(resolve_model_dir(TINY))
    tiny = math_rl.Config(model_name=TINY, batch_size=8)
    assert math_rl.learning_rate(tiny) == pytest.approx(lora_lr * math.sqrt(8 / 32))
    assert math_rl.learning_rate(math_rl.Config(learning_rate=3e-5)) == 3e-5
    # The held-out set is fixed and drawn from a seed no training step uses.
    assert math_rl.eval_problems(cfg) == math_rl.eval_problems(cfg)
    assert math_rl.EVAL_SEED > 1000 * math_rl.TRAIN_SEED_STRIDE + 10**6
    train_questions = {p.question for s in range(20)
                       for p in arithmetic.make_problems(8, seed=s, difficulty="hard")}
    held_out = math_rl.eval_problems(math_rl.Config(difficulty="hard"))
    assert not train_questions & {p.question for p in held_out}
