"""The multi_agent recipe: guess-the-number rules, the scripted binary-search games of the
warm start (they win, and are exactly the tokens the game renders), rewards, transcript
tokens, the corrected model responder, and 2-step runs + resume on the tiny model, without
and with the warm start."""

from __future__ import annotations

import itertools
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

from tinsmith.config import DEFAULT_MODEL
from tinsmith.cookbook.datasets import MultiStepEnv
from tinsmith.cookbook.recipe import training_client
from tinsmith.cookbook.renderers import TrainOn
from tinsmith.cookbook.rl import run_episodes, transcript_datum
from tinsmith.recipes import multi_agent as ma

KEYS = {"step", "reward", "solved", "turns", "invalid_guesses", "mixed_groups",
        "transcript_len", "num_datums", "sample_s", "step_s"}


def replay(env: ma.GuessNumberEnv, demo: list[dict]) -> tuple[float, dict]:
    """Play a scripted game's guesses through `env`, checking each answer against the
    script; the final step's reward and metrics."""
    assert demo[:1] == env.initial_observation()
    assert [m["role"] for m in demo[1:]] == ["assistant", "user"] * (len(demo) // 2 - 1) + [
        "assistant"]
    for k in range(1, len(demo), 2):
        assert demo[k]["content"].isdigit()  # a bare number: the reply format taught
        obs, reward, done, metrics = env.step(demo[k]["content"])
        assert done == (k == len(demo) - 1)
        if done:
            return reward, metrics
        assert obs == [demo[k + 1]] and reward == 0.0


@pytest.mark.parametrize("n", [1, 2, 7, 16, 100])
def test_demonstrations_solve_every_number_within_the_bound(n: int) -> None:
    """The scripted binary search wins every game with ceil(log2(n + 1)) guesses allowed."""
    bound = math.ceil(math.log2(n + 1))
    for secret in range(1, n + 1):
        demo = ma.GuessNumberEnv(secret, n, max_turns=bound).demonstration()
        env = ma.GuessNumberEnv(secret, n, max_turns=bound)
        assert isinstance(env, MultiStepEnv)
        reward, metrics = replay(env, demo)
        assert metrics["solved"] == 1.0 and metrics["invalid_guesses"] == 0.0
        assert metrics["turns"] == len(demo) // 2 <= bound
        assert reward == ma.reward(True, int(metrics["turns"]), bound)
        assert int(demo[-1]["content"]) == secret


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


def test_transcript_datum_trains_only_the_sampled_tokens() -> None:
    datum = transcript_datum([1, 2, 3, 4, 5], [0, 0, -0.5, 0, -1.0],
                             [False, False, True, False, True], 0.5)
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert datum.loss_fn_inputs["logprobs"].tolist() == [0.0, -0.5, 0.0, -1.0]
    assert datum.loss_fn_inputs["advantages"].tolist() == [0.0, 0.5, 0.0, 0.5]


class Done:
    """A finished future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@pytest.mark.parametrize("model", [TINY, DEFAULT_MODEL])
def test_demonstrations_are_exactly_what_the_game_renders(model: str) -> None:
    """A policy that always replies as the script does, played by the real rollout
    (`run_episodes`) against the real rules, yields the warm start's training tokens, and
    its sampled tokens are exactly the trained ones: the warm start teaches the very
    sequences RL samples (up to the template's newline after the last turn)."""
    from transformers import AutoTokenizer

    from tinsmith.models.catalog import resolve_model_dir

    renderer = ma.get_renderer(AutoTokenizer.from_pretrained(resolve_model_dir(model)))
    cfg = ma.Config(max_number=16, max_turns=6, sft_examples=24)
    secrets = [ma.hidden_number(cfg, f"demo:{i}") for i in range(cfg.sft_examples)]
    demos = [ma.GuessNumberEnv(s, 16, 6).demonstration() for s in secrets]
    script = {}  # the prompt of each scripted turn -> the reply's tokens, as a sampler ends it
    for demo in demos:
        for k in range(1, len(demo), 2):
            reply = renderer.tokenizer.encode(demo[k]["content"], add_special_tokens=False)
            script[tuple(renderer.build_generation_prompt(demo[:k]))] = (
                reply + renderer.stop_sequences())

    events = []  # "sample" and "result" calls, in the order the rollout makes them

    class Future(Done):
        def result(self):
            events.append("result")
            return self.value

    class Scripted:
        def sample(self, prompt, num_samples, sampling_params):
            events.append("sample")
            tokens = script[tuple(prompt.to_ints())]
            return Future(SimpleNamespace(sequences=[SimpleNamespace(
                tokens=tokens, logprobs=[-0.5] * len(tokens))]))

    games = run_episodes(Scripted(), renderer, [ma.GuessNumberEnv(s, 16, 6) for s in secrets],
                         seed=0, max_tokens=8, temperature=1.0)
    # Each turn sends every unfinished game's request before awaiting any.
    runs = [(what, len(list(same))) for what, same in itertools.groupby(events)]
    assert runs[:2] == [("sample", len(secrets)), ("result", len(secrets))]
    assert all(runs[i] == ("sample", runs[i + 1][1]) for i in range(0, len(runs), 2))
    assert len(runs) == 2 * max(len(demo) // 2 for demo in demos)  # one pair per turn
    for demo, game in zip(demos, games):
        assert game.info["solved"] == 1.0 and game.reward >= 1.0
        assert game.messages + [demo[-1]] == demo
        tokens, weights = renderer.build_supervised_example(demo, TrainOn.ALL_ASSISTANT)
        n = len(game.tokens)
        assert tokens[:n] == game.tokens and not any(weights[n:])
        assert [w > 0 for w in weights[:n]] == game.sampled
        assert [lp for lp, s in zip(game.logprobs, game.sampled) if s] == [-0.5] * sum(game.sampled)


def test_model_responder_is_corrected_by_the_rules() -> None:
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


def args(log_path: Path, max_steps: int, sft_steps: int = 0) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=2", "group_size=4", "max_tokens=4", "lora_rank=4", "save_every=2",
            "max_number=3", "max_turns=2", "learning_rate=1e-3", f"sft_steps={sft_steps}",
            "sft_examples=8"]


@pytest.fixture
def length_guesses(monkeypatch) -> None:
    """The random tiny model writes no numbers: a stand-in parser turns its reply's length
    into a guess in [1, 3], so some games are won (on turn 1 or 2) and groups are mixed."""
    monkeypatch.setattr(ma, "parse_guess", lambda text: len(text) % 3 + 1)


def test_multi_agent_runs_saves_and_resumes(tmp_path: Path, length_guesses, monkeypatch,
                                           capsys) -> None:
    rollouts = []  # games per run_episodes call: one call per step, all groups' games

    def spy(sampler, renderer, envs, **kw):
        rollouts.append(len(envs))
        return run_episodes(sampler, renderer, envs, **kw)

    monkeypatch.setattr(ma, "run_episodes", spy)
    log = tmp_path / "ma"
    out = ma.main(args(log, 2))
    assert rollouts == [2 * 4, 2 * 4]
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


def test_warm_start_runs_first_and_is_not_run_again(tmp_path: Path, length_guesses, monkeypatch,
                                                   capsys) -> None:
    starts = []  # the init_state RL's training client is made from

    def spy(service, cfg, init_state=None):
        starts.append(init_state)
        return training_client(service, cfg, init_state=init_state)

    monkeypatch.setattr(ma, "training_client", spy)
    log = tmp_path / "warm"
    out = ma.main(args(log, 2, sft_steps=2))
    assert out["start_step"] == 0 and not out["resumed"]
    sft_rows = read_jsonl(log / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_rows] == [0, 1] and all(r["tokens"] > 0 for r in sft_rows)
    assert_finite(sft_rows)
    sft_ckpts = read_jsonl(log / "sft" / "checkpoints.jsonl")
    assert [c["step"] for c in sft_ckpts] == [2]
    assert starts == [sft_ckpts[-1]["state_path"]]  # RL starts from the warm start's weights
    assert [r["step"] for r in read_jsonl(log / "metrics.jsonl")] == [0, 1]
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    capsys.readouterr()

    # Resuming RL skips the finished warm start (its rows and checkpoints stay as they were).
    assert_resumes_at_step_2(ma.main, args(log, 3, sft_steps=2), log, capsys,
                             ckpts[-1]["state_path"])
    assert read_jsonl(log / "sft" / "metrics.jsonl") == sft_rows
    assert read_jsonl(log / "sft" / "checkpoints.jsonl") == sft_ckpts
