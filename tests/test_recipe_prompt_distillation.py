"""Smoke tests of the prompt distillation recipe on the tiny model against an embedded server:
the teacher's answers are generated once and cached, the student trains without the system
prompt, logs `nll`, `eval/nll` and the behaviour metrics, saves, resumes without
regenerating, and learns; and the behaviour check (`opens_with`) on its own."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY
from test_recipes import assert_checkpoint_files, assert_finite, read_jsonl

from tinsmith.recipes import prompt_distillation as pd
from tinsmith.recipes.prompt_distillation import QUESTIONS


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
    assert all({"nll", "eval/nll", "eval/first_word", "eval/follows", "tokens", "step_s"}
               <= set(r) for r in rows)
    assert all(r[k] * len(held_out) in range(len(held_out) + 1)
               for r in rows for k in ("eval/first_word", "eval/follows", "teacher_follows")
               if k in r)
    # The default prompt's marker is checked; its rates are logged with the first step only.
    assert "teacher_follows" in rows[0] and "teacher_follows" not in rows[1]
    assert rows[0]["data_follows"] == pd.follows_share(
        [r["answer"] for r in data if not r["eval"]], pd.MARKER)
    assert_finite(rows)
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])

    mtime = (log / pd.TEACHER_DATA).stat().st_mtime_ns
    out = pd.main(args(log, 3))
    assert out["start_step"] == 2 and out["resumed"] and not out["generated"]
    assert (log / pd.TEACHER_DATA).stat().st_mtime_ns == mtime
    assert read_jsonl(log / pd.TEACHER_DATA) == data
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "teacher_follows" in rows[2] and "generate_s" not in rows[2]


def test_eval_nll_falls(tmp_path: Path) -> None:
    log = tmp_path / "learn"
    pd.main(args(log, 5, "save_every=0", "temperature=0.0"))
    nll = [r["eval/nll"] for r in read_jsonl(log / "metrics.jsonl")]
    assert nll[-1] < nll[0]


def test_first_word() -> None:
    assert pd.first_word("  Imagine a kitchen...") == "imagine"
    assert pd.first_word("\n\n'Tis the season") == "'tis"
    assert pd.first_word("42 is the answer") == "is" and pd.first_word("...") == ""


def test_custom_prompt_checks_only_a_given_marker(tmp_path: Path) -> None:
    """Another system prompt has no known marker: no `eval/follows` unless one is given.
    With a greedy teacher, the cached held-out answers (`max_tokens` long) are prefixes of
    the greedy answers `teacher_follows` checks (a few tokens longer than the marker), so
    at least as many of those open with the marker, here the first word of one of them."""
    custom = ["teacher_system=Answer briefly.", "temperature=0.0", "save_every=0"]
    pd.main(args(tmp_path / "none", 1, *custom))
    row = read_jsonl(tmp_path / "none" / "metrics.jsonl")[0]
    assert "eval/first_word" in row
    assert not {"eval/follows", "teacher_follows", "data_follows"} & set(row)

    data = read_jsonl(tmp_path / "none" / pd.TEACHER_DATA)
    held_out = {r["messages"][0]["content"]: r["answer"] for r in data if r["eval"]}
    marker = pd.first_word(next(a for a in held_out.values() if pd.first_word(a)))
    pd.main(args(tmp_path / "given", 1, *custom, f"marker={marker}"))
    row = read_jsonl(tmp_path / "given" / "metrics.jsonl")[0]
    assert row["teacher_follows"] >= pd.follows_share(list(held_out.values()), marker) > 0
    assert 0.0 <= row["eval/follows"] <= 1.0


def test_opens_with() -> None:
    assert pd.opens_with("Hello, friend! The sky is blue.", pd.MARKER)
    assert pd.opens_with("  hello friend. Gravity...", "Hello, friend!")
    assert not pd.opens_with("Hello! The sky is blue.", pd.MARKER)
    assert not pd.opens_with("The sky is blue. Hello, friend!", pd.MARKER)
    assert not pd.opens_with("Hello, friendly people", pd.MARKER)  # words, not characters
    assert not pd.opens_with("Hello, friend!", "") and not pd.opens_with("", pd.MARKER)
    assert pd.follows_share(["Hello, friend! Yes.", "Hi.", "hello friend", "No"], pd.MARKER) == 0.5


def test_behaviour_marker() -> None:
    default = pd.Config()
    assert default.teacher_system == pd.TEACHER_SYSTEM and pd.MARKER in pd.TEACHER_SYSTEM
    assert pd.behaviour_marker(default) == pd.MARKER
    assert pd.behaviour_marker(pd.Config(teacher_system="Answer in French.")) == ""
    assert pd.behaviour_marker(pd.Config(teacher_system="Say Bonjour.", marker="Bonjour")) \
        == "Bonjour"
    assert pd.behaviour_marker(pd.Config(marker="")) == ""
