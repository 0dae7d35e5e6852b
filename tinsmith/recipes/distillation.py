"""Distillation: a LoRA student learns to behave like a teacher, off-policy (the teacher's own
answers, with its top-K distribution at every token as soft targets) or on-policy (the
student's answers, graded token by token by the teacher's logprobs).

    python -m tinsmith.recipes.distillation                         # off_policy, built-in prompts
    python -m tinsmith.recipes.distillation mode=on_policy group_size=4 max_steps=50
    python -m tinsmith.recipes.distillation prompts_path=questions.jsonl topk=20
    python -m tinsmith.recipes.distillation teacher_path=tinker://<run>/sampler_weights/000100

The teacher is a sampling client of `teacher_model` (default: the student's own base model)
that sees `teacher_system`, a long system prompt the student never gets; or, with
`teacher_path`, a `tinker://` sampler checkpoint (the system prompt still applies unless it
is set empty). Distilling the base model prompted with an instruction into the unprompted
student is *context distillation*: the student learns to act on an instruction it is no
longer shown. The student is a LoRA training client (fresh, or resumed from `log_path`).
Prompts: the built-in questions (`QUESTIONS`), or a JSONL of {"prompt": "..."} or
{"messages": [...]} lines; each step takes `batch_size` of them, a function of (seed, step),
so a resumed run sees the same ones.

mode=off_policy (supervised on the teacher's samples), each step:
1. The teacher answers each prompt (its system prompt + the question), `max_tokens` at most.
2. The teacher scores its own full conversation (one sampling call, max_tokens=1, with
   `topk_prompt_logprobs=topk`): at each answer position its top-K token ids and logprobs.
3. One student datum per answer, *without* the teacher's system prompt: answer positions
   get `target_tokens` [N, K] = the teacher's top-K ids and `weights` [N, K] = the teacher's
   probabilities renormalised over its top K (a softmax of the K logprobs), divided by the
   answer length, so each datum's weights sum to 1; prompt positions get weight 0 (their
   targets repeat the real next token, any valid id would do). See `topk_datum`.
4. `forward_backward(data, "cross_entropy")`: the server computes -sum w * logp over the
   [N, K] cells, i.e. per datum the mean cross-entropy from the teacher's top-K distribution
   to the student's. `loss` logs it per token (averaged over datums); `teacher_entropy` is
   the entropy of the renormalised targets, the floor of `loss`, and `kl` = loss - entropy.

mode=on_policy (reverse KL on the student's samples), each step:
1. Save the student's weights for sampling and sample `group_size` answers per prompt.
2. The teacher scores every sampled token with `compute_logprobs` on its own prompt (with
   its system prompt, so the answer starts at a different offset than in the student's
   prompt) followed by the student's answer tokens.
3. Per-token advantage = kl_coeff * (teacher logprob - student sampler logprob): a token
   the teacher finds likelier than the student did is pushed up, one it finds less likely
   pushed down. This is a sample-based descent on KL(student || teacher).
4. `rl_datum` layout (prompt positions carry no loss) with these per-token advantages and
   the `importance_sampling` loss, then one Adam step. `reverse_kl` logs the mean of
   (student logprob - teacher logprob) per sampled token, which should fall.

Every step logs to <log_path>/metrics.jsonl; save every `save_every` steps and after the
last; the same `log_path` resumes (optimizer state included).

What it leaves out: a teacher served by a different base model than the embedded server's
(give `base_url` of a server that serves both, or `teacher_path` of the same base), mixing
the two modes, discounting future tokens' KL in on-policy advantages, top-K targets for the
student's own samples (on-policy uses only the sampled token), tokenizers that differ
between teacher and student (positions are aligned by token, not by text), held-out
evaluation, and overlapping sampling with training.

Naming: _P per prompt, _G per sample of a prompt, _D per training datum.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Message, get_renderer
from tinsmith.cookbook.rl import TRAIN_SEED_STRIDE, policy_step, sample_prompts
from tinsmith.recipes.rl_loop import rl_datum

TEACHER_SYSTEM = (
    "You are a patient teacher for curious ten-year-olds. Answer every question in at most "
    "two short sentences of plain words, with no lists, headings or jargon. Begin each answer "
    "with the word 'Imagine' and give one everyday comparison (a kitchen, a playground, a "
    "bicycle) that makes the idea concrete. Never mention that you were given these "
    "instructions, and never ask a question back."
)
QUESTIONS = [
    "Why is the sky blue?", "How do magnets work?", "What is electricity?",
    "Why do we have seasons?", "How does a plane stay in the air?", "What is a black hole?",
    "Why does ice float on water?", "How do plants make food?", "What causes thunder?",
    "How does the heart pump blood?", "Why is the sea salty?", "What is gravity?",
    "How do vaccines work?", "Why do cats purr?", "What makes a rainbow?",
    "How does a computer remember things?",
]
@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/distillation"
    learning_rate: float = 1e-3
    """Adam learning rate (constant); 1e-4 moved neither mode visibly in 10 steps."""
    mode: Literal["off_policy", "on_policy"] = "off_policy"
    """off_policy: top-K cross-entropy on teacher samples; on_policy: reverse KL on student samples."""
    teacher_model: str | None = None
    """Base model of the teacher (None: the student's model_name)."""
    teacher_path: str | None = None
    """A tinker:// sampler checkpoint to use as the teacher instead of a base model."""
    teacher_system: str = TEACHER_SYSTEM
    """System prompt the teacher sees and the student does not ('' for none)."""
    prompts_path: str | None = None
    """JSONL of {"prompt": ...} or {"messages": [...]} lines (None: the built-in questions)."""
    batch_size: int = 8
    """Prompts per step."""
    group_size: int = 4
    """on_policy: student answers sampled per prompt (off_policy: one teacher answer)."""
    topk: int = 20
    """off_policy: teacher tokens per position kept as soft targets (K)."""
    max_tokens: int = 128
    """Longest answer sampled, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the answers (teacher's in off_policy, student's in on_policy)."""
    kl_coeff: float = 1.0
    """on_policy: advantage = kl_coeff * (teacher logprob - student logprob)."""


def load_prompts(cfg: Config, questions: Sequence[str] = QUESTIONS) -> list[list[Message]]:
    """The student's conversations to answer (no teacher system prompt): `prompts_path`, or
    else the built-in `questions`."""
    if not cfg.prompts_path:
        return [[{"role": "user", "content": q}] for q in questions]
    out: list[list[Message]] = []
    for n, line in enumerate(Path(cfg.prompts_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if isinstance(row.get("messages"), list):
            out.append([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
        elif isinstance(row.get("prompt"), str):
            out.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise SystemExit(f"error: {cfg.prompts_path}:{n}: expected 'prompt' or 'messages'")
    if not out:
        raise SystemExit(f"error: no prompts in {cfg.prompts_path}")
    return out


def step_prompts(prompts: list[list[Message]], cfg: Config, step: int) -> list[list[Message]]:
    """`batch_size` prompts for this step: a function of (seed, step) only."""
    rng = random.Random(cfg.seed * TRAIN_SEED_STRIDE + step)
    return [prompts[rng.randrange(len(prompts))] for _ in range(cfg.batch_size)] \
        if cfg.batch_size > len(prompts) else rng.sample(prompts, cfg.batch_size)


def teacher_messages(cfg: Config, messages: list[Message]) -> list[Message]:
    if not cfg.teacher_system:
        return messages
    return [{"role": "system", "content": cfg.teacher_system}, *messages]


def teacher_client(cfg: Config, service: tinker.ServiceClient) -> tinker.SamplingClient:
    if cfg.teacher_path:
        return service.create_sampling_client(model_path=cfg.teacher_path).result()
    return service.create_sampling_client(base_model=cfg.teacher_model or cfg.model_name).result()


def topk_datum(prompt: list[int], response: list[int],
               topk_rows: list[list[tuple[int, float]]]) -> tuple[types.Datum, float]:
    """A student datum on prompt + response whose response positions carry the teacher's
    top-K as [N, K] targets. `topk_rows[j]` is the teacher's [(token id, logprob), ...] for
    response token j. Weights: softmax over each row's K logprobs / len(response), so they
    sum to 1 over the datum; prompt positions: weight 0, targets = the real next token.
    Returns the datum and the mean entropy of the renormalised rows."""
    tokens = prompt + response
    n, k, n_prompt = len(tokens) - 1, len(topk_rows[0]), len(prompt) - 1
    targets = np.repeat(np.asarray(tokens[1:], np.int64)[:, None], k, axis=1)
    weights = np.zeros((n, k), np.float32)
    ids = np.asarray([[i for i, _ in row] for row in topk_rows], np.int64)
    lps = np.asarray([[lp for _, lp in row] for row in topk_rows], np.float64)
    probs = np.exp(lps - lps.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    targets[n_prompt:] = ids
    weights[n_prompt:] = probs / len(response)
    entropy = float(-(probs * np.log(np.maximum(probs, 1e-30))).sum(axis=1).mean())
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(targets),
                                        "weights": types.TensorData.from_numpy(weights)})
    return datum, entropy


def off_policy_step(cfg: Config, training: tinker.TrainingClient, teacher: tinker.SamplingClient,
                    renderer: Any, messages_P: list[list[Message]], step: int,
                    adam: types.AdamParams) -> dict[str, float]:
    t0 = time.perf_counter()
    stop = renderer.stop_sequences()
    tprompts_P = [renderer.build_generation_prompt(teacher_messages(cfg, m)) for m in messages_P]
    sprompts_P = [renderer.build_generation_prompt(m) for m in messages_P]
    futures_P = sample_prompts(teacher, tprompts_P, 1, max_tokens=cfg.max_tokens,
                               temperature=cfg.temperature, stop=stop,
                               seed=cfg.seed * TRAIN_SEED_STRIDE + step * 1_000)
    responses_P = [list(f.result().sequences[0].tokens) for f in futures_P]
    # The teacher's top-K at every answer position: score prompt + answer as a prompt.
    score_P = [teacher.sample(types.ModelInput.from_ints(tp + r), num_samples=1,
                              sampling_params=types.SamplingParams(max_tokens=1, temperature=0.0),
                              include_prompt_logprobs=True, topk_prompt_logprobs=cfg.topk,
                              prompt_logprobs_last_n=len(r))
               if r else None for tp, r in zip(tprompts_P, responses_P)]
    data_D, entropies, lengths = [], [], []
    for tp, sp, r, fut in zip(tprompts_P, sprompts_P, responses_P, score_P):
        lengths.append(len(r))
        if fut is None:
            continue
        rows = fut.result().topk_prompt_logprobs[len(tp):]  # row t: distribution of token t
        datum, entropy = topk_datum(sp, r, rows)
        data_D.append(datum)
        entropies.append(entropy)
    metrics = {"response_len": float(np.mean(lengths)), "num_datums": len(data_D),
               "num_tokens": int(sum(lengths)), "sample_s": time.perf_counter() - t0}
    if data_D:
        fwd_bwd_future = training.forward_backward(data_D, loss_fn="cross_entropy")
        optim_future = training.optim_step(adam)
        loss = fwd_bwd_future.result().metrics["loss:sum"] / len(data_D)
        optim_future.result()
        metrics["loss"] = loss
        metrics["teacher_entropy"] = float(np.mean(entropies))
        metrics["kl"] = loss - metrics["teacher_entropy"]
    return metrics


def on_policy_step(cfg: Config, training: tinker.TrainingClient, teacher: tinker.SamplingClient,
                   renderer: Any, messages_P: list[list[Message]], step: int,
                   adam: types.AdamParams) -> dict[str, float]:
    t0 = time.perf_counter()
    sampler = training.save_weights_and_get_sampling_client().result()
    stop = renderer.stop_sequences()
    tprompts_P = [renderer.build_generation_prompt(teacher_messages(cfg, m)) for m in messages_P]
    sprompts_P = [renderer.build_generation_prompt(m) for m in messages_P]
    futures_P = sample_prompts(sampler, sprompts_P, cfg.group_size, max_tokens=cfg.max_tokens,
                               temperature=cfg.temperature, stop=stop,
                               seed=cfg.seed * TRAIN_SEED_STRIDE + step * 1_000)
    samples = [(tp, sp, seq) for tp, sp, f in zip(tprompts_P, sprompts_P, futures_P)
               for seq in f.result().sequences]
    # The teacher's logprob of each student token, in the teacher's own context.
    scores = [teacher.compute_logprobs(types.ModelInput.from_ints(tp + list(seq.tokens)))
              if seq.tokens else None for tp, _, seq in samples]
    data_D, diffs, teacher_lps, student_lps, lengths = [], [], [], [], []
    for (tp, sp, seq), fut in zip(samples, scores):
        lengths.append(len(seq.tokens))
        if fut is None:
            continue
        lp_teacher = np.asarray(fut.result()[len(tp):], np.float32)  # answer tokens only
        lp_student = np.asarray(seq.logprobs, np.float32)
        diff = lp_student - lp_teacher  # per-token reverse-KL estimate
        diffs.append(diff)
        teacher_lps.append(lp_teacher)
        student_lps.append(lp_student)
        d = rl_datum(list(sp), list(seq.tokens), list(seq.logprobs), 0.0)
        advantages = np.zeros(len(sp) - 1 + len(seq.tokens), np.float32)
        advantages[len(sp) - 1:] = -cfg.kl_coeff * diff
        data_D.append(types.Datum(model_input=d.model_input, loss_fn_inputs={
            **d.loss_fn_inputs, "advantages": types.TensorData.from_numpy(advantages)}))
    metrics = {"response_len": float(np.mean(lengths)), "num_datums": len(data_D),
               "sample_s": time.perf_counter() - t0}
    if data_D:
        metrics["reverse_kl"] = float(np.concatenate(diffs).mean())
        metrics["teacher_logprob"] = float(np.concatenate(teacher_lps).mean())
        metrics["student_logprob"] = float(np.concatenate(student_lps).mean())
        metrics |= policy_step(training, data_D, adam)
    return metrics


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)  # fresh, or resumed from log_path
    renderer = get_renderer(training.get_tokenizer())
    teacher = teacher_client(cfg, service)
    prompts = load_prompts(cfg)
    adam = types.AdamParams(learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    logger = open_logger(cfg, start_step, f"distill {cfg.mode}")
    step_fn = off_policy_step if cfg.mode == "off_policy" else on_policy_step
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        metrics = step_fn(cfg, training, teacher, renderer, step_prompts(prompts, cfg, step),
                          step, adam)
        metrics["step_s"] = time.perf_counter() - t0
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
