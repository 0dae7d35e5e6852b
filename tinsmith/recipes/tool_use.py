"""Tool use with RL: the model may call a calculator before answering a word problem, and is
rewarded for the right final answer; or (`tool=search`) it may search a small made-up
knowledge base before answering a question about it. GRPO groups of multi-turn episodes.

    python -m tinsmith.recipes.tool_use                       # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.tool_use group_size=8 batch_size=8 max_turns=4 max_steps=50
    python -m tinsmith.recipes.tool_use tool=search max_steps=20

The environments live in `tinsmith.cookbook.tools` (`tool=` picks one; the system prompt
explains its protocol). An assistant turn holding a call gets a `tool` message in reply and
the episode goes on; a turn with a `\\boxed{}` answer, or with no call, is the final answer;
so is the `max_turns`-th turn whatever it holds.

- `tool=calculator` (`CalculatorEnv`): arithmetic word problems of `difficulty`; a call is
  `<calc>EXPR</calc>` (numbers and + - * / ( ) only, evaluated with `ast`, never `eval`),
  the reply its value or `error: ...`.
- `tool=search` (`SearchEnv`): questions about a made-up world
  (`tinsmith.cookbook.search_index.knowledge_base`, a fresh one each step, so answers cannot
  be memorised, only looked up); a call is `<search>QUERY</search>`, the reply the
  `search_k` best documents by BM25 as `[id] text` lines (or `no results`, or `error: ...`).

Reward, all of it given at the final turn (earlier turns get 0):

    reward = 1.0 if the boxed answer is right      # calculator: arithmetic.grade;
             + 0.1 for a \\boxed{} at all          # search: search_index.grade_lookup
             + TOOL_BONUS (0.1) if the episode made at least one good call

(a good call is one whose expression evaluates, or whose search returned documents; the
bonus is paid once per episode. Search answers are single words, matched ignoring case and
spacing, or whole numbers, matched exactly.)

Each step (see `math_rl` for the single-turn version and its helpers): sample `group_size`
episodes per problem, all episodes advancing a turn at a time in parallel
(`tinsmith.cookbook.rl.run_episodes`); centre the returns within each group (skip groups
that all scored the same); one datum per episode over its whole token transcript: assistant tokens carry the sampler's logprobs and the episode's
advantage, prompt and tool-reply tokens 0 and 0. `importance_sampling` loss, one Adam step.
A turn's input is exactly the previous turn's input + its sampled tokens + the tool reply's
tokens, so the datum is the very sequence that was sampled from (no re-rendering).
Logged: reward, correct, format, tool_calls and turns per episode, mixed_groups, num_datums.

Warm start (`sft_steps` > 0): a small model rarely calls a tool it has only read about, so
RL gets little signal. Before RL the policy can be trained for `sft_steps` supervised steps
on `sft_examples` scripted correct episodes (`ToolEnv.demonstration`: the question, a good
call, the tool's real reply, the boxed answer) in <log_path>/sft, through chat_sl's loop;
RL then starts from those weights and learns when the calls pay off.
Save / resume through `tinsmith.cookbook.recipe` with the same `log_path`.

What it leaves out: several calls in one turn (the first counts), several tools in one
episode, an evaluation set, transcripts pages, a KL penalty and ppo/cispo (see `math_rl`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.arithmetic import make_problems
from tinsmith.cookbook.recipe import (
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import get_renderer
from tinsmith.cookbook.rl import (
    TRAIN_SEED_STRIDE,
    MultiTurnConfig,
    episode_datums,
    policy_step,
    run_episodes,
)
from tinsmith.cookbook.search_index import SearchIndex, knowledge_base, make_lookup_problems
from tinsmith.cookbook.tools import CalculatorEnv, SearchEnv, ToolEnv
from tinsmith.recipes import chat_sl
from tinsmith.recipes.math_rl import learning_rate


@dataclass(frozen=True, kw_only=True)
class Config(MultiTurnConfig):
    """A group is `group_size` episodes of one problem."""

    log_path: str = "runs/tool_use"
    max_tokens: int = 96
    tool: Literal["calculator", "search"] = "calculator"
    """The environment: word problems with a calculator, or questions with a search index."""
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    """Problem difficulty, tool=calculator (see tinsmith.cookbook.arithmetic)."""
    search_k: int = 3
    """Documents in a search reply, tool=search."""
    fewshot: bool = True
    """Show one worked episode (a call, its reply, a boxed answer) before each question."""


DEMO_SEED = 555_555_555_555
"""Seed of the warm start's problems: beyond seed * TRAIN_SEED_STRIDE + step of any run."""


def make_envs(cfg: Config, seed: int) -> list[ToolEnv]:
    """`batch_size` problems drawn from `seed`, each as `group_size` fresh environments."""
    if cfg.tool == "search":
        index = SearchIndex(knowledge_base(seed))
        return [SearchEnv(p, index, cfg.search_k, max_turns=cfg.max_turns, fewshot=cfg.fewshot)
                for p in make_lookup_problems(cfg.batch_size, seed)
                for _ in range(cfg.group_size)]
    return [CalculatorEnv(p, max_turns=cfg.max_turns, fewshot=cfg.fewshot)
            for p in make_problems(cfg.batch_size, seed=seed, difficulty=cfg.difficulty)
            for _ in range(cfg.group_size)]


def warm_start(cfg: Config, service: tinker.ServiceClient) -> str | None:
    """With `sft_steps`: supervised training on `sft_examples` scripted correct episodes
    (`ToolEnv.demonstration`, every assistant turn trained) in <log_path>/sft; returns the
    training state RL starts from."""
    demo_cfg = dataclasses.replace(cfg, batch_size=cfg.sft_examples, group_size=1)

    def demos() -> list[list[dict[str, str]]]:
        return [env.demonstration() for env in make_envs(demo_cfg, DEMO_SEED + cfg.seed)]

    return chat_sl.warm_start(cfg, service, demos)


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg, init_state=warm_start(cfg, service))
    renderer = get_renderer(training.get_tokenizer())
    lr = learning_rate(cfg)
    adam = types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
    logger = open_logger(cfg, start_step, "tool_use", lr=lr)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        sampler = training.save_weights_and_get_sampling_client().result()
        seed = cfg.seed * TRAIN_SEED_STRIDE + step
        episodes = run_episodes(sampler, renderer, make_envs(cfg, seed), seed=seed * 100_000,
                                max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        data_D, mixed = episode_datums(episodes, cfg.group_size)
        metrics = {"reward": float(np.mean([e.reward for e in episodes])),
                   **{k: float(np.mean([e.info[k] for e in episodes]))
                      for k in ("correct", "format", "tool_calls", "turns")},
                   "mixed_groups": mixed / cfg.batch_size, "num_datums": len(data_D),
                   "sample_s": time.perf_counter() - t0}
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
