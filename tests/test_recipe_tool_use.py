"""The tool_use recipe: the safe calculator, the calculator environment's protocol, and a
2-step run + resume on the tiny model against an embedded server."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY
from test_recipes import (
    assert_checkpoint_files,
    assert_finite,
    assert_resumes_at_step_2,
    read_jsonl,
)

from tinsmith.cookbook.arithmetic import Problem
from tinsmith.cookbook.datasets import MultiStepEnv
from tinsmith.recipes import tool_use


@pytest.mark.parametrize(("expr", "value"), [
    ("1+2", 3), ("12 * (3 - 1)", 24), ("84/2", 42.0), ("-5 + +2", -3), ("2.5*4", 10.0),
    ("((7))", 7)])
def test_calculator_evaluates_arithmetic(expr: str, value: float) -> None:
    assert tool_use.calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "x + 1", "__import__('os')", "abs(-1)", "(1).real", "2 ** 1000000", "9 ** 9 ** 9",
    "1 // 2", "5 % 3", "True + 1", "1j", "[1, 2]", "1 / 0", "1e308 * 10", "1 +", "",
    "1 + " * 100 + "1"])
def test_calculator_rejects_everything_else(expr: str) -> None:
    with pytest.raises(ValueError):
        tool_use.calculate(expr)


def test_format_number_and_find_call() -> None:
    assert tool_use.format_number(42.0) == "42" and tool_use.format_number(1 / 3) == "0.333333"
    assert tool_use.find_call("so <calc> 3*4 </calc> then <calc>1</calc>") == " 3*4 "
    assert tool_use.find_call("no call here") is None


def test_env_protocol_with_a_scripted_policy() -> None:
    env = tool_use.CalculatorEnv(Problem("Tom has 6 bags of 7 apples...", 42, "multiply", (6, 7)))
    assert isinstance(env, MultiStepEnv)
    first = env.initial_observation()
    assert [m["role"] for m in first] == ["system", "user"] and "<calc>" in first[0]["content"]
    obs, reward, done, info = env.step("Let me compute. <calc>6*7</calc>")
    assert obs == [{"role": "tool", "content": "42"}] and reward == 0.0 and not done
    obs, reward, done, info = env.step("<calc>6 ** 7</calc>")  # malformed: an error reply
    assert obs[0]["content"].startswith("error:") and not done
    obs, reward, done, info = env.step("The answer is \\boxed{42}.")
    assert obs is None and done
    assert reward == pytest.approx(1.0 + 0.1 + tool_use.TOOL_BONUS)
    assert info == {"correct": 1.0, "format": 1.0, "tool_calls": 1.0, "turns": 3.0}
    # No tool call, wrong answer: only the format bonus. max_turns ends a calling episode.
    env = tool_use.CalculatorEnv(Problem("q", 5, "add", (2, 3)), max_turns=1)
    assert env.step("\\boxed{4}")[1:3] == (pytest.approx(0.1), True)
    env = tool_use.CalculatorEnv(Problem("q", 5, "add", (2, 3)), max_turns=2)
    assert not env.step("<calc>2+3</calc>")[2]
    _, reward, done, info = env.step("<calc>2+3</calc>")
    assert done and reward == pytest.approx(tool_use.TOOL_BONUS) and info["turns"] == 2.0


@pytest.fixture
def scripted_tiny_model(monkeypatch):
    """The random tiny model neither calls the tool nor boxes an answer: every turn is read
    as a call (so episodes run max_turns) and odd-length final turns are rewarded."""
    monkeypatch.setattr(tool_use, "find_call", lambda text: "6*7")
    monkeypatch.setattr(tool_use, "grade", lambda text, answer: (
        float(len(text) % 2), {"correct": float(len(text) % 2), "format": 0.0}))


def args(log: Path, max_steps: int) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log}", f"max_steps={max_steps}", "batch_size=2",
            "group_size=4", "max_turns=2", "max_tokens=5", "lora_rank=4", "save_every=2",
            "learning_rate=1e-3"]


def test_tool_use_runs_saves_and_resumes(tmp_path: Path, scripted_tiny_model, capsys) -> None:
    log = tmp_path / "tool"
    out = tool_use.main(args(log, 2))
    assert out["start_step"] == 0 and not out["resumed"]
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    assert any(r["num_datums"] > 0 for r in rows), rows
    for r in rows:
        assert r["turns"] == 2.0 and r["tool_calls"] == 2.0
        assert r["num_datums"] == 4 * round(r["mixed_groups"] * 2)
        if r["num_datums"]:  # on-policy: the datums are exactly what was sampled
            assert r["ratio"] == pytest.approx(1.0, abs=1e-3) and abs(r["kl_sampler"]) < 1e-3
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])
    capsys.readouterr()

    assert_resumes_at_step_2(tool_use.main, args(log, 3), log, capsys, ckpts[-1]["state_path"])
