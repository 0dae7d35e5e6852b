"""Supervised fine-tuning on conversations, with held-out NLL, checkpoints and resume.

    python -m tinsmith.recipes.chat_sl                                   # built-in conversations
    python -m tinsmith.recipes.chat_sl data_path=chats.jsonl train_on=all_assistant
    python -m tinsmith.recipes.chat_sl hf_dataset_path=./my_dataset      # a datasets.save_to_disk folder

Data: a JSONL file of {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}
lines, or a local Hugging Face `datasets` folder with such rows. Each conversation is
rendered with the model's own chat template (tinsmith.cookbook.renderers), and `train_on`
picks the tokens that carry loss: the last assistant message, all assistant messages, all
messages, or everything. Weights are normalised over a batch, so the reported `nll` is the
mean negative log-likelihood per trained token.

A share of the data (`eval_fraction`) is held out; every `eval_every` steps its NLL is
measured with `forward` (no gradient). The learning rate, unless given, is the recommended
LoRA rate for the model's hidden size (tinsmith.cookbook.hyperparams), with linear warmup
and cosine decay. Without data it trains on built-in two-turn conversations with a unit
conversion assistant, whose held-out NLL falls visibly within a few dozen steps.

What it leaves out: sequence packing, gradient accumulation, sampling-based evaluation
(see math_rl), and per-conversation loss normalisation (weights are per token).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tinker
from tinker import types

from tinsmith.cookbook.datasets import (
    Conversation,
    batches,
    load_conversations,
    load_hf_dataset,
    row_to_conversation,
    train_test_split,
)
from tinsmith.cookbook.hyperparams import warmup_cosine
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    finished_stage,
    open_logger,
    recommended_lora_lr,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import TrainOn, get_renderer, to_datum
from tinsmith.cookbook.rl import MultiTurnConfig


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/chat_sl"
    learning_rate: float | None = None  # type: ignore[assignment]
    """Peak Adam learning rate; None: the recommended LoRA rate for the model."""
    warmup_steps: int = 2
    """Linear warmup steps before the cosine decay."""
    batch_size: int = 8
    """Conversations per step."""
    train_on: Literal["last_assistant", "all_assistant", "all_messages", "all_tokens"] = "all_assistant"
    """Which tokens carry loss (tinsmith.cookbook.renderers.TrainOn)."""
    data_path: str | None = None
    """JSONL of conversations or prompt/completion pairs (None: the built-in set)."""
    hf_dataset_path: str | None = None
    """A local `datasets.save_to_disk` folder (needs the `datasets` package)."""
    eval_fraction: float = 0.2
    """Share of the conversations held out for the NLL evaluation."""
    eval_every: int = 5
    """Evaluate every this many steps (and after the last)."""


UNITS = [("kilometres", "miles", 0.621371), ("miles", "kilometres", 1.609344),
         ("kilograms", "pounds", 2.204623), ("litres", "gallons", 0.264172),
         ("metres", "feet", 3.280840), ("inches", "centimetres", 2.54)]


def builtin_conversations(n: int = 60, seed: int = 0) -> list[Conversation]:
    """Two-turn chats with a terse unit-conversion assistant (answers are computed)."""
    rng = random.Random(seed)
    system = {"role": "system", "content": "You convert units. Reply with the number and unit only."}
    out = []
    for _ in range(n):
        (a, b, f), (c, d, g) = rng.sample(UNITS, 2)
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        out.append([system,
                    {"role": "user", "content": f"How many {b} is {x} {a}?"},
                    {"role": "assistant", "content": f"{x * f:.2f} {b}"},
                    {"role": "user", "content": f"And {y} {c} in {d}?"},
                    {"role": "assistant", "content": f"{y * g:.2f} {d}"}])
    return out


def load(cfg: Config) -> list[Conversation]:
    if cfg.hf_dataset_path:
        return [row_to_conversation(r) for r in load_hf_dataset(cfg.hf_dataset_path)]
    if cfg.data_path:
        return load_conversations(cfg.data_path)
    return builtin_conversations(seed=cfg.seed)


def normalised(data: list[types.Datum]) -> list[types.Datum]:
    """Scale weights so they sum to 1 over the batch: loss:sum = mean NLL per trained token."""
    total = sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in data) or 1.0
    return [types.Datum(model_input=d.model_input,
                        loss_fn_inputs={**d.loss_fn_inputs,
                                        "weights": d.loss_fn_inputs["weights"].to_numpy() / total})
            for d in data]


def peak_lr(cfg: Config) -> float:
    return cfg.learning_rate if cfg.learning_rate is not None else recommended_lora_lr(cfg.model_name)


def train(cfg: Config, service: tinker.ServiceClient,
          conversations: list[Conversation] | None = None) -> dict[str, Any]:
    """Train on `conversations` (default: those `cfg` names, see `load`)."""
    training, start_step = training_client(service, cfg)
    renderer = get_renderer(training.get_tokenizer())
    convs = load(cfg) if conversations is None else conversations
    train_convs, eval_convs = train_test_split(convs, cfg.eval_fraction, cfg.seed)
    if len(train_convs) < cfg.batch_size:
        raise SystemExit(f"error: {len(train_convs)} training conversations, fewer than batch_size")
    train_on = TrainOn(cfg.train_on)
    datums = [to_datum(*renderer.build_supervised_example(c, train_on)) for c in train_convs]
    eval_data = normalised([to_datum(*renderer.build_supervised_example(c, train_on))
                            for c in eval_convs]) if eval_convs else []
    lr = peak_lr(cfg)
    logger = open_logger(cfg, start_step, "chat_sl")
    per_epoch = len(datums) // cfg.batch_size
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        epoch, k = divmod(step, per_epoch)
        batch = normalised(batches(datums, cfg.batch_size, cfg.seed, epoch, drop_last=True)[k])
        step_lr = warmup_cosine(step, cfg.max_steps, min(cfg.warmup_steps, cfg.max_steps - 1), lr)
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=step_lr))
        metrics = {"nll": fwd_bwd.result().metrics["loss:sum"], "learning_rate": step_lr,
                   "grad_norm": (optim.result().metrics or {}).get("grad_norm:mean", float("nan")),
                   "tokens": sum(d.model_input.length for d in batch)}
        if eval_data and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            metrics["eval/nll"] = training.forward(eval_data, "cross_entropy").result().metrics["loss:sum"]
        metrics["step_s"] = time.perf_counter() - t0
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint)


def sft_stage(cfg: RecipeConfig, service: tinker.ServiceClient,
              conversations: Callable[[], list[Conversation]], *, steps: int, batch_size: int,
              learning_rate: float | None, train_on: str = "last_assistant",
              folder: str = "sft") -> str:
    """Supervised fine-tuning on `conversations()` as the first stage of another recipe (its
    own run in <cfg.log_path>/<folder>, no held-out set); returns the final training state's
    path. A stage that already ran all `steps` is not run again (and its conversations are
    not built), an interrupted one resumes."""
    sub = Config(model_name=cfg.model_name, log_path=str(Path(cfg.log_path) / folder),
                 max_steps=steps, learning_rate=learning_rate, lora_rank=cfg.lora_rank,
                 seed=cfg.seed, save_every=cfg.save_every, table_every=cfg.table_every,
                 batch_size=batch_size, train_on=train_on, eval_fraction=0.0,  # type: ignore[arg-type]
                 wandb_project=cfg.wandb_project, tensorboard=cfg.tensorboard)
    if (done := finished_stage(sub, folder)) is not None:
        return done
    return str(train(sub, service, conversations())["checkpoint"]["state_path"])


def warm_start(cfg: MultiTurnConfig, service: tinker.ServiceClient,
               demonstrations: Callable[[], list[Conversation]]) -> str | None:
    """A multi-turn RL recipe's warm start: with cfg.sft_steps > 0, `sft_stage` on scripted
    `demonstrations()` (every assistant turn trained); returns the training state RL starts
    from, or None when there is no warm start."""
    if cfg.sft_steps <= 0:
        return None
    return sft_stage(cfg, service, demonstrations, steps=cfg.sft_steps, batch_size=8,
                     learning_rate=cfg.sft_learning_rate, train_on="all_assistant")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
