"""Reinforcement learning in one flat loop: GRPO-style policy gradient on arithmetic problems.

    python -m tinsmith.recipes.rl_loop                      # embedded Tinsmith, bundled model
                                                            # (~1 min a step on a 2-core CPU)
    python -m tinsmith.recipes.rl_loop max_steps=50 group_size=8 difficulty=medium
    python -m tinsmith.recipes.rl_loop base_url=http://127.0.0.1:8000   # a running server

Each step, all of it in `train` below:
1. Save the current weights for sampling (a fresh sampling client each step, so the samples
   come from the policy being trained).
2. Make `batch_size` new word problems (`tinsmith.cookbook.arithmetic`, seeded by the
   step) and sample `group_size` answers to each, all requests sent before waiting.
3. Grade every answer: 1 for the right number in `\\boxed{}`, plus 0.1 for using `\\boxed{}`.
4. Centre the rewards within each group: advantage = reward - the group's mean reward. A
   group whose answers all scored the same carries no signal and is skipped.
5. One datum per answer: targets are prompt[1:] + answer tokens; prompt positions get
   advantage 0 and logprob 0, answer positions the group advantage and the sampler's
   logprobs. `forward_backward` with the `importance_sampling` loss (-ratio * advantage,
   summed), then one Adam `optim_step`.
6. Log the mean reward, accuracy and format rate; save every `save_every` steps and after
   the last; run again with the same `log_path` to resume.

What it leaves out, on purpose: a KL penalty to the base model, PPO-style clipping (the
samples are exactly on-policy, so the ratio is 1), dividing advantages by the group's
standard deviation, normalising the loss by length, an evaluation set, multi-turn
environments, and overlapping sampling with training (asynchronous RL).

Naming: _P per problem, _G per sample in a group, _D per training datum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.arithmetic import grade, make_problems, problem_messages
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/rl_loop"
    learning_rate: float = 5e-4
    """Adam learning rate (constant; about what math_rl's rule gives SmolLM2 at 4 problems)."""
    batch_size: int = 4
    """Problems per step."""
    group_size: int = 4
    """Answers sampled per problem; advantages are centred within each group."""
    max_tokens: int = 96
    """Longest answer sampled, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (1.0: the policy's own distribution)."""
    difficulty: Literal["easy", "medium", "hard"] = "easy"
    """Problem difficulty (see tinsmith.cookbook.arithmetic)."""
    fewshot: bool = True
    """Show one worked example in every prompt, so a small model sees the \\boxed{} format."""


def prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation rendered by the chat template, ending where the assistant's turn starts."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def rl_datum(prompt: list[int], sampled: list[int], logprobs: list[float],
             advantage: float) -> types.Datum:
    """Targets are prompt[1:] + sampled. Prompt positions: logprob 0, advantage 0 (no loss).
    Sampled positions: the sampler's logprob, and the group advantage on every token."""
    tokens = prompt + sampled
    n_prompt = len(prompt) - 1  # position i predicts token i + 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:],
                        "logprobs": [0.0] * n_prompt + list(logprobs),
                        "advantages": [0.0] * n_prompt + [advantage] * len(sampled)})


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)  # fresh, or resumed from log_path
    tokenizer = training.get_tokenizer()
    adam = types.AdamParams(learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    logger = open_logger(cfg, start_step, "rl_loop")
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        # 1. The policy as it is now, for sampling.
        sampler = training.save_weights_and_get_sampling_client().result()

        # 2. New problems each step, a function of (seed, step): a resumed run sees the same.
        problems_P = make_problems(cfg.batch_size, seed=cfg.seed * 1_000_003 + step,
                                   difficulty=cfg.difficulty)
        prompts_P = [prompt_tokens(tokenizer, problem_messages(p, cfg.fewshot)) for p in problems_P]
        # stop omitted: sampling ends at the model's EOS ids, which for SmolLM2 is the chat
        # template's end-of-turn token <|im_end|> (returned as the last sampled token).
        futures_P = [
            sampler.sample(types.ModelInput.from_ints(prompt), num_samples=cfg.group_size,
                           sampling_params=types.SamplingParams(
                               max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                               seed=cfg.seed * 1_000_003 + step * 1_000 + p))
            for p, prompt in enumerate(prompts_P)
        ]

        # 3-5. Grade each group, centre its rewards, build one datum per sampled answer.
        data_D: list[types.Datum] = []
        rewards, correct, formatted, lengths, mixed_groups = [], [], [], [], 0
        for problem, prompt, future in zip(problems_P, prompts_P, futures_P):
            sequences_G = future.result().sequences
            rewards_G = []
            for seq in sequences_G:
                text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
                reward, info = grade(text, problem.answer)
                rewards_G.append(reward)
                correct.append(info["correct"])
                formatted.append(info["format"])
                lengths.append(len(seq.tokens))
            rewards += rewards_G
            if max(rewards_G) == min(rewards_G):
                continue  # every answer scored the same: no direction to push in
            mixed_groups += 1
            advantages_G = np.asarray(rewards_G) - np.mean(rewards_G)
            for seq, advantage in zip(sequences_G, advantages_G):
                data_D.append(rl_datum(prompt, list(seq.tokens), list(seq.logprobs),
                                       float(advantage)))
        t_sample = time.perf_counter() - t0

        metrics = {"reward": float(np.mean(rewards)), "correct": float(np.mean(correct)),
                   "format": float(np.mean(formatted)),
                   "mixed_groups": mixed_groups / len(problems_P),
                   "response_len": float(np.mean(lengths)), "num_datums": len(data_D)}
        # 5. The policy-gradient step (skipped when no group had a signal).
        if data_D:
            fwd_bwd_future = training.forward_backward(data_D, loss_fn="importance_sampling")
            optim_future = training.optim_step(adam)
            fwd_bwd = fwd_bwd_future.result()
            optim_future.result()
            # On-policy, the learner's and the sampler's logprobs agree: ratio ~1, KL ~0.
            metrics["ratio"] = fwd_bwd.metrics["ratio:mean"]
            metrics["kl_sampler"] = fwd_bwd.metrics["kl_sampler:mean"]
        metrics["sample_s"] = t_sample
        metrics["step_s"] = time.perf_counter() - t0

        # 6. Log, and save now and then.
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
