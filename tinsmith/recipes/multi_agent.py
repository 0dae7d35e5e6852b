"""Multi-agent RL: guess-the-number, a multi-turn game between two policies, trained with GRPO.

    python -m tinsmith.recipes.multi_agent                       # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.multi_agent max_number=100 max_turns=8 group_size=16
    python -m tinsmith.recipes.multi_agent responder=model       # the base model answers
    python -m tinsmith.recipes.multi_agent sft_steps=0           # RL alone, no warm start

The game: a hidden number in [1, `max_number`] (seeded by (seed, step, group)). Each turn the
guesser, the LoRA being trained, writes a reply; the first integer in it is its guess (no
integer: an invalid guess, which uses up the turn). The responder answers "higher", "lower"
or "correct", and that answer is the guesser's next observation (a new user turn). The
episode ends on a correct guess or after `max_turns` guesses.

The responder is a policy too:
- `responder=rules` (default): a deterministic, always-truthful rule-based player.
- `responder=model`: the base model (never trained) is sampled with a prompt that shows the
  hidden number and the guess. Its answer is checked against the rules and corrected when
  wrong or unreadable, so the game stays well defined; `responder_errors` logs the fraction
  of its answers that needed correcting.

Reward (only at the end of an episode, `reward()`): 1 + 0.1 * (max_turns - turns) / max_turns
if the number was guessed in `turns` turns, else 0. A first-turn hit gets the largest bonus,
a hit on the last allowed turn exactly 1. Invalid guesses are not penalised beyond the turn
they waste (they are logged as `invalid_guesses`, per episode).

GRPO, as in `math_rl` (read that one first): `group_size` games per hidden number,
`batch_size` hidden numbers per step, advantages centred in each group (groups that all
scored the same are skipped). All the step's games are played together, a turn at a time
(`tinsmith.cookbook.rl.run_episodes`, shared with `tool_use`): every unfinished game's
request for a turn is sent before any is awaited, so the server can run them side by side.
One datum per episode over the whole transcript: the sampling context of turn t+1 is turn
t's context, the exact sampled tokens, then the rendered observation turn; the sampler's
logprobs and the episode's advantage sit on the guesser's tokens, 0 on prompt and
observation tokens. Loss: `importance_sampling`. Logs reward, solved, turns,
invalid_guesses, mixed_groups; saves and resumes through `tinsmith.cookbook.recipe`. The
learning rate rule is `math_rl`'s.

Warm start (`sft_steps`, default 10; 0 turns it off), as in `tool_use`: a small model
rarely replies with a bare number, let alone a sensible one, so RL alone gets almost no
signal (see docs/recipes/multi_agent.md). Before RL the guesser is trained for `sft_steps`
supervised steps (batches of 8, `sft_learning_rate`) on `sft_examples` scripted games
(`GuessNumberEnv.demonstration`: binary search, each reply a bare number, each answer the
rule responder's own, rendered as the game renders them) in <log_path>/sft, through
chat_sl's loop; every guess is trained. RL then starts from those weights. The scripted
games' hidden numbers have draws of their own (keyed "demo:i", the RL ones "step:group").

What it leaves out: per-turn rewards (shaping), training the responder (it stays the base
model), other games (twenty questions, tic-tac-toe), a held-out evaluation, transcripts
pages, KL penalties and the ppo/cispo losses (see `math_rl`). The model responder answers
each game's guess one request at a time (only the guesser's turns are batched).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.datasets import Conversation, StepResult
from tinsmith.cookbook.recipe import (
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Renderer, get_renderer
from tinsmith.cookbook.rl import (
    TRAIN_SEED_STRIDE,
    MultiTurnConfig,
    episode_datums,
    policy_step,
    run_episodes,
)
from tinsmith.recipes import chat_sl
from tinsmith.recipes.math_rl import learning_rate

ANSWERS = ("higher", "lower", "correct")
Responder = Callable[[int, int], str]  # (hidden number, guess) -> one of ANSWERS


@dataclass(frozen=True, kw_only=True)
class Config(MultiTurnConfig):
    """A group is `group_size` games with one hidden number; a turn is one guess."""

    log_path: str = "runs/multi_agent"
    max_tokens: int = 16
    max_turns: int = 6
    sft_steps: int = 10
    max_number: int = 16
    """The hidden number is drawn from [1, max_number]."""
    responder: Literal["rules", "model"] = "rules"
    """Who answers higher/lower/correct: the rule-based player or the (corrected) base model."""


def parse_guess(text: str) -> int | None:
    """The first integer in the guesser's reply, or None."""
    match = re.search(r"-?\d+", text)
    return int(match.group()) if match else None


def truthful(secret: int, guess: int) -> str:
    """The rule-based responder."""
    return "correct" if guess == secret else "higher" if secret > guess else "lower"


def reward(solved: bool, turns: int, max_turns: int) -> float:
    return 1.0 + 0.1 * (max_turns - turns) / max_turns if solved else 0.0


def hidden_number(cfg: Config, key: str) -> int:
    """The hidden number of game `key` (RL: "step:group", warm start: "demo:i")."""
    return random.Random(f"{cfg.seed}:{key}").randint(1, cfg.max_number)


class GuessNumberEnv:
    """One game, seen from the guesser (a `MultiStepEnv`)."""

    def __init__(self, secret: int, max_number: int, max_turns: int,
                 responder: Responder = truthful) -> None:
        self.secret, self.max_number, self.max_turns = secret, max_number, max_turns
        self.responder = responder
        self.turns = self.invalid = 0

    def initial_observation(self) -> Conversation:
        return [{"role": "user", "content": (
            f"I am thinking of a whole number between 1 and {self.max_number}. Guess it: reply "
            f"with one number. After each guess I say higher, lower or correct. You have "
            f"{self.max_turns} guesses.")}]

    def step(self, action_text: str) -> StepResult:
        self.turns += 1
        guess = parse_guess(action_text)
        if guess is None:
            self.invalid += 1
            answer = f"invalid: reply with a number between 1 and {self.max_number}"
        else:
            answer = self.responder(self.secret, guess)
        solved = answer == "correct"
        done = solved or self.turns >= self.max_turns
        metrics = {"solved": float(solved), "turns": float(self.turns),
                   "invalid_guesses": float(self.invalid)}
        if done:
            return StepResult(None, reward(solved, self.turns, self.max_turns), True, metrics)
        return StepResult([{"role": "user", "content": answer}], 0.0, False, metrics)

    def demonstration(self) -> Conversation:
        """A scripted game: binary search over [1, max_number], each reply just the guess,
        each observation this env's own answer to it (so call it on an env not used for an
        episode). It is solved when max_turns >= ceil(log2(max_number + 1)). Supervised
        training on these before RL (the warm start) teaches the reply format and the
        search that RL then refines."""
        messages = self.initial_observation()
        lo, hi = 1, self.max_number
        while True:
            guess = (lo + hi) // 2
            reply = {"role": "assistant", "content": str(guess)}
            obs, _, done, _ = self.step(reply["content"])
            messages.append(reply)
            if done:
                return messages
            assert obs is not None and not isinstance(obs, str)
            messages += obs
            lo, hi = (guess + 1, hi) if obs[0]["content"] == "higher" else (lo, guess - 1)


class ModelResponder:
    """The base model as the responder; its answers are checked and corrected by the rules."""

    def __init__(self, sampler: tinker.SamplingClient, renderer: Renderer, seed: int) -> None:
        self.sampler, self.renderer, self.seed = sampler, renderer, seed
        self.calls = self.errors = 0

    def __call__(self, secret: int, guess: int) -> str:
        prompt = self.renderer.build_generation_prompt([{"role": "user", "content": (
            f"We play guess-the-number. The hidden number is {secret}. The guess is {guess}. "
            f"Answer with one word: higher (the number is bigger than the guess), lower, or "
            f"correct.")}])
        seq = self.sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1,
                                  sampling_params=types.SamplingParams(
                                      max_tokens=8, temperature=0.0, seed=self.seed,
                                      stop=self.renderer.stop_sequences())).result().sequences[0]
        said = self.renderer.parse_response(list(seq.tokens))[0]["content"].strip().lower()
        truth = truthful(secret, guess)
        self.calls += 1
        self.errors += not said.startswith(truth)
        return truth


def warm_start(cfg: Config, service: tinker.ServiceClient) -> str | None:
    """With `sft_steps`: supervised training on `sft_examples` scripted games
    (`GuessNumberEnv.demonstration`, every guess trained) in <log_path>/sft, as in
    `tool_use`; returns the training state RL starts from."""
    def demos() -> list[Conversation]:
        return [GuessNumberEnv(hidden_number(cfg, f"demo:{i}"), cfg.max_number,
                               cfg.max_turns).demonstration() for i in range(cfg.sft_examples)]

    return chat_sl.warm_start(cfg, service, demos)


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg, init_state=warm_start(cfg, service))
    renderer = get_renderer(training.get_tokenizer())
    lr = learning_rate(cfg)
    adam = types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
    responder = (ModelResponder(service.create_sampling_client(base_model=cfg.model_name).result(),
                                renderer, cfg.seed) if cfg.responder == "model" else None)
    logger = open_logger(cfg, start_step, "multi_agent", lr=lr)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        sampler = training.save_weights_and_get_sampling_client().result()
        errors0, calls0 = (responder.errors, responder.calls) if responder else (0, 0)
        envs = [GuessNumberEnv(hidden_number(cfg, f"{step}:{p}"), cfg.max_number,
                               cfg.max_turns, responder or truthful)
                for p in range(cfg.batch_size) for _ in range(cfg.group_size)]
        # Every game of the step at once, group after group: each turn's requests go together.
        games = run_episodes(sampler, renderer, envs,
                             seed=(cfg.seed * TRAIN_SEED_STRIDE + step) * 100_000,
                             max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        data_D, mixed_groups = episode_datums(games, cfg.group_size)
        metrics = {"reward": float(np.mean([game.reward for game in games])),
                   "mixed_groups": mixed_groups / cfg.batch_size,
                   **{k: float(np.mean([game.info[k] for game in games]))
                      for k in ("solved", "turns", "invalid_guesses")},
                   "transcript_len": float(np.mean([len(game.tokens) for game in games])),
                   "num_datums": len(data_D)}
        if responder and responder.calls > calls0:
            metrics["responder_errors"] = ((responder.errors - errors0)
                                           / (responder.calls - calls0))
        metrics["sample_s"] = time.perf_counter() - t0
        if data_D:
            metrics |= policy_step(training, data_D, adam)
        metrics["step_s"] = time.perf_counter() - t0
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint, learning_rate=lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
