"""Pieces the RL-style recipes share: their sampling config fields, group advantages and
GRPO datums, the policy-gradient step, reference logprobs, a KL penalty to a reference
model, and the multi-turn rollout.

`policy_step` sends forward_backward and optim_step before waiting for either (the server
runs them in order, with no round trip between) and returns the server's policy metrics
under short names. `forward_logprobs` reads the logprobs a client gives each datum's
targets, for reference-model terms (DPO's reference, a KL penalty to the base model). `run_episodes`
plays `MultiStepEnv`s turn by turn into `Episode`s, one token transcript each, which
`transcript_datum` turns into a datum. `grpo_datums` (single-turn samples) and
`episode_datums` (episodes) centre a step's rewards in each group and make its datums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.datasets import Conversation, MultiStepEnv
from tinsmith.cookbook.recipe import RecipeConfig
from tinsmith.cookbook.renderers import Renderer

TRAIN_SEED_STRIDE = 1_000_003
"""Recipes seed step `step` of a run with seed `seed` from seed * TRAIN_SEED_STRIDE + step
(times a recipe-specific factor), so runs with different seeds never share a step's draws."""

# Server metrics (docs/losses.md) logged by the recipes, under these names.
SERVER_METRICS = {"ratio:mean": "ratio", "kl_sampler:mean": "kl_sampler",
                  "clip_fraction:mean": "clip_fraction"}


@dataclass(frozen=True, kw_only=True)
class GroupConfig(RecipeConfig):
    """The fields of a GRPO-style recipe: groups of samples per prompt, and how to sample."""

    learning_rate: float | None = None  # type: ignore[assignment]
    """Adam learning rate (constant). None: the hyperparams LoRA rate * sqrt(batch_size / 32)."""
    batch_size: int = 8
    """Problems (groups) per step."""
    group_size: int = 8
    """Samples (answers, episodes) per problem; advantages are centred within each group."""
    max_tokens: int = 128
    """Longest reply sampled (in a multi-turn episode: per turn), in tokens."""
    temperature: float = 1.0
    """Sampling temperature of training samples."""


@dataclass(frozen=True, kw_only=True)
class MultiTurnConfig(GroupConfig):
    """A multi-turn GRPO recipe's fields: a turn limit, and a warm start on scripted episodes
    (`tinsmith.recipes.chat_sl.warm_start`)."""

    max_turns: int = 3
    """Policy turns per episode at most."""
    sft_steps: int = 0
    """Warm start: supervised steps on scripted episodes before RL (0: none)."""
    sft_examples: int = 64
    """Scripted episodes for the warm start (drawn apart from the RL ones)."""
    sft_learning_rate: float | None = None
    """Warm-start peak learning rate (None: the recommended LoRA rate, as in chat_sl)."""


def policy_step(client: tinker.TrainingClient, data: list[types.Datum], adam: types.AdamParams,
                loss_fn: str = "importance_sampling",
                loss_fn_config: Mapping[str, float] | None = None) -> dict[str, float]:
    """One forward_backward + optim_step; the finite SERVER_METRICS it reported."""
    fwd_bwd = client.forward_backward(data, loss_fn=loss_fn, loss_fn_config=loss_fn_config)
    optim = client.optim_step(adam)
    metrics = fwd_bwd.result().metrics
    optim.result()
    return {name: metrics[key] for key, name in SERVER_METRICS.items()
            if key in metrics and math.isfinite(metrics[key])}


def centred_advantages(rewards: Sequence[float]) -> np.ndarray | None:
    """GRPO advantages of one group: reward - the group's mean, or None when every member
    scored the same (no direction to push in, so the group is skipped)."""
    r = np.asarray(rewards, dtype=np.float64)
    return None if r.max() == r.min() else r - r.mean()


def grouped_advantages(rewards: Sequence[float],
                       group_size: int) -> tuple[list[tuple[int, float]], int]:
    """For rewards laid out group after group (`group_size` each): (index, centred advantage)
    of every member of a group with a spread, in order, and how many groups had one (groups
    that all scored the same carry no signal and are left out; see `centred_advantages`)."""
    picked: list[tuple[int, float]] = []
    mixed = 0
    for start in range(0, len(rewards), group_size):
        advantages = centred_advantages(rewards[start:start + group_size])
        if advantages is not None:
            mixed += 1
            picked += [(start + g, float(a)) for g, a in enumerate(advantages)]
    return picked, mixed


def transcript_datum(tokens: Sequence[int], logprobs: Sequence[float], sampled: Sequence[bool],
                     advantage: float) -> types.Datum:
    """An episode's whole transcript as one datum: position i predicts tokens[i + 1], and
    carries the sampler's logprob and the advantage only where that token was sampled
    (the policy's turns); prompt and observation tokens carry 0 and 0."""
    mask = np.asarray(sampled[1:], dtype=bool)
    return types.Datum(model_input=types.ModelInput.from_ints(list(tokens[:-1])), loss_fn_inputs={
        "target_tokens": list(tokens[1:]),
        "logprobs": np.where(mask, np.asarray(logprobs[1:], np.float32), 0.0).astype(np.float32),
        "advantages": np.where(mask, advantage, 0.0).astype(np.float32)})


def grpo_datums(samples: Sequence[tuple[Sequence[int], Any]], rewards: Sequence[float],
                group_size: int) -> tuple[list[types.Datum], list[int], int]:
    """A step's single-turn samples as datums. `samples` are (prompt, sampled sequence with
    tokens and logprobs) pairs with their `rewards`, laid out group after group. One datum
    per sample of each group with a spread of rewards (`grouped_advantages`), its prompt and
    tokens in one transcript (`transcript_datum`). Returns the datums, how many sampled
    tokens end each (for `with_kl_penalty`) and how many groups had a spread."""
    picked, mixed = grouped_advantages(rewards, group_size)
    data_D: list[types.Datum] = []
    n_sampled_D: list[int] = []
    for i, advantage in picked:
        prompt, seq = samples[i]
        tokens, n = [*prompt, *seq.tokens], len(seq.tokens)
        data_D.append(transcript_datum(tokens, [0.0] * len(prompt) + list(seq.logprobs),
                                       [False] * len(prompt) + [True] * n, advantage))
        n_sampled_D.append(n)
    return data_D, n_sampled_D, mixed


def reference_client(service: tinker.ServiceClient, model_name: str) -> tinker.TrainingClient:
    """A client that scores with the base model: a fresh LoRA adapter is exactly zero."""
    return service.create_lora_training_client(base_model=model_name, rank=1).result()


def forward_logprobs(client: tinker.TrainingClient, data: Sequence[types.Datum]) -> list[np.ndarray]:
    """float32 log p(target) per datum under `client`'s weights (a forward pass; only the
    targets are sent, so the datums may carry inputs of any loss)."""
    scored = [types.Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "weights": np.zeros(len(d.loss_fn_inputs["target_tokens"].to_numpy()), np.float32)})
        for d in data]
    outs = client.forward(scored, "cross_entropy").result().loss_fn_outputs
    return [o["logprobs"].to_numpy().astype(np.float32) for o in outs]


def with_kl_penalty(reference: tinker.TrainingClient, data_D: list[types.Datum],
                    n_sampled_D: list[int], kl_coeff: float) -> tuple[list[types.Datum], float]:
    """Advantages minus kl_coeff * (sampler logprob - reference logprob) on each datum's last
    `n_sampled` positions, the sampled tokens (prompt positions stay 0). Returns the new
    datums and the mean logprob difference over sampled tokens."""
    penalised, diffs = [], []
    for d, n_sampled, lref in zip(data_D, n_sampled_D, forward_logprobs(reference, data_D)):
        lq = d.loss_fn_inputs["logprobs"].to_numpy().astype(np.float32)
        sampled = np.arange(len(lq)) >= len(lq) - n_sampled
        diff = np.where(sampled, lq - lref, 0.0).astype(np.float32)
        diffs.append(diff[sampled])
        advantages = d.loss_fn_inputs["advantages"].to_numpy().astype(np.float32)
        penalised.append(types.Datum(model_input=d.model_input, loss_fn_inputs={
            **d.loss_fn_inputs, "advantages": advantages - kl_coeff * diff}))
    all_diffs = np.concatenate(diffs) if diffs else np.zeros(0)
    return penalised, float(all_diffs.mean()) if all_diffs.size else 0.0


def sample_prompts(sampler: tinker.SamplingClient, prompts: Sequence[Sequence[int]],
                   num_samples: int, *, max_tokens: int, temperature: float,
                   stop: list[int] | list[str] | None = None,
                   seed: int | None = None) -> list[Any]:
    """One `sample` request per prompt, all sent before any is awaited (so the server sees
    them together); returns the futures. With `seed`, prompt i is seeded `seed + i`."""
    return [sampler.sample(types.ModelInput.from_ints(list(prompt)), num_samples=num_samples,
                           sampling_params=types.SamplingParams(
                               max_tokens=max_tokens, temperature=temperature, stop=stop,
                               seed=None if seed is None else seed + i))
            for i, prompt in enumerate(prompts)]


@dataclass
class Episode:
    """One multi-turn episode as a single token transcript (see `run_episodes`)."""

    env: MultiStepEnv
    messages: Conversation  # the conversation the next turn is sampled for
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)  # one per token; 0 where not sampled
    sampled: list[bool] = field(default_factory=list)  # True on the policy's own tokens
    reward: float = 0.0  # the episode's return: the sum of its steps' rewards
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)  # the last step's metrics

    def __post_init__(self) -> None:
        self.logprobs, self.sampled = [0.0] * len(self.tokens), [False] * len(self.tokens)

    def extend(self, tokens: list[int], logprobs: list[float] | None = None) -> None:
        """Append sampled tokens (with their logprobs) or, without logprobs, context tokens."""
        self.tokens += tokens
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)
        self.sampled += [logprobs is not None] * len(tokens)


def episode_datums(episodes: Sequence[Episode], group_size: int) -> tuple[list[types.Datum], int]:
    """A step's episodes, laid out group after group, as datums: one per episode of each
    group with a spread of returns, its whole transcript (`transcript_datum`); and how many
    groups had a spread."""
    picked, mixed = grouped_advantages([e.reward for e in episodes], group_size)
    return [transcript_datum(episodes[i].tokens, episodes[i].logprobs, episodes[i].sampled, a)
            for i, a in picked], mixed


def run_episodes(sampler: tinker.SamplingClient, renderer: Renderer, envs: Sequence[MultiStepEnv],
                 *, seed: int, max_tokens: int, temperature: float) -> list[Episode]:
    """Play every env to its end (its observations are messages), all advancing one turn at
    a time: a turn's requests, one per unfinished episode, are all sent before any is awaited
    (`sample_prompts`), so the server can run them together. At turn t the i-th unfinished
    episode is sampled with seed `seed + 1_000 * t + i` (distinct for up to 1,000 episodes).
    A turn's input is exactly the previous turn's input + its sampled tokens + the
    observation's tokens (`Renderer.observation_tokens`), so an episode's `tokens` are the
    very sequence that was sampled from: the sampled tokens are never decoded and encoded
    again (they need not survive that), and earlier turns are never re-rendered."""
    episodes = []
    for env in envs:
        messages = env.initial_observation()
        assert not isinstance(messages, str), "run_episodes needs observations as messages"
        episodes.append(Episode(env, messages, renderer.build_generation_prompt(messages)))
    turn = 0
    while active := [e for e in episodes if not e.done]:
        futures = sample_prompts(sampler, [e.tokens for e in active], 1, max_tokens=max_tokens,
                                 temperature=temperature, stop=renderer.stop_sequences(),
                                 seed=seed + 1_000 * turn)
        for e, future in zip(active, futures):
            seq = future.result().sequences[0]
            message, ended = renderer.parse_response(list(seq.tokens))
            e.extend(list(seq.tokens), list(seq.logprobs))
            obs, reward, e.done, info = e.env.step(message["content"])
            e.reward += reward
            if e.done:
                e.info = info
            else:
                assert not isinstance(obs, str) and obs is not None
                e.extend(renderer.observation_tokens(e.messages, obs, ended))
                e.messages = [*e.messages, message, *obs]
        turn += 1
    return episodes
