"""The tool_use recipe: the safe calculator, the calculator and search environments'
protocols, and 2-step runs + resume (tool=calculator, tool=search) on the tiny model against
an embedded server. The search index itself: tests/test_search_index.py."""

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

from tinsmith.cookbook import tools
from tinsmith.cookbook.arithmetic import Problem, make_problems
from tinsmith.cookbook.datasets import MultiStepEnv
from tinsmith.cookbook.search_index import (
    Document,
    LookupProblem,
    SearchIndex,
    knowledge_base,
    make_lookup_problems,
)
from tinsmith.recipes import tool_use


@pytest.mark.parametrize(("expr", "value"), [
    ("1+2", 3), ("12 * (3 - 1)", 24), ("84/2", 42.0), ("-5 + +2", -3), ("2.5*4", 10.0),
    ("((7))", 7)])
def test_calculator_evaluates_arithmetic(expr: str, value: float) -> None:
    assert tools.calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "x + 1", "__import__('os')", "abs(-1)", "(1).real", "2 ** 1000000", "9 ** 9 ** 9",
    "1 // 2", "5 % 3", "True + 1", "1j", "[1, 2]", "1 / 0", "1e308 * 10", "1 +", "",
    "1 + " * 100 + "1"])
def test_calculator_rejects_everything_else(expr: str) -> None:
    with pytest.raises(ValueError):
        tools.calculate(expr)


def test_format_number_and_find_call() -> None:
    assert tools.format_number(42.0) == "42" and tools.format_number(1 / 3) == "0.333333"
    assert tools.find_call("so <calc> 3*4 </calc> then <calc>1</calc>") == " 3*4 "
    assert tools.find_call("no call here") is None


def test_env_protocol_with_a_scripted_policy() -> None:
    env = tools.CalculatorEnv(Problem("Tom has 6 bags of 7 apples...", 42, "multiply", (6, 7)))
    assert isinstance(env, MultiStepEnv)
    first = env.initial_observation()
    assert [m["role"] for m in first] == ["system", "user", "assistant", "tool", "assistant",
                                          "user"] and "<calc>" in first[0]["content"]
    assert first[-1]["content"].startswith("Tom has") and "<calc>" in first[2]["content"]
    obs, reward, done, info = env.step("Let me compute. <calc>6*7</calc>")
    assert obs == [{"role": "tool", "content": "42"}] and reward == 0.0 and not done
    obs, reward, done, info = env.step("<calc>6 ** 7</calc>")  # malformed: an error reply
    assert obs[0]["content"].startswith("error:") and not done
    obs, reward, done, info = env.step("The answer is \\boxed{42}.")
    assert obs is None and done
    assert reward == pytest.approx(1.0 + 0.1 + tools.TOOL_BONUS)
    assert info == {"correct": 1.0, "format": 1.0, "tool_calls": 1.0, "turns": 3.0}
    # No tool call, wrong answer: only the format bonus. max_turns ends a calling episode.
    env = tools.CalculatorEnv(Problem("q", 5, "add", (2, 3)), max_turns=1)
    assert env.step("\\boxed{4}")[1:3] == (pytest.approx(0.1), True)
    env = tools.CalculatorEnv(Problem("q", 5, "add", (2, 3)), max_turns=2)
    assert not env.step("<calc>2+3</calc>")[2]
    _, reward, done, info = env.step("<calc>2+3</calc>")
    assert done and reward == pytest.approx(tools.TOOL_BONUS) and info["turns"] == 2.0


def lookup(numeric: bool) -> LookupProblem:
    """The first built-in question with a numeric (or a word) answer."""
    return next(p for p in make_lookup_problems(80, seed=0) if p.answer.isdigit() == numeric)


def test_search_env_protocol_with_a_scripted_policy() -> None:
    problem = lookup(numeric=False)
    env = tools.SearchEnv(problem, SearchIndex(knowledge_base(0)), max_turns=4)
    assert isinstance(env, MultiStepEnv)
    first = env.initial_observation()
    assert [m["role"] for m in first][-2:] == ["assistant", "user"]
    assert "<search>" in first[0]["content"] and "<search>" in first[2]["content"]
    assert first[-1]["content"] == problem.question
    bare = tools.SearchEnv(problem, SearchIndex(knowledge_base(0)), fewshot=False)
    assert [m["role"] for m in bare.initial_observation()] == ["system", "user"]
    obs, reward, done, info = env.step(f"Let me look. <search>{problem.question}</search>")
    assert reward == 0.0 and not done and info == {} and obs is not None
    lines = obs[0]["content"].splitlines()
    assert obs[0]["role"] == "tool" and len(lines) == 3
    assert lines[0].startswith(f"[{problem.doc_id}] ") and problem.answer in lines[0]
    obs, reward, done, _ = env.step("<search> ?! </search>")  # empty query: an error reply
    assert obs == [{"role": "tool", "content": "error: empty query"}] and not done
    obs, reward, done, info = env.step(f"It is \\boxed{{ {problem.answer.upper()} }}.")
    assert obs is None and done
    assert reward == pytest.approx(1.0 + 0.1 + tools.TOOL_BONUS)
    assert info == {"correct": 1.0, "format": 1.0, "tool_calls": 1.0, "turns": 3.0}


def test_search_env_wrong_answers_no_search_and_max_turns() -> None:
    index = SearchIndex(knowledge_base(0))
    word, number = lookup(numeric=False), lookup(numeric=True)
    # No search, wrong answer: only the format bonus; no box at all: nothing.
    env = tools.SearchEnv(word, index)
    assert env.step(f"\\boxed{{{word.answer}x}}")[1:3] == (pytest.approx(0.1), True)
    assert tools.SearchEnv(word, index).step(f"It is {word.answer}.")[1:3] == (0.0, True)
    # Numbers are exact (thousands commas allowed); words must be the whole answer.
    n = int(number.answer)
    assert tools.SearchEnv(number, index).step(f"\\boxed{{{n:,}}}")[1] == pytest.approx(1.1)
    assert tools.SearchEnv(number, index).step(f"\\boxed{{{n + 1}}}")[1] == pytest.approx(0.1)
    env = tools.SearchEnv(word, index)
    assert env.step(f"\\boxed{{{word.answer} city}}")[1] == pytest.approx(0.1)
    # A search with no results earns no bonus; max_turns ends a searching episode.
    env = tools.SearchEnv(word, index, max_turns=2)
    obs, _, done, _ = env.step("<search>zzqx</search>")
    assert obs == [{"role": "tool", "content": "no results"}] and not done
    _, reward, done, info = env.step("I do not know.")
    assert done and reward == 0.0 and info["tool_calls"] == 0.0 and info["turns"] == 2.0
    env = tools.SearchEnv(word, index, max_turns=2)
    assert not env.step("<search>capital</search>")[2]
    _, reward, done, info = env.step("<search>capital</search> \\boxed{nope}")
    assert done and reward == pytest.approx(0.1 + tools.TOOL_BONUS) and info["tool_calls"] == 1


def test_search_reply_cuts_long_documents() -> None:
    long = Document("long", "word " * 200)
    env = tools.SearchEnv(LookupProblem("q", "a", "long"), SearchIndex([long]), k=5)
    obs = env.step("<search>WORD</search>")[0]
    assert obs is not None
    reply = obs[0]["content"]
    assert reply.startswith("[long] word word") and reply.endswith("...")
    assert len(reply) <= len("[long] ") + tools.MAX_DOC_CHARS


@pytest.fixture
def scripted_tiny_model(monkeypatch):
    """The random tiny model neither calls a tool nor boxes an answer: every turn is read
    as a call (so episodes run max_turns; "capital of" always finds documents) and
    odd-length final turns are rewarded."""
    def odd_length(text: str, answer: object) -> tuple[float, dict[str, float]]:
        return float(len(text) % 2), {"correct": float(len(text) % 2), "format": 0.0}

    monkeypatch.setattr(tools, "find_call",
                        lambda text, tag="calc": "6*7" if tag == "calc" else "capital of")
    monkeypatch.setattr(tools, "grade", odd_length)
    monkeypatch.setattr(tools, "grade_lookup", odd_length)


def args(log: Path, max_steps: int, *extra: str) -> list[str]:
    return [*extra, f"model_name={TINY}", f"log_path={log}", f"max_steps={max_steps}",
            "batch_size=2", "group_size=4", "max_turns=2", "max_tokens=5", "lora_rank=4",
            "save_every=2", "learning_rate=1e-3"]


@pytest.mark.parametrize("tool", ["calculator", "search"])
def test_tool_use_runs_saves_and_resumes(tmp_path: Path, scripted_tiny_model, capsys,
                                         tool: str) -> None:
    log = tmp_path / "tool"
    out = tool_use.main(args(log, 2, f"tool={tool}"))
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

    assert_resumes_at_step_2(tool_use.main, args(log, 3, f"tool={tool}"), log, capsys,
                             ckpts[-1]["state_path"])


@pytest.mark.parametrize("difficulty", ["medium", "hard"])
def test_calculator_demonstrations_replay_to_full_reward(difficulty: str) -> None:
    """A scripted episode is correct: replayed through a fresh env it earns every bonus."""
    for problem in make_problems(12, seed=3, difficulty=difficulty):
        assert tools.calculate(tools.expression(problem)) == problem.answer
        assert_demonstration_earns_full_reward(tools.CalculatorEnv(problem),
                                               tools.CalculatorEnv(problem))


def test_search_demonstrations_replay_to_full_reward() -> None:
    index = SearchIndex(knowledge_base(5))
    for problem in make_lookup_problems(12, seed=5):
        assert_demonstration_earns_full_reward(tools.SearchEnv(problem, index),
                                               tools.SearchEnv(problem, index))


def assert_demonstration_earns_full_reward(env: tools.ToolEnv, fresh: tools.ToolEnv) -> None:
    demo = env.demonstration()
    assert demo[:-3] == fresh.initial_observation()
    assert [m["role"] for m in demo[-3:]] == ["assistant", "tool", "assistant"]
    obs, reward, done, _ = fresh.step(demo[-3]["content"])
    assert obs == [demo[-2]] and reward == 0.0 and not done
    _, reward, done, info = fresh.step(demo[-1]["content"])
    assert done and info["correct"] == 1.0 and info["tool_calls"] == 1.0
    assert reward == pytest.approx(1.0 + 0.1 + tools.TOOL_BONUS)


def test_warm_start_trains_on_demonstrations_first(tmp_path: Path, capsys) -> None:
    log = tmp_path / "warm"
    warm = ["tool=search", "sft_steps=2", "sft_examples=8"]
    out = tool_use.main(args(log, 1, *warm))
    assert out["start_step"] == 0
    sft_rows = read_jsonl(log / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_rows] == [0, 1] and all(r["tokens"] > 0 for r in sft_rows)
    assert_finite(sft_rows)
    assert [r["step"] for r in read_jsonl(log / "metrics.jsonl")] == [0]
    capsys.readouterr()
    out = tool_use.main(args(log, 2, *warm))  # the warm start is not run twice
    assert out["start_step"] == 1
    assert "sft: done (2 steps)" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(log / "sft" / "metrics.jsonl")] == [0, 1]
