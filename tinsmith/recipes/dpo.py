"""Direct preference optimisation (DPO) from (prompt, chosen, rejected) pairs.

    python -m tinsmith.recipes.dpo                                 # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.dpo data_path=pairs.jsonl beta=0.2  # your own pairs (JSONL)
    python -m tinsmith.recipes.dpo loss=client                     # the SDK's two-pass custom loss

Each pair is rendered with the model's chat template: the prompt conversation plus the
chosen (or rejected) reply, with weight 1 on the reply tokens and its end-of-turn token.
The reference policy is the base model (a fresh LoRA adapter starts at exactly zero, so
it is the policy at step 0); its logprobs are computed once, up front, with `forward`.

Every step sends `batch_size` pairs as datums 2i (chosen) and 2i+1 (rejected) with
`ref_logprobs`, using Tinsmith's one-pass server-side `dpo` loss (docs/losses.md), or with
`loss=client` the same DPO loss computed on the client through `forward_backward_custom`
(two passes; this also runs against servers without a `dpo` loss). The loss is a sum over
pairs, so the learning rate applies per pair. Every `eval_every` steps it scores held-out
pairs with `forward` (no gradient): the share of pairs whose chosen reply now has the higher
implicit reward, and the mean margin.

Without `data_path` it uses a built-in set: the same questions answered either warmly and
to the point (chosen) or curtly (rejected), so the effect is easy to see on a small model.
Leaves out: reference models other than the base model, and the SFT stage (see `rlhf`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import tinker
import torch
import torch.nn.functional as F
from tinker import types

from tinsmith.cookbook.datasets import (
    PreferencePair,
    batches,
    load_preference_pairs,
    train_test_split,
)
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import TrainOn, get_renderer, to_datum
from tinsmith.cookbook.rl import forward_logprobs, reference_client


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/dpo"
    learning_rate: float = 1e-4
    """Adam learning rate (constant); the DPO loss is summed over a batch's pairs."""
    batch_size: int = 4
    """Preference pairs per step."""
    beta: float = 0.1
    """DPO temperature: how far the policy may move from the reference."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed share of mislabelled pairs (0 <= eps < 0.5)."""
    loss: Literal["server", "client"] = "server"
    """server: one-pass `dpo` loss; client: DPO through forward_backward_custom (two passes)."""
    data_path: str | None = None
    """JSONL of {"prompt", "chosen", "rejected"} lines (prompt: text or messages)."""
    eval_fraction: float = 0.25
    """Share of the pairs held out for evaluation."""
    eval_every: int = 5
    """Evaluate every this many steps (and after the last)."""


QUESTIONS = [
    "How do I boil an egg?", "What is a good name for a cat?", "How far away is the Moon?",
    "Can you recommend a book?", "Why is the sky blue?", "How do I water a cactus?",
    "What should I cook tonight?", "How do I tie a scarf?", "What is photosynthesis?",
    "How can I sleep better?", "What is a prime number?", "How do I start running?",
    "What is the capital of France?", "How do I fix a squeaky door?", "What does DNA stand for?",
    "How do I make tea?", "Why do cats purr?", "What is a haiku?", "How do magnets work?",
    "How do I learn to juggle?",
]
CHOSEN = "Happy to help! Here is a short answer: {}"
REJECTED = ["Figure it out yourself.", "Look it up.", "Not my problem.", "Why ask me?",
            "Whatever. Ask someone else."]
ANSWERS = [
    "simmer it for nine minutes, then cool it in cold water.", "Biscuit is a friendly choice.",
    "about 384,000 kilometres.", "try The Hobbit by J. R. R. Tolkien.",
    "air scatters blue sunlight more than red.", "only when the soil is completely dry.",
    "a vegetable stir-fry with rice is quick.", "fold it in half and loop it once.",
    "plants turning light, water and CO2 into sugar.", "keep a regular bedtime and a dark room.",
    "a number with exactly two divisors.", "begin with short, easy jogs.", "Paris.",
    "oil the hinges.", "deoxyribonucleic acid.", "steep a tea bag in hot water for three minutes.",
    "mostly when they are content.", "a three-line poem of 5, 7 and 5 syllables.",
    "aligned electron spins create a magnetic field.", "start with two balls, then add a third.",
]


def builtin_pairs() -> list[PreferencePair]:
    return [PreferencePair([{"role": "user", "content": q}], CHOSEN.format(a),
                           REJECTED[i % len(REJECTED)])
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


def pair_datums(renderer: Any, pair: PreferencePair) -> list[types.Datum]:
    """[chosen, rejected] datums; weights 1 on the final reply (and its end-of-turn token)."""
    out = []
    for conversation in (pair.chosen_conversation(), pair.rejected_conversation()):
        tokens, weights = renderer.build_supervised_example(conversation, TrainOn.LAST_ASSISTANT)
        out.append(to_datum(tokens, weights))
    return out


def with_reference(service: tinker.ServiceClient, cfg: Config, data: list[types.Datum]) -> list[types.Datum]:
    """Add `ref_logprobs` from the base model (the policy at step 0)."""
    refs = forward_logprobs(reference_client(service, cfg.model_name), data)
    return [types.Datum(model_input=d.model_input,
                        loss_fn_inputs={**d.loss_fn_inputs, "ref_logprobs": r})
            for d, r in zip(data, refs)]


def client_dpo(beta: float, eps: float):
    """The same loss as the server's `dpo`, for forward_backward_custom."""

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        h = torch.stack([
            beta * ((lp - torch.as_tensor(d.loss_fn_inputs["ref_logprobs"].to_numpy()))
                    * torch.as_tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
            for d, lp in zip(data, logprobs)])
        z = h[0::2] - h[1::2]
        loss = -((1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)).sum()
        zd = z.detach()
        return loss, {"pair_accuracy": float((zd > 0).float().mean()), "margin": float(zd.mean())}

    return loss_fn


def flatten(pairs: list[list[types.Datum]]) -> list[types.Datum]:
    return [d for pair in pairs for d in pair]


def pair_steps(client: tinker.TrainingClient, cfg: RecipeConfig, start_step: int,
               train_data: list[list[types.Datum]], eval_data: list[types.Datum], *,
               loss_fn: str, loss_config: dict[str, float], batch_size: int, eval_every: int,
               desc: str, custom: Any = None) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Steps `start_step`..`cfg.max_steps` of a pairwise loss (`dpo`, `bradley_terry`) over
    `train_data` ([chosen, rejected] datum pairs), `batch_size` pairs a step, shuffled per
    epoch; with `custom` (a forward_backward_custom loss) instead of the server's loss.
    Evaluates on `eval_data` every `eval_every` steps and after the last; logs and saves
    through `cfg`. Returns (last metrics, last checkpoints.jsonl line or None)."""
    adam = types.AdamParams(learning_rate=cfg.learning_rate)
    logger = open_logger(cfg, start_step, desc)
    per_epoch = max(1, len(train_data) // batch_size)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        epoch, k = divmod(step, per_epoch)
        batch = flatten(batches(train_data, batch_size, cfg.seed, epoch, drop_last=True)[k])
        if custom is None:
            m = client.forward_backward(batch, loss_fn, loss_config).result().metrics
            metrics = {"loss": m["loss:sum"], "pair_accuracy": m["pair_accuracy:mean"],
                       "margin": m["margin:mean"]}
        else:
            m = client.forward_backward_custom(batch, custom).result().metrics
            metrics = {"loss": m["loss:sum"], "pair_accuracy": m["pair_accuracy"],
                       "margin": m["margin"]}
        client.optim_step(adam).result()
        if eval_data and ((step + 1) % eval_every == 0 or step + 1 == cfg.max_steps):
            ev = client.forward(eval_data, loss_fn, loss_config).result().metrics
            metrics |= {"eval/pair_accuracy": ev["pair_accuracy:mean"],
                        "eval/margin": ev["margin:mean"]}
        metrics["step_s"] = time.perf_counter() - t0
        checkpoint = end_step(logger, client, cfg, step, metrics, sampler_at_end=False) or checkpoint
    logger.close()
    return metrics, checkpoint


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)
    renderer = get_renderer(training.get_tokenizer())
    pairs = load_preference_pairs(cfg.data_path) if cfg.data_path else builtin_pairs()
    train_pairs, eval_pairs = train_test_split(pairs, cfg.eval_fraction, cfg.seed)
    rendered = [pair_datums(renderer, p) for p in train_pairs + eval_pairs]
    with_ref = with_reference(service, cfg, flatten(rendered))
    train_data = [with_ref[2 * i: 2 * i + 2] for i in range(len(train_pairs))]
    eval_data = with_ref[2 * len(train_pairs):]
    custom = client_dpo(cfg.beta, cfg.label_smoothing) if cfg.loss == "client" else None
    metrics, checkpoint = pair_steps(
        training, cfg, start_step, train_data, eval_data, loss_fn="dpo",
        loss_config={"beta": cfg.beta, "label_smoothing": cfg.label_smoothing},
        batch_size=cfg.batch_size, eval_every=cfg.eval_every, desc="dpo", custom=custom)
    return summary(cfg, start_step, metrics, checkpoint)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
