"""Tool use with RL: the model may call a calculator before answering a word problem, and is
rewarded for the right final answer. GRPO groups of multi-turn episodes.

    python -m tinsmith.recipes.tool_use                       # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.tool_use group_size=8 batch_size=8 max_turns=4 max_steps=50

The environment (`CalculatorEnv`, a `tinsmith.cookbook.datasets.MultiStepEnv`): the system
prompt explains the protocol. An assistant turn containing `<calc>EXPR</calc>` (numbers and
+ - * / ( ) only, evaluated by `calculate` with Python's `ast`, never `eval`) gets a `tool`
message with the result (or `error: ...`) and the episode goes on. A turn with a `\\boxed{}`
answer, or with no call, is the final answer; so is the `max_turns`-th turn whatever it holds.

Reward, all of it given at the final turn (earlier turns get 0):

    reward = arithmetic.grade(final text)          # 1.0 correct + 0.1 for a \\boxed{}
             + TOOL_BONUS (0.1) if the episode made at least one well-formed call

(a well-formed call is one whose expression evaluates; the bonus is paid once per episode.)

Each step (see `math_rl` for the single-turn version and its helpers): sample `group_size`
episodes per problem, all episodes advancing a turn at a time in parallel; centre the
returns within each group (skip groups that all scored the same); one datum per episode over
its whole token transcript: assistant tokens carry the sampler's logprobs and the episode's
advantage, prompt and tool-reply tokens 0 and 0. `importance_sampling` loss, one Adam step.
A turn's input is exactly the previous turn's input + its sampled tokens + the tool reply's
tokens, so the datum is the very sequence that was sampled from (no re-rendering).
Logged: reward, correct, format, tool_calls and turns per episode, mixed_groups, num_datums.
Save / resume through `tinsmith.cookbook.recipe` with the same `log_path`.

What it leaves out: other tools (a search index), several calls in one turn (the first
counts), an evaluation set, transcripts pages, a KL penalty and ppo/cispo (see `math_rl`).
"""

from __future__ import annotations

import ast
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.arithmetic import Problem, extract_boxed, grade, make_problems
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Renderer, get_renderer
from tinsmith.cookbook.rl import centred_advantages, policy_step, transcript_datum
from tinsmith.recipes.math_rl import TRAIN_SEED_STRIDE, learning_rate

TOOL_BONUS = 0.1
SYSTEM_PROMPT = (
    "Solve the math word problem. You may use a calculator: write <calc>EXPRESSION</calc> "
    "(numbers and + - * / ( ) only) and stop; the result comes back in a tool message. "
    "When you know the answer, give it as a single whole number inside \\boxed{}, "
    "for example \\boxed{42}.")
MAX_EXPR_CHARS = 200
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}
_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)


def calculate(expr: str) -> float:
    """The value of an arithmetic expression: numbers, + - * / and parentheses only.
    Anything else (names, calls, attributes, **, ...) raises ValueError."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"syntax error: {e.msg}") from None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not allowed: {type(node).__name__}")

    value = ev(tree.body)
    if not abs(value) < 1e18:
        raise ValueError("result too large")
    return value


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def find_call(text: str) -> str | None:
    """The expression of the first `<calc>...</calc>` in `text`, or None."""
    m = _CALL.search(text)
    return m.group(1) if m else None


@dataclass
class CalculatorEnv:
    """One problem as a multi-turn episode with a calculator tool (module docstring)."""

    problem: Problem
    max_turns: int = 3
    turns: int = 0
    tool_calls: int = 0

    def initial_observation(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.problem.question}]

    def step(self, action_text: str) -> tuple[list[dict[str, str]] | None, float, bool,
                                              dict[str, float]]:
        self.turns += 1
        expr = find_call(action_text) if extract_boxed(action_text) is None else None
        reply = None
        if expr is not None:
            try:
                reply = format_number(calculate(expr))
                self.tool_calls += 1
            except ValueError as e:
                reply = f"error: {e}"
        if reply is not None and self.turns < self.max_turns:
            return [{"role": "tool", "content": reply}], 0.0, False, {}
        reward, info = grade(action_text, self.problem.answer)
        reward += TOOL_BONUS * (self.tool_calls > 0)
        return None, reward, True, {**info, "tool_calls": float(self.tool_calls),
                                    "turns": float(self.turns)}


@dataclass
class Episode:
    env: CalculatorEnv
    messages: list[dict[str, Any]]
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)  # one per token; 0 where not sampled
    sampled: list[bool] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.logprobs, self.sampled = [0.0] * len(self.tokens), [False] * len(self.tokens)

    def extend(self, tokens: list[int], logprobs: list[float] | None = None) -> None:
        self.tokens += tokens
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)
        self.sampled += [logprobs is not None] * len(tokens)


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/tool_use"
    learning_rate: float | None = None  # type: ignore[assignment]
    """Adam learning rate. None: the hyperparams LoRA rate * sqrt(batch_size / 32)."""
    batch_size: int = 8
    """Problems per step."""
    group_size: int = 8
    """Episodes per problem; advantages are centred within each group."""
    max_turns: int = 3
    """Assistant turns per episode at most."""
    max_tokens: int = 96
    """Longest assistant turn sampled, in tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    """Problem difficulty (see tinsmith.cookbook.arithmetic)."""


def run_episodes(cfg: Config, sampler: tinker.SamplingClient, renderer: Renderer,
                 envs: list[CalculatorEnv], seed: int) -> list[Episode]:
    """Play every env to its end, all advancing one turn at a time (requests sent together)."""
    episodes = []
    for env in envs:
        messages = env.initial_observation()
        episodes.append(Episode(env, messages, renderer.build_generation_prompt(messages)))
    stop = renderer.stop_sequences()
    for turn in range(cfg.max_turns):
        active = [e for e in episodes if not e.done]
        futures = [sampler.sample(types.ModelInput.from_ints(e.tokens), num_samples=1,
                                  sampling_params=types.SamplingParams(
                                      max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                      stop=stop, seed=seed + 1_000 * turn + i))
                   for i, e in enumerate(active)]
        for e, future in zip(active, futures):
            seq = future.result().sequences[0]
            message, ended = renderer.parse_response(list(seq.tokens))
            e.extend(list(seq.tokens), list(seq.logprobs))
            obs, reward, e.done, info = e.env.step(message["content"])
            e.reward += reward
            if e.done:
                e.info = info
            else:
                after = [*e.messages, message, *obs]
                e.extend(renderer.observation_tokens(e.messages, after, ended))
                e.messages = after
    return episodes


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)
    renderer = get_renderer(training.get_tokenizer())
    lr = learning_rate(cfg)  # type: ignore[arg-type]
    adam = types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
    logger = open_logger(cfg, start_step, "tool_use", lr=lr)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        sampler = training.save_weights_and_get_sampling_client().result()
        seed = cfg.seed * TRAIN_SEED_STRIDE + step
        problems_P = make_problems(cfg.batch_size, seed=seed, difficulty=cfg.difficulty)
        envs = [CalculatorEnv(p, cfg.max_turns) for p in problems_P for _ in range(cfg.group_size)]
        episodes = run_episodes(cfg, sampler, renderer, envs, seed * 100_000)
        data_D, mixed = [], 0
        for p in range(len(problems_P)):
            group = episodes[p * cfg.group_size:(p + 1) * cfg.group_size]
            advantages_G = centred_advantages([e.reward for e in group])
            if advantages_G is None:
                continue  # no signal
            mixed += 1
            data_D += [transcript_datum(e.tokens, e.logprobs, e.sampled, float(a))
                       for e, a in zip(group, advantages_G)]
        metrics = {"reward": float(np.mean([e.reward for e in episodes])),
                   **{k: float(np.mean([e.info[k] for e in episodes]))
                      for k in ("correct", "format", "tool_calls", "turns")},
                   "mixed_groups": mixed / len(problems_P), "num_datums": len(data_D),
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
