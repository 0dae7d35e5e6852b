"""Prompt distillation: a teacher prompted with a long system prompt generates answers; the
student learns, by supervised fine-tuning, to answer the same way without it.

    python -m tinsmith.recipes.prompt_distillation                        # built-in questions
    python -m tinsmith.recipes.prompt_distillation prompts_path=questions.jsonl samples_per_prompt=8
    python -m tinsmith.recipes.prompt_distillation teacher_system="Answer in French."

1. Data: the teacher (a sampling client of `teacher_model`, default the student's own base
   model, or the `teacher_path` sampler checkpoint) sees `teacher_system` followed by each
   question (the built-in `QUESTIONS` of tinsmith.recipes.distillation, or `prompts_path`:
   JSONL of {"prompt": ...} or {"messages": [...]} lines) and answers it
   `samples_per_prompt` times. The (question, answer) pairs are written to
   <log_path>/teacher_data.jsonl; a resumed run reads them back instead of sampling again.
   A share of the questions (`eval_fraction`) is held out, with all their answers.
2. Training: the student, a LoRA training client, sees only the question (no system prompt)
   and learns the teacher's answer with `cross_entropy` on the last assistant message.
   Weights are normalised over the batch, so `nll` is the mean NLL per trained token.
3. Every `eval_every` steps (and after the last) `eval/nll`: the held-out answers' NLL per
   token under the student, again without the system prompt (`forward`, no gradient).
   Teacher answers are sampled at `temperature`, so much of that NLL is sampling noise no
   student can predict; the behaviour itself shows in `eval/first_word`: on the held-out
   questions, the share of the student's greedy answers (no system prompt) that open with
   the same word as the teacher's greedy answer (with it). Measured at step 0 (the base
   model) and then every `eval_every` steps, before that step's update.

Every step logs to <log_path>/metrics.jsonl; save every `save_every` steps and after the
last; the same `log_path` resumes (optimizer state and teacher data included).

What it leaves out: filtering or grading the teacher's answers, regenerating them when the
teacher settings change (delete teacher_data.jsonl), a learning-rate schedule, and
distillation with soft targets (see tinsmith.recipes.distillation).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tinker
from tinker import types

from tinsmith.cookbook.datasets import batches, train_test_split
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Message, TrainOn, get_renderer, to_datum
from tinsmith.cookbook.rl import TRAIN_SEED_STRIDE, sample_prompts
from tinsmith.recipes.chat_sl import normalised
from tinsmith.recipes.distillation import (
    TEACHER_SYSTEM,
    load_prompts,
    teacher_client,
    teacher_messages,
)

TEACHER_DATA = "teacher_data.jsonl"


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/prompt_distillation"
    teacher_model: str | None = None
    """Base model of the teacher (None: the student's model_name)."""
    teacher_path: str | None = None
    """A tinker:// sampler checkpoint to use as the teacher instead of a base model."""
    teacher_system: str = TEACHER_SYSTEM
    """System prompt the teacher sees and the student does not."""
    prompts_path: str | None = None
    """JSONL of {"prompt": ...} or {"messages": [...]} lines (None: the built-in questions)."""
    samples_per_prompt: int = 4
    """Teacher answers generated per question."""
    max_tokens: int = 128
    """Longest teacher answer, in tokens."""
    temperature: float = 1.0
    """Teacher sampling temperature."""
    batch_size: int = 8
    """Conversations per step."""
    eval_fraction: float = 0.2
    """Share of the questions (with all their answers) held out for `eval/nll`."""
    eval_every: int = 5
    """Evaluate every this many steps (and after the last)."""


def generate(cfg: Config, teacher: tinker.SamplingClient, renderer: Any,
             prompts: list[list[Message]]) -> list[dict[str, Any]]:
    """The teacher's answers: rows {"messages", "answer", "eval"} (messages without the system)."""
    _, held_out = train_test_split(list(range(len(prompts))), cfg.eval_fraction, cfg.seed)
    futures = sample_prompts(
        teacher, [renderer.build_generation_prompt(teacher_messages(cfg, m)) for m in prompts],
        cfg.samples_per_prompt, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        stop=renderer.stop_sequences(), seed=cfg.seed * TRAIN_SEED_STRIDE)
    return [{"messages": m, "answer": renderer.parse_response(list(seq.tokens))[0]["content"],
             "eval": p in held_out}
            for p, (m, f) in enumerate(zip(prompts, futures)) for seq in f.result().sequences]


def teacher_data(cfg: Config, teacher: tinker.SamplingClient,
                 renderer: Any) -> tuple[list[dict[str, Any]], bool]:
    """The cached teacher data of `log_path`, or freshly generated (and cached) rows;
    and whether they were generated now."""
    path = Path(cfg.log_path) / TEACHER_DATA
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], False
    rows = generate(cfg, teacher, renderer, load_prompts(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # a run killed mid-write regenerates rather than reading half a file
    return rows, True


def first_word(text: str) -> str:
    """The first word of `text`, lower-cased ("" if none): how an answer opens."""
    words = re.findall(r"[A-Za-z']+", text)
    return words[0].lower() if words else ""


def greedy_openings(sampler: tinker.SamplingClient, renderer: Any,
                    prompts: list[list[Message]]) -> list[str]:
    """The first word of a greedy answer to each prompt (a few tokens are enough)."""
    futures = sample_prompts(sampler, [renderer.build_generation_prompt(m) for m in prompts], 1,
                             max_tokens=8, temperature=0.0, stop=renderer.stop_sequences())
    return [first_word(renderer.parse_response(list(f.result().sequences[0].tokens))[0]["content"])
            for f in futures]


def student_datum(renderer: Any, row: dict[str, Any]) -> types.Datum:
    """The question without the teacher's system prompt, loss on the teacher's answer."""
    convo = [*row["messages"], {"role": "assistant", "content": row["answer"]}]
    return to_datum(*renderer.build_supervised_example(convo, TrainOn.LAST_ASSISTANT))


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)  # fresh, or resumed from log_path
    renderer = get_renderer(training.get_tokenizer())
    t0 = time.perf_counter()
    teacher = teacher_client(cfg, service)
    rows, generated = teacher_data(cfg, teacher, renderer)
    datums = [student_datum(renderer, r) for r in rows if not r["eval"]]
    eval_data = normalised([student_datum(renderer, r) for r in rows if r["eval"]])
    if len(datums) < cfg.batch_size:
        raise SystemExit(f"error: {len(datums)} training conversations, fewer than batch_size")
    held_out = list({json.dumps(r["messages"]): r["messages"] for r in rows if r["eval"]}.values())
    target_words = greedy_openings(teacher, renderer,
                                   [teacher_messages(cfg, m) for m in held_out])
    logger = open_logger(cfg, start_step, "prompt_distillation")
    adam = types.AdamParams(learning_rate=cfg.learning_rate)
    per_epoch = len(datums) // cfg.batch_size
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        metrics = {"generate_s": time.perf_counter() - t0} if step == start_step and generated else {}
        t1 = time.perf_counter()
        if held_out and (step % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            words = greedy_openings(training.save_weights_and_get_sampling_client().result(),
                                    renderer, held_out)
            metrics["eval/first_word"] = sum(
                a == b for a, b in zip(words, target_words)) / len(held_out)
        epoch, k = divmod(step, per_epoch)
        batch = normalised(batches(datums, cfg.batch_size, cfg.seed, epoch, drop_last=True)[k])
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(adam)
        metrics["nll"] = fwd_bwd.result().metrics["loss:sum"]
        optim.result()
        metrics["tokens"] = sum(d.model_input.length for d in batch)
        if eval_data and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            metrics["eval/nll"] = training.forward(eval_data, "cross_entropy").result().metrics["loss:sum"]
        metrics["step_s"] = time.perf_counter() - t1
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint, generated=generated, num_train=len(datums), num_eval=len(eval_data))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
