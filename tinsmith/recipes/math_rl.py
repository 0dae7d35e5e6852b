"""Math RL with a verifiable reward: GRPO-style groups on arithmetic word problems, with a
held-out evaluation set, a choice of policy-gradient loss and an optional KL penalty.

    python -m tinsmith.recipes.math_rl                          # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.math_rl difficulty=medium group_size=16 batch_size=16 max_steps=100
    python -m tinsmith.recipes.math_rl loss=ppo clip_low_threshold=0.8 clip_high_threshold=1.2
    python -m tinsmith.recipes.math_rl kl_coeff=0.05 base_url=http://127.0.0.1:8000

The full-featured sibling of `rl_loop` (read that one first: the core step is the same).
Each step:
1. Save the current weights for sampling (`save_weights_and_get_sampling_client`).
2. Make `batch_size` new problems (`tinsmith.cookbook.arithmetic`, seeded by (seed, step),
   so a resumed run sees the same ones), render them with the model's chat template
   (`tinsmith.cookbook.renderers`) and sample `group_size` answers each, stopping at the
   end-of-turn token. On an evaluation step the held-out problems are sampled at the same
   time, one greedy answer each (temperature 0).
3. Grade each answer (`arithmetic.grade`): 1 for the right number in `\\boxed{}`, plus 0.1
   for using `\\boxed{}` at all.
4. Advantages are centred in each group (reward - the group's mean); a group whose answers
   all scored the same carries no signal and is skipped.
5. With `kl_coeff` > 0: the base model's logprobs of every sampled token come from a
   `forward` on a fresh rank-1 LoRA client (a fresh adapter is exactly the base model), and
   each token's advantage becomes A - kl_coeff * (sampler logprob - reference logprob): a
   sample-based penalty on KL(policy || base). `kl_ref` logs the mean of that difference.
6. `forward_backward` with `loss` (`importance_sampling`, `ppo` or `cispo`; the clip
   thresholds go in `loss_fn_config` for the last two; the server computes all three), then
   one Adam step. The server's `ratio:mean`, `kl_sampler:mean` and (ppo, cispo)
   `clip_fraction:mean` are logged as `ratio`, `kl_sampler` and `clip_fraction`.
7. Every `eval_every` steps: `eval/accuracy` and `eval/format` on the held-out problems
   (scored with the policy the step sampled from, before its update), and an HTML page of
   a few sampled episodes at `<log_path>/transcripts/step_XXXXXX.html`.
8. Save every `save_every` steps and after the last; the same `log_path` resumes.

Learning rate: unless `learning_rate` is given, the LoRA rate that `cookbook.hyperparams`
recommends for the model (`get_lora_lr_for_model`) is taken as tuned for 32 problems a step
(`REFERENCE_BATCH`) and scaled to `batch_size` by the square-root rule
(`rl_lr_for_batch`): lr = lora_lr * sqrt(batch_size / 32). The group size does not enter:
more samples per problem sharpen each group's baseline rather than add independent prompts.

Held-out problems come from a fixed seed (`EVAL_SEED`) outside the range of training seeds
(seed * 1_000_003 + step), so every run and every step scores the same set. With `easy`
problems the space is small, so an evaluation question can still coincide in text with a
training one; the seeds, not the texts, are disjoint.

What it leaves out: dividing advantages by the group's standard deviation, length
normalisation, multi-turn environments, several optimizer steps per batch (the samples are
on-policy, so the ratio is 1 and ppo/cispo clipping only matters against a stale sampler),
and asynchronous (overlapped) sampling and training.

Naming: _P per problem, _G per sample in a group, _D per training datum, _E per eval problem.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.arithmetic import Problem, grade, make_problems, problem_messages
from tinsmith.cookbook.hyperparams import rl_lr_for_batch
from tinsmith.cookbook.recipe import (
    end_step,
    open_logger,
    recommended_lora_lr,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Renderer, get_renderer
from tinsmith.cookbook.rl import (
    TRAIN_SEED_STRIDE,
    GroupConfig,
    grpo_datums,
    policy_step,
    reference_client,
    sample_prompts,
    with_kl_penalty,
)
from tinsmith.cookbook.transcripts import Episode, write_html_transcripts

REFERENCE_BATCH = 32
"""Problems per step that the hyperparams LoRA learning rate is taken to be tuned for."""
EVAL_SEED = 987_654_321_987
"""Seed of the held-out problems: beyond seed * 1_000_003 + step for any seed < 987_000."""
@dataclass(frozen=True, kw_only=True)
class Config(GroupConfig):
    log_path: str = "runs/math_rl"
    difficulty: Literal["easy", "medium", "hard"] = "easy"
    """Problem difficulty (see tinsmith.cookbook.arithmetic)."""
    fewshot: bool = True
    """Show one worked example in every prompt, so a small model sees the \\boxed{} format."""
    loss: Literal["importance_sampling", "ppo", "cispo"] = "importance_sampling"
    """Policy-gradient loss, computed by the server."""
    clip_low_threshold: float = 0.8
    """Lower clip of the importance ratio (ppo, cispo)."""
    clip_high_threshold: float = 1.2
    """Upper clip of the importance ratio (ppo, cispo)."""
    kl_coeff: float = 0.0
    """Penalty on (sampler logprob - base-model logprob) per token; 0: no reference model."""
    eval_every: int = 5
    """Evaluate and write transcripts every this many steps (0: never)."""
    eval_size: int = 32
    """Held-out problems in the evaluation set."""
    num_transcripts: int = 4
    """Sampled episodes written to each transcripts page."""


def learning_rate(cfg: GroupConfig) -> float:
    """`cfg.learning_rate`, or the hyperparams LoRA rate scaled to the batch (module docstring)."""
    if cfg.learning_rate is not None:
        return cfg.learning_rate
    return rl_lr_for_batch(recommended_lora_lr(cfg.model_name), cfg.batch_size, REFERENCE_BATCH)


def eval_problems(cfg: Config) -> list[Problem]:
    """The held-out set: the same problems for every run and step (see EVAL_SEED)."""
    return make_problems(cfg.eval_size, seed=EVAL_SEED, difficulty=cfg.difficulty)


def loss_config(cfg: Config) -> dict[str, float] | None:
    if cfg.loss == "importance_sampling":
        return None
    return {"clip_low_threshold": cfg.clip_low_threshold,
            "clip_high_threshold": cfg.clip_high_threshold}


def score(renderer: Renderer, tokens: list[int], answer: int) -> tuple[str, float, dict[str, float]]:
    """(response text, reward, grade metrics) of one sampled answer."""
    text = renderer.parse_response(list(tokens))[0]["content"]
    reward, info = grade(text, answer)
    return text, reward, info


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)  # fresh, or resumed from log_path
    renderer = get_renderer(training.get_tokenizer())
    lr = learning_rate(cfg)
    adam = types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
    reference = reference_client(service, cfg.model_name) if cfg.kl_coeff > 0 else None
    problems_E = eval_problems(cfg) if cfg.eval_every > 0 else []
    prompts_E = [renderer.build_generation_prompt(problem_messages(p, cfg.fewshot))
                 for p in problems_E]
    logger = open_logger(cfg, start_step, "math_rl", lr=lr)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        evaluate = cfg.eval_every > 0 and step % cfg.eval_every == 0
        sampler = training.save_weights_and_get_sampling_client().result()

        # Training problems and samples; on an eval step, the greedy eval samples too.
        problems_P = make_problems(cfg.batch_size, seed=cfg.seed * TRAIN_SEED_STRIDE + step,
                                   difficulty=cfg.difficulty)
        messages_P = [problem_messages(p, cfg.fewshot) for p in problems_P]
        prompts_P = [renderer.build_generation_prompt(m) for m in messages_P]
        stop = renderer.stop_sequences()
        futures_P = sample_prompts(sampler, prompts_P, cfg.group_size, max_tokens=cfg.max_tokens,
                                   temperature=cfg.temperature, stop=stop,
                                   seed=cfg.seed * TRAIN_SEED_STRIDE + step * 1_000)
        futures_E = sample_prompts(sampler, prompts_E, 1, max_tokens=cfg.max_tokens,
                                   temperature=0.0, stop=stop, seed=0) if evaluate else []

        # Grade, centre the rewards in each group, one datum per answer of a mixed group.
        episodes: list[Episode] = []
        samples: list[tuple[list[int], Any]] = []  # (prompt, sequence), group after group
        rewards, correct, formatted, lengths = [], [], [], []
        for p, (problem, prompt, future) in enumerate(zip(problems_P, prompts_P, futures_P)):
            for g, seq in enumerate(future.result().sequences):
                text, reward, info = score(renderer, seq.tokens, problem.answer)
                samples.append((prompt, seq))
                rewards.append(reward)
                correct.append(info["correct"])
                formatted.append(info["format"])
                lengths.append(len(seq.tokens))
                if evaluate and len(episodes) < cfg.num_transcripts:
                    episodes.append(Episode(
                        messages=[*messages_P[p], {"role": "assistant", "content": text}],
                        reward=reward, title=f"step {step}, problem {p}, sample {g}",
                        metrics={**info, "answer": problem.answer}))
        data_D, n_sampled_D, mixed_groups = grpo_datums(samples, rewards, cfg.group_size)

        metrics = {"reward": float(np.mean(rewards)), "correct": float(np.mean(correct)),
                   "format": float(np.mean(formatted)),
                   "mixed_groups": mixed_groups / len(problems_P),
                   "response_len": float(np.mean(lengths)), "num_datums": len(data_D)}
        if evaluate:
            graded_E = [score(renderer, f.result().sequences[0].tokens, p.answer)[2]
                        for p, f in zip(problems_E, futures_E)]
            metrics["eval/accuracy"] = float(np.mean([i["correct"] for i in graded_E]))
            metrics["eval/format"] = float(np.mean([i["format"] for i in graded_E]))
            write_html_transcripts(Path(cfg.log_path) / "transcripts" / f"step_{step:06d}.html",
                                   episodes, title=f"math_rl step {step}")
        metrics["sample_s"] = time.perf_counter() - t0

        # The policy-gradient step (skipped when no group had a signal).
        if data_D:
            if reference is not None:
                data_D, metrics["kl_ref"] = with_kl_penalty(reference, data_D, n_sampled_D,
                                                                cfg.kl_coeff)
            metrics |= policy_step(training, data_D, adam, cfg.loss, loss_config(cfg))
        metrics["step_s"] = time.perf_counter() - t0

        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint, learning_rate=lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
