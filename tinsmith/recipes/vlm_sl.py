"""Supervised fine-tuning of a vision-language model on images: name the colour of a shape.

    python -m tinsmith.recipes.vlm_sl                                   # tiny random Qwen3-VL
    python -m tinsmith.recipes.vlm_sl model_name=/models/Qwen3-VL-2B-Instruct max_steps=40

Data: generated offline, `num_images` small PNGs (`image_size` pixels square), each a filled
shape (square, disc or triangle) of one of six colours on a light noisy background. The user
turn is the image and "What colour is the shape?", the assistant turn the colour name. Each
conversation is rendered with the model's chat template, with the image as an `ImageChunk`
(tinsmith.cookbook.renderers_vision: `expected_tokens` from the model's own image processor),
and only the answer carries loss. Weights are normalised over a batch, so `nll` is the mean
negative log-likelihood per answer token.

A share of the images (`eval_fraction`) is held out: every `eval_every` steps its NLL is
measured with `forward`, and after the last step the trained weights answer each held-out
image greedily (`eval/accuracy`: the share answered with the right colour).

The image processor is read from the model's local folder (a catalog name such as
`synthetic/tiny-qwen3-vl`, or a Hugging Face folder): nothing is downloaded.

What it leaves out: real datasets (any list of (image, question, answer) triples fits
`conversations`), multi-image turns, and data augmentation.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.datasets import batches, train_test_split
from tinsmith.cookbook.hyperparams import warmup_cosine
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Message, TrainOn
from tinsmith.cookbook.renderers_vision import VisionRenderer, to_datum
from tinsmith.recipes.chat_sl import normalised  # weights sum to 1 over a batch

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 30), "purple": (140, 50, 170), "black": (10, 10, 10)}
SHAPES = ("square", "disc", "triangle")
QUESTION = "What colour is the shape?"


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    model_name: str = "synthetic/tiny-qwen3-vl"
    log_path: str = "runs/vlm_sl"
    learning_rate: float = 5e-3  # type: ignore[assignment]
    """Peak Adam learning rate."""
    warmup_steps: int = 2
    """Linear warmup steps before the cosine decay."""
    batch_size: int = 8
    """Conversations (images) per step."""
    num_images: int = 60
    """Generated images, train and held-out together."""
    image_size: int = 64
    """Side of each generated image, in pixels."""
    eval_fraction: float = 0.2
    """Share of the images held out for the NLL and accuracy evaluation."""
    eval_every: int = 5
    """Evaluate the held-out NLL every this many steps (and after the last)."""


def make_image(colour: str, shape: str, size: int, rng: random.Random):
    """A `size`-pixel square PIL image: a `shape` in `colour` on a light noisy background."""
    from PIL import Image, ImageDraw

    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(200, 256, (size, size, 3))
    img = Image.fromarray(noise.astype(np.uint8))
    lo, hi = rng.randint(size // 10, size // 3), rng.randint(2 * size // 3, size - size // 10)
    box = (lo, lo, hi, hi)
    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "disc":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=COLOURS[colour])
    return img


def conversations(cfg: Config) -> list[tuple[list[Message], str]]:
    """(conversation, answer) pairs: the user's image and question, the assistant's colour."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.num_images):
        colour = list(COLOURS)[i % len(COLOURS)]
        image = make_image(colour, rng.choice(SHAPES), cfg.image_size, rng)
        user = {"role": "user", "content": [{"type": "image", "image": image},
                                            {"type": "text", "text": QUESTION}]}
        out.append(([user, {"role": "assistant", "content": colour}], colour))
    return out


def image_processor(model_name: str) -> Any:
    """The model's image processor, from its local folder (never a download)."""
    from transformers import AutoImageProcessor

    from tinsmith.models.catalog import resolve_model_dir

    return AutoImageProcessor.from_pretrained(resolve_model_dir(model_name))


def accuracy(training: tinker.TrainingClient, renderer: VisionRenderer,
             held_out: list[tuple[list[Message], str]]) -> float:
    """Share of held-out images whose greedy answer (current weights) names the right colour."""
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=8, temperature=0.0, stop=renderer.stop_sequences())
    futures = [sampler.sample(renderer.build_generation_prompt(conv[:1]), 1, params)
               for conv, _ in held_out]
    right = 0
    for fut, (_, answer) in zip(futures, held_out):
        reply, _ = renderer.parse_response(list(fut.result().sequences[0].tokens))
        right += reply["content"].strip().lower() == answer
    return right / len(held_out)


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)
    renderer = VisionRenderer(training.get_tokenizer(), image_processor(cfg.model_name))
    pairs = conversations(cfg)
    train_pairs, eval_pairs = train_test_split(pairs, cfg.eval_fraction, cfg.seed)
    if len(train_pairs) < cfg.batch_size:
        raise SystemExit(f"error: {len(train_pairs)} training images, fewer than batch_size")

    def datum(conv: list[Message]) -> types.Datum:
        return to_datum(*renderer.build_supervised_example(conv, TrainOn.LAST_ASSISTANT))

    datums = [datum(conv) for conv, _ in train_pairs]
    eval_data = normalised([datum(conv) for conv, _ in eval_pairs]) if eval_pairs else []
    logger = open_logger(cfg, start_step, "vlm_sl")
    per_epoch = len(datums) // cfg.batch_size
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        epoch, k = divmod(step, per_epoch)
        batch = normalised(batches(datums, cfg.batch_size, cfg.seed, epoch, drop_last=True)[k])
        lr = warmup_cosine(step, cfg.max_steps, min(cfg.warmup_steps, cfg.max_steps - 1),
                           cfg.learning_rate)
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=lr))
        metrics = {"nll": fwd_bwd.result().metrics["loss:sum"], "learning_rate": lr,
                   "grad_norm": (optim.result().metrics or {}).get("grad_norm:mean", float("nan")),
                   "tokens": sum(d.model_input.length for d in batch)}
        last = step + 1 == cfg.max_steps
        if eval_data and ((step + 1) % cfg.eval_every == 0 or last):
            metrics["eval/nll"] = training.forward(eval_data, "cross_entropy").result().metrics["loss:sum"]
        if eval_pairs and last:
            metrics["eval/accuracy"] = accuracy(training, renderer, eval_pairs)
        metrics["step_s"] = time.perf_counter() - t0
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
