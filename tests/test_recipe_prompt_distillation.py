"""Smoke tests of the prompt distillation recipe on the tiny model against an embedded server:
the teacher's answers are generated once and cached, the student trains without the system
prompt, logs `nll` and `eval/nll`, saves, resumes without regenerating, and learns."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY
from test_recipes import assert_checkpoint_files, assert_finite, read_jsonl

from tinsmith.recipes import prompt_distillation as pd
from tinsmith.recipes.distillation import QUESTIONS


def args(log_path: Path, max_steps: int, *extra: str) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=4", "samples_per_prompt=2", "max_tokens=8", "eval_fraction=0.25",
            "lora_rank=4", "save_every=2", "eval_every=1", "learning_rate=1e-2", *extra]


def test_generates_once_trains_saves_and_resumes(tmp_path: Path) -> None:
    log = tmp_path / "pd"
    out = pd.main(args(log, 2))
    assert out["start_step"] == 0 and out["generated"]
    data = read_jsonl(log / pd.TEACHER_DATA)
    assert len(data) == 2 * len(QUESTIONS)
    held_out = {r["messages"][0]["content"] for r in data if r["eval"]}
    assert len(held_out) == round(0.25 * len(QUESTIONS))
    assert not held_out & {r["messages"][0]["content"] for r in data if not r["eval"]}
    assert all(m["role"] != "system" for r in data for m in r["messages"])
    assert out["num_train"] + out["num_eval"] == len(data)
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all({"nll", "eval/nll", "eval/first_word", "tokens", "step_s"} <= set(r)
               for r in rows)
    assert all(r["eval/first_word"] * len(held_out) in range(len(held_out) + 1) for r in rows)
    assert_finite(rows)
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])

    mtime = (log / pd.TEACHER_DATA).stat().st_mtime_ns
    out = pd.main(args(log, 3))
    assert out["start_step"] == 2 and out["resumed"] and not out["generated"]
    assert (log / pd.TEACHER_DATA).stat().st_mtime_ns == mtime
    assert read_jsonl(log / pd.TEACHER_DATA) == data
    assert [r["step"] for r in read_jsonl(log / "metrics.jsonl")] == [0, 1, 2]


def test_eval_nll_falls(tmp_path: Path) -> None:
    log = tmp_path / "learn"
    pd.main(args(log, 5, "save_every=0", "temperature=0.0"))
    nll = [r["eval/nll"] for r in read_jsonl(log / "metrics.jsonl")]
    assert nll[-1] < nll[0]


def test_first_word() -> None:
    assert pd.first_word("  Imagine a kitchen...") == "imagine"
    assert pd.first_word("\n\n'Tis the season") == "'tis"
    assert pd.first_word("42 is the answer") == "is" and pd.first_word("...") == ""
