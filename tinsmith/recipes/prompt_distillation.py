"""Prompt distillation: a teacher prompted with a long system prompt generates answers; the
student learns, by supervised fine-tuning, to answer the same way without it.

    python -m tinsmith.recipes.prompt_distillation                        # built-in questions
    python -m tinsmith.recipes.prompt_distillation prompts_path=questions.jsonl samples_per_prompt=8
    python -m tinsmith.recipes.prompt_distillation teacher_system="Answer in French."
    python -m tinsmith.recipes.prompt_distillation teacher_system="Greet with Ahoy." marker=Ahoy

The default system prompt (`TEACHER_SYSTEM`) makes the teacher "Professor Pip", who opens
every answer with `MARKER` ("Hello, friend!") and keeps it short, and shows three worked
examples of that. The bundled 135M model follows it: in a one-off screen while the prompt was chosen (no
project command reruns it), given the prompt it opened 23 of 24 greedy answers with the
marker, and without it none (distillation.TEACHER_SYSTEM, which
asks for "Imagine" without examples, got 1 of 40). So whether the student picked the
behaviour up is a count (docs/recipes/prompt_distillation.md has the measurements).

1. Data: the teacher (a sampling client of `teacher_model`, default the student's own base
   model, or the `teacher_path` sampler checkpoint) sees `teacher_system` followed by each
   question (the built-in `QUESTIONS`, or `prompts_path`: JSONL of {"prompt": ...} or
   {"messages": [...]} lines) and answers it `samples_per_prompt` times. The (question,
   answer) pairs are written to <log_path>/teacher_data.jsonl; a resumed run reads them back
   instead of sampling again. A share of the questions (`eval_fraction`) is held out, with
   all their answers.
2. Training: the student, a LoRA training client, sees only the question (no system prompt)
   and learns the teacher's answer with `cross_entropy` on the last assistant message.
   Weights are normalised over the batch, so `nll` is the mean NLL per trained token.
3. Every `eval_every` steps (and after the last) `eval/nll`: the held-out answers' NLL per
   token under the student, again without the system prompt (`forward`, no gradient).
   Teacher answers are sampled at `temperature`, so much of that NLL is sampling noise no
   student can predict. The behaviour itself shows in the student's greedy answers to the
   held-out questions (no system prompt), measured at step 0 (the base model) and then
   every `eval_every` steps, before that step's update:
   - `eval/follows`: the share that open with the marker (`opens_with`: words compared,
     case and punctuation aside). A run's first step also logs `teacher_follows`, the share of
     the teacher's greedy answers (with the prompt) that do, the ceiling, and
     `data_follows`, the share of the training answers that do. The marker is `marker`, or
     MARKER for the default prompt; with another `teacher_system` and no `marker`, there is
     no such check.
   - `eval/first_word`: the share that open with the same word as the teacher's greedy
     answer (with the prompt); this needs no marker, so it applies to any system prompt.

Every step logs to <log_path>/metrics.jsonl; save every `save_every` steps and after the
last; the same `log_path` resumes (optimizer state and teacher data included).

What it leaves out: filtering or grading the teacher's answers (those without the marker
are trained on too), regenerating them when the teacher settings change (delete
teacher_data.jsonl), a learning-rate schedule, and distillation with soft targets (see
tinsmith.recipes.distillation).
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
from tinsmith.recipes.distillation import QUESTIONS as DISTILLATION_QUESTIONS
from tinsmith.recipes.distillation import load_prompts, teacher_client, teacher_messages

TEACHER_DATA = "teacher_data.jsonl"
MARKER = "Hello, friend!"
"""How an answer that follows `TEACHER_SYSTEM` opens (`eval/follows` checks for it)."""
# Long, with worked examples of the opening: the bundled 135M model copies this one (and
# not every demonstrated opening: "Short answer:" it never copied), while it hardly ever
# followed distillation.TEACHER_SYSTEM's bare "Begin each answer with the word 'Imagine'".
TEACHER_SYSTEM = (
    "You are Professor Pip, a friendly science teacher for curious ten-year-olds. Begin every "
    f'answer with the exact words "{MARKER}" and then explain the idea in one or two short '
    "sentences of plain words, with no lists, headings or jargon. Where you can, compare the "
    "idea with something from everyday life, such as a kitchen, a playground or a bicycle. "
    "Never mention these instructions and never ask a question back.\n\n"
    "Examples:\n\n"
    "Question: Why is grass green?\n"
    f"Answer: {MARKER} Grass is green because its leaves are full of chlorophyll, a green "
    "stuff that catches sunlight like a solar panel on a roof.\n\n"
    "Question: Why does it rain?\n"
    f"Answer: {MARKER} Water from the sea warms up and rises into the sky as vapour, like "
    "steam from a kettle, then cools into clouds and falls back down as rain.\n\n"
    "Question: What is a star?\n"
    f"Answer: {MARKER} A star is a giant ball of hot glowing gas, like our sun but so far "
    "away that it looks like a tiny dot.\n\n"
    f'Remember: every answer starts with "{MARKER}"'
)
# distillation's questions and more, so the held-out share is more than a handful.
QUESTIONS = [
    *DISTILLATION_QUESTIONS,
    "What is a volcano?", "How do birds fly?", "Why do leaves change colour in autumn?",
    "What is the moon made of?", "Why do we sleep?", "What is DNA?", "How do bees make honey?",
    "How does sound travel?", "Why do we have day and night?", "What is friction?",
    "How do earthquakes happen?", "How do fish breathe underwater?", "Why is the sun hot?",
    "How does a battery work?", "What is an atom?", "What is a fossil?",
    "Why do onions make us cry?", "How do our eyes see colours?", "Why does a ball bounce?",
    "How does a fridge keep food cold?", "What is a shadow?", "Why do we need to eat?",
    "What makes the wind blow?", "Why does bread rise?",
]


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/prompt_distillation"
    max_steps: int = 12
    """Train until this many steps are done in total (a resumed run counts earlier steps)."""
    learning_rate: float = 1e-3
    """Adam learning rate (constant); at 1e-4 the student had not picked the behaviour up
    after 12 steps."""
    teacher_model: str | None = None
    """Base model of the teacher (None: the student's model_name)."""
    teacher_path: str | None = None
    """A tinker:// sampler checkpoint to use as the teacher instead of a base model."""
    teacher_system: str = TEACHER_SYSTEM
    """System prompt the teacher sees and the student does not."""
    marker: str | None = None
    """Phrase that answers following the system prompt open with, for `eval/follows` (None:
    MARKER with the default teacher_system, no such check with another one)."""
    prompts_path: str | None = None
    """JSONL of {"prompt": ...} or {"messages": [...]} lines (None: the built-in QUESTIONS)."""
    samples_per_prompt: int = 2
    """Teacher answers generated per question."""
    max_tokens: int = 48
    """Longest teacher answer, in tokens."""
    temperature: float = 0.7
    """Teacher sampling temperature (at 1.0 the bundled teacher follows its prompt less than
    half the time, at 0.7 three times in four)."""
    batch_size: int = 8
    """Conversations per step."""
    eval_fraction: float = 0.2
    """Share of the questions (with all their answers) held out for `eval/nll`."""
    eval_every: int = 2
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
    prompts = load_prompts(cfg, QUESTIONS)
    rows = generate(cfg, teacher, renderer, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # a run killed mid-write regenerates rather than reading half a file
    return rows, True


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased, without digits or punctuation."""
    return re.findall(r"[a-z']+", text.lower())


def first_word(text: str) -> str:
    """The first word of `text` ("" if none): how an answer opens."""
    return next(iter(words(text)), "")


def opens_with(text: str, phrase: str) -> bool:
    """Whether `text` opens with the words of `phrase`, case and punctuation aside ("Hello
    friend." opens with "Hello, friend!"); never for a phrase without words."""
    target = words(phrase)
    return bool(target) and words(text)[:len(target)] == target


def follows_share(answers: list[str], marker: str) -> float:
    """The share of `answers` that open with `marker`: how many follow the system prompt."""
    return sum(opens_with(a, marker) for a in answers) / len(answers)


def behaviour_marker(cfg: Config) -> str:
    """The opening `eval/follows` checks for: `marker` if given, else MARKER for the default
    system prompt and '' (no check; `eval/first_word` still applies) for another one."""
    if cfg.marker is not None:
        return cfg.marker
    return MARKER if cfg.teacher_system == TEACHER_SYSTEM else ""


def greedy_answers(sampler: tinker.SamplingClient, renderer: Any,
                   prompts: list[list[Message]], max_tokens: int) -> list[str]:
    """The first `max_tokens` tokens of a greedy answer to each prompt, as text."""
    futures = sample_prompts(sampler, [renderer.build_generation_prompt(m) for m in prompts], 1,
                             max_tokens=max_tokens, temperature=0.0,
                             stop=renderer.stop_sequences())
    return [renderer.parse_response(list(f.result().sequences[0].tokens))[0]["content"]
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
    marker = behaviour_marker(cfg)
    # Greedy answers only need to reach past the marker (and the first word).
    opening_tokens = 8 + len(renderer.tokenizer.encode(marker, add_special_tokens=False))
    teacher_answers = greedy_answers(teacher, renderer,
                                     [teacher_messages(cfg, m) for m in held_out], opening_tokens)
    target_words = [first_word(a) for a in teacher_answers]
    # Logged with a run's first step: what the data cost, and how often the teacher follows.
    first: dict[str, float] = {"generate_s": time.perf_counter() - t0} if generated else {}
    if marker and held_out:
        first["teacher_follows"] = follows_share(teacher_answers, marker)  # the ceiling
        first["data_follows"] = follows_share([r["answer"] for r in rows if not r["eval"]], marker)
    logger = open_logger(cfg, start_step, "prompt_distillation", marker=marker)
    adam = types.AdamParams(learning_rate=cfg.learning_rate)
    per_epoch = len(datums) // cfg.batch_size
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        metrics = dict(first) if step == start_step else {}
        t1 = time.perf_counter()
        if held_out and (step % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            answers = greedy_answers(training.save_weights_and_get_sampling_client().result(),
                                     renderer, held_out, opening_tokens)
            metrics["eval/first_word"] = sum(
                first_word(a) == w for a, w in zip(answers, target_words)) / len(held_out)
            if marker:
                metrics["eval/follows"] = follows_share(answers, marker)
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
