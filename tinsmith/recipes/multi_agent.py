"""Multi-agent RL: guess-the-number, a multi-turn game between two policies, trained with GRPO.

    python -m tinsmith.recipes.multi_agent                       # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.multi_agent max_number=100 max_turns=8 group_size=16
    python -m tinsmith.recipes.multi_agent responder=model       # the base model answers

The game: a hidden number in [1, `max_number`] (seeded by (seed, step, game)). Each turn the
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
advantages centred in each group (groups that all scored the same are skipped), one datum
per episode over the whole transcript: the sampling context of turn t+1 is turn t's context,
the exact sampled tokens, then the rendered observation turn; the sampler's logprobs and the
episode's advantage sit on the guesser's tokens, 0 on prompt and observation tokens. Loss:
`importance_sampling`. Logs reward, solved, turns, invalid_guesses, mixed_groups; saves and
resumes through `tinsmith.cookbook.recipe`. The learning rate rule is `math_rl`'s.

What it leaves out: per-turn rewards (shaping), training the responder (it stays the base
model), other games (twenty questions, tic-tac-toe), a held-out evaluation, transcripts
pages, KL penalties and the ppo/cispo losses (see `math_rl`).
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
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Renderer, get_renderer
from tinsmith.cookbook.rl import (
    TRAIN_SEED_STRIDE,
    grouped_advantages,
    policy_step,
    transcript_datum,
)
from tinsmith.recipes.math_rl import learning_rate

ANSWERS = ("higher", "lower", "correct")
Responder = Callable[[int, int], str]  # (hidden number, guess) -> one of ANSWERS


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/multi_agent"
    learning_rate: float | None = None  # type: ignore[assignment]
    """Adam learning rate (constant). None: the hyperparams LoRA rate * sqrt(batch_size / 32)."""
    batch_size: int = 8
    """Hidden numbers (groups) per step."""
    group_size: int = 8
    """Games played per hidden number; advantages are centred within each group."""
    max_tokens: int = 16
    """Longest guesser reply per turn, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the guesser."""
    max_number: int = 16
    """The hidden number is drawn from [1, max_number]."""
    max_turns: int = 6
    """Guesses allowed per game."""
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


@dataclass
class Game:
    """One episode in progress: the guesser's transcript so far and, once done, its result."""

    env: GuessNumberEnv
    seed: int
    messages: Conversation
    tokens: list[int]
    logprobs: list[float]
    mask: list[bool]
    reward: float = 0.0
    metrics: dict[str, float] | None = None  # set when done


def play(envs: list[GuessNumberEnv], sampler: tinker.SamplingClient, renderer: Renderer,
         cfg: Config, seeds: list[int]) -> list[Game]:
    """Play the games in lockstep: each turn samples every unfinished game's reply at once."""
    games = []
    for env, seed in zip(envs, seeds):
        messages = env.initial_observation()
        tokens = renderer.build_generation_prompt(messages)
        games.append(Game(env, seed, messages, tokens, [0.0] * len(tokens), [False] * len(tokens)))
    while active := [g for g in games if g.metrics is None]:
        futures = [sampler.sample(types.ModelInput.from_ints(g.tokens), num_samples=1,
                                  sampling_params=types.SamplingParams(
                                      max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                      stop=renderer.stop_sequences(), seed=g.seed + g.env.turns))
                   for g in active]
        for g, future in zip(active, futures):
            seq = future.result().sequences[0]
            reply, ended = renderer.parse_response(list(seq.tokens))
            g.tokens, g.logprobs = g.tokens + list(seq.tokens), g.logprobs + list(seq.logprobs)
            g.mask = g.mask + [True] * len(seq.tokens)
            obs, g.reward, done, metrics = g.env.step(reply["content"])
            if done:
                g.metrics = metrics
                continue
            after = [*g.messages, reply, *obs]
            extra = renderer.observation_tokens(g.messages, after, ended)
            g.messages, g.tokens = after, g.tokens + extra
            g.logprobs, g.mask = g.logprobs + [0.0] * len(extra), g.mask + [False] * len(extra)
    return games


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)  # fresh, or resumed from log_path
    renderer = get_renderer(training.get_tokenizer())
    lr = learning_rate(cfg)
    adam = types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
    responder = (ModelResponder(service.create_sampling_client(base_model=cfg.model_name),
                                renderer, cfg.seed) if cfg.responder == "model" else None)
    logger = open_logger(cfg, start_step, "multi_agent", lr=lr)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        sampler = training.save_weights_and_get_sampling_client().result()
        games: list[Game] = []  # group after group
        errors0, calls0 = (responder.errors, responder.calls) if responder else (0, 0)
        for p in range(cfg.batch_size):
            secret = random.Random(f"{cfg.seed}:{step}:{p}").randint(1, cfg.max_number)
            games_G = play([GuessNumberEnv(secret, cfg.max_number, cfg.max_turns,
                                           responder or truthful)
                            for _ in range(cfg.group_size)], sampler, renderer, cfg,
                           [(cfg.seed * TRAIN_SEED_STRIDE + step) * 100_000 + p * 1_000 + g * 50
                            for g in range(cfg.group_size)])
            games += games_G
        rewards = [game.reward for game in games]
        info = [game.metrics for game in games]
        lengths = [len(game.tokens) for game in games]
        picked, mixed_groups = grouped_advantages(rewards, cfg.group_size)
        data_D = [transcript_datum(games[i].tokens, games[i].logprobs, games[i].mask, a)
                  for i, a in picked]
        metrics = {"reward": float(np.mean(rewards)), "mixed_groups": mixed_groups / cfg.batch_size,
                   **{k: float(np.mean([i[k] for i in info]))
                      for k in ("solved", "turns", "invalid_guesses")},
                   "transcript_len": float(np.mean(lengths)), "num_datums": len(data_D)}
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
