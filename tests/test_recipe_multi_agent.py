"""The multi_agent recipe: guess-the-number rules with scripted guessers, rewards, transcript
tokens, the corrected model responder, and a 2-step run + resume on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY
from test_recipes import (
    assert_checkpoint_files,
    assert_finite,
    assert_resumes_at_step_2,
    read_jsonl,
)

from tinsmith.cookbook.datasets import MultiStepEnv
from tinsmith.recipes import multi_agent as ma

KEYS = {"step", "reward", "solved", "turns", "invalid_guesses", "mixed_groups",
        "transcript_len", "num_datums", "sample_s", "step_s"}


def binary_search(env: ma.GuessNumberEnv) -> tuple[float, dict]:
    lo, hi = 1, env.max_number
    while True:
        guess = (lo + hi) // 2
        obs, reward, done, metrics = env.step(f"My guess is {guess}.")
        if done:
            return reward, metrics
        answer = obs[0]["content"]
        lo, hi = (guess + 1, hi) if answer == "higher" else (lo, guess - 1)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 100])
def test_binary_search_solves_every_number_within_the_bound(n: int) -> None:
    bound = math.ceil(math.log2(n)) + 1
    for secret in range(1, n + 1):
        env = ma.GuessNumberEnv(secret, n, max_turns=bound)
        assert isinstance(env, MultiStepEnv)
        reward, metrics = binary_search(env)
        assert metrics["solved"] == 1.0 and metrics["turns"] <= bound
        assert reward == ma.reward(True, int(metrics["turns"]), bound)


def test_invalid_replies_are_counted_and_the_game_ends_after_max_turns() -> None:
    env = ma.GuessNumberEnv(5, 10, max_turns=3)
    assert "between 1 and 10" in env.initial_observation()[0]["content"]
    obs, reward, done, m = env.step("I have no idea")
    assert not done and reward == 0.0 and "invalid" in obs[0]["content"]
    assert m["invalid_guesses"] == 1.0 and m["turns"] == 1.0
    assert env.step("maybe 2 or 3").observation == [{"role": "user", "content": "higher"}]
    obs, reward, done, m = env.step("9")
    assert done and obs is None and reward == 0.0
    assert m == {"solved": 0.0, "turns": 3.0, "invalid_guesses": 1.0}
    assert ma.parse_guess("x -4 y 7") == -4 and ma.parse_guess("none") is None


def test_reward_values() -> None:
    assert ma.reward(False, 3, 6) == 0.0
    assert ma.reward(True, 1, 6) == pytest.approx(1 + 0.1 * 5 / 6)
    assert ma.reward(True, 6, 6) == 1.0
    assert ma.reward(True, 2, 4) == pytest.approx(1.05)


def test_transcript_tokens_match_the_rendered_conversation() -> None:
    from transformers import AutoTokenizer

    from tinsmith.models.catalog import resolve_model_dir

    renderer = ma.get_renderer(AutoTokenizer.from_pretrained(resolve_model_dir(TINY)))
    before = [{"role": "user", "content": "guess"}]
    reply = {"role": "assistant", "content": "8"}
    after = [*before, reply, {"role": "user", "content": "higher"}]
    prompt = renderer.build_generation_prompt(before)
    sampled = renderer.tokenizer.encode("8", add_special_tokens=False) + renderer.stop_sequences()
    extra = renderer.observation_tokens(before, after, ended=True)
    assert prompt + sampled + extra == renderer.build_generation_prompt(after)
    cut = renderer.observation_tokens(before, after, ended=False)
    assert cut == renderer.stop_sequences() + extra  # the end-of-turn marker is inserted

    datum = ma.transcript_datum([1, 2, 3, 4, 5], [0, 0, -0.5, 0, -1.0],
                                [False, False, True, False, True], 0.5)
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert datum.loss_fn_inputs["logprobs"].tolist() == [0.0, -0.5, 0.0, -1.0]
    assert datum.loss_fn_inputs["advantages"].tolist() == [0.0, 0.5, 0.0, 0.5]


def test_model_responder_is_corrected_by_the_rules() -> None:
    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class Renderer:
        def build_generation_prompt(self, messages):
            return [1, 2]

        def stop_sequences(self):
            return [0]

        def parse_response(self, tokens):
            return {"role": "assistant", "content": " Lower."}, True

    class Sampler:  # always says "lower"
        def sample(self, prompt, num_samples, sampling_params):
            return Done(SimpleNamespace(sequences=[SimpleNamespace(tokens=[3])]))

    responder = ma.ModelResponder(Sampler(), Renderer(), seed=0)
    env = ma.GuessNumberEnv(7, 10, max_turns=4, responder=responder)
    assert env.step("3").observation[0]["content"] == "higher"  # corrected
    assert env.step("9").observation[0]["content"] == "lower"  # right
    assert env.step("7").done
    assert (responder.calls, responder.errors) == (3, 2)


def args(log_path: Path, max_steps: int) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=2", "group_size=4", "max_tokens=4", "lora_rank=4", "save_every=2",
            "max_number=3", "max_turns=2", "learning_rate=1e-3"]


def test_multi_agent_runs_saves_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    # The random tiny model writes no numbers: a stand-in parser turns its reply's length
    # into a guess in [1, 3], so some games are won (on turn 1 or 2) and groups are mixed.
    monkeypatch.setattr(ma, "parse_guess", lambda text: len(text) % 3 + 1)
    log = tmp_path / "ma"
    out = ma.main(args(log, 2))
    assert out["start_step"] == 0 and not out["resumed"] and out["learning_rate"] == 1e-3
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    assert any(r["num_datums"] > 0 for r in rows), rows
    for r in rows:
        assert KEYS <= set(r) and 1.0 <= r["turns"] <= 2.0 and r["invalid_guesses"] == 0.0
        assert r["num_datums"] == 4 * round(r["mixed_groups"] * 2)
        assert r["solved"] <= r["reward"] <= 1.1 * r["solved"] + 1e-9
        if r["num_datums"]:
            assert r["ratio"] == pytest.approx(1.0, abs=1e-3)
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])
    capsys.readouterr()

    assert_resumes_at_step_2(ma.main, args(log, 3), log, capsys, ckpts[-1]["state_path"])
