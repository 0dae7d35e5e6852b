"""Smoke tests of the distillation recipe on the tiny model against an embedded server:
off_policy (top-K cross-entropy) runs, saves, learns and resumes; on_policy (reverse KL)
runs; and the [N, K] datum has the documented weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from test_recipes import (
    assert_checkpoint_files,
    assert_finite,
    assert_resumes_at_step_2,
    read_jsonl,
)

from tinsmith.recipes import distillation

OFF_KEYS = {"step", "response_len", "num_datums", "num_tokens", "sample_s", "step_s", "loss",
            "teacher_entropy", "kl"}
ON_KEYS = {"step", "response_len", "num_datums", "sample_s", "step_s", "reverse_kl",
           "teacher_logprob", "student_logprob", "ratio", "kl_sampler"}


def args(log_path: Path, max_steps: int, *extra: str) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=2", "topk=4", "max_tokens=6", "lora_rank=4", "save_every=2",
            "group_size=2", *extra]


def test_topk_datum_weights_sum_to_one_and_skip_the_prompt() -> None:
    prompt, response = [5, 6, 7, 8], [9, 10, 11]
    rows = [[(9, -0.1), (3, -1.0), (4, -2.0), (2, -3.0)],
            [(10, -0.5), (12, -0.7), (13, -4.0), (14, -9.0)],
            [(11, -1.2), (1, -1.3), (0, -1.4), (15, -1.5)]]
    datum, entropy = distillation.topk_datum(prompt, response, rows)
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    n = len(prompt) + len(response) - 1
    assert targets.shape == weights.shape == (n, 4)
    assert datum.model_input.to_ints() == (prompt + response)[:-1]
    assert weights.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(weights[:len(prompt) - 1], 0.0)  # prompt positions
    np.testing.assert_array_equal(targets[:len(prompt) - 1, 0], prompt[1:])  # valid ids
    np.testing.assert_array_equal(targets[len(prompt) - 1:], [[i for i, _ in r] for r in rows])
    for row, w in zip(rows, weights[len(prompt) - 1:]):  # softmax of the K logprobs / length
        p = np.exp([lp for _, lp in row])
        np.testing.assert_allclose(w, p / p.sum() / len(response), rtol=1e-5)
    assert 0.0 < entropy < np.log(4)


def test_prompts_jsonl_and_teacher_system(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Why?"}\n\n{"messages": [{"role": "user", "content": "How?"}]}\n')
    cfg = distillation.Config(prompts_path=str(path), batch_size=3)
    prompts = distillation.load_prompts(cfg)
    assert prompts == [[{"role": "user", "content": "Why?"}], [{"role": "user", "content": "How?"}]]
    assert len(distillation.step_prompts(prompts, cfg, 0)) == 3
    assert distillation.step_prompts(prompts, cfg, 4) == distillation.step_prompts(prompts, cfg, 4)
    assert distillation.teacher_messages(cfg, prompts[0])[0]["role"] == "system"
    assert distillation.teacher_messages(distillation.Config(teacher_system=""), prompts[0]) == \
        prompts[0]


def test_off_policy_runs_saves_and_resumes(tmp_path: Path, capsys) -> None:
    log = tmp_path / "off"
    out = distillation.main(args(log, 2))
    assert out["start_step"] == 0 and not out["resumed"]
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    for r in rows:
        assert set(r) == OFF_KEYS
        assert r["num_datums"] == 2 and 0 < r["response_len"] <= 6
        assert r["loss"] >= r["teacher_entropy"] - 1e-4  # a cross-entropy: at least the entropy
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])
    assert json.loads((log / "config.json").read_text())["mode"] == "off_policy"
    capsys.readouterr()

    assert_resumes_at_step_2(distillation.main, args(log, 3), log, capsys, ckpts[-1]["state_path"])


def test_off_policy_loss_falls(tmp_path: Path) -> None:
    # Greedy teacher answers: the same targets every step, so at a high lr the student's
    # cross-entropy to the teacher's top-4 must fall towards the teacher's entropy.
    log = tmp_path / "learn"
    distillation.main(args(log, 5, "temperature=0", "learning_rate=1e-2", "save_every=0"))
    rows = read_jsonl(log / "metrics.jsonl")
    assert_finite(rows)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
    assert rows[-1]["kl"] < rows[0]["kl"]


def test_on_policy_runs_with_reverse_kl(tmp_path: Path) -> None:
    log = tmp_path / "on"
    out = distillation.main(args(log, 2, "mode=on_policy", "learning_rate=1e-3"))
    assert out["start_step"] == 0
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    for r in rows:
        assert set(r) == ON_KEYS
        assert r["num_datums"] == 4 and r["response_len"] <= 6
        assert r["teacher_logprob"] < 0 and r["student_logprob"] < 0
        assert r["reverse_kl"] == pytest.approx(r["student_logprob"] - r["teacher_logprob"],
                                                abs=1e-4)
        assert r["ratio"] == pytest.approx(1.0, abs=1e-3)  # on-policy
    assert_checkpoint_files(log, read_jsonl(log / "checkpoints.jsonl")[-1])


def test_help_explains_both_modes() -> None:
    out = subprocess.run([sys.executable, "-m", "tinsmith.recipes.distillation", "--help"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for word in ("off_policy", "on_policy", "What it leaves out", "teacher_system", "topk"):
        assert word in out.stdout
