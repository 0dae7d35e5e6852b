"""Recommended hyperparameters: LoRA learning rates, a warmup + cosine schedule, RL batch scaling.

LoRA learning rate
------------------
The recommended LoRA learning rate depends on the base model's hidden size H and its family:

    LR = 5e-5 * 10 * (2000 / H) ** P,   P = 0.0775 (Qwen), P = 0.781 (Llama)

5e-5 is a typical full fine-tuning rate, 10 the usual LoRA multiplier (LoRA wants roughly
ten times the full fine-tuning rate), and the power law fits how the best rate moves with
model width in each family. Exponents are known for these two families only; any other
family raises ValueError rather than guessing one. SmolLM2 is a Llama-architecture model
(`model_type: "llama"`), so it uses the Llama exponent: H = 576 gives about 1.32e-3.

Schedule
--------
`warmup_cosine` ramps linearly to the peak over `warmup_steps`, then decays along half a
cosine to `peak_lr * min_lr_ratio`, reached exactly at the last step (`total_steps - 1`).

RL batch scaling
----------------
`rl_lr_for_batch` scales a learning rate tuned at one batch size to another with the
square-root rule: LR grows with sqrt(batch_size / base_batch_size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_FULL_FT_LR",
    "FAMILY_EXPONENTS",
    "LORA_MULTIPLIER",
    "family_of_model_type",
    "get_lora_lr",
    "get_lora_lr_for_model",
    "rl_lr_for_batch",
    "warmup_cosine",
]

BASE_FULL_FT_LR = 5e-5
LORA_MULTIPLIER = 10.0
REFERENCE_HIDDEN = 2000
# Power-law exponents of the LR-vs-width fit, per model family (the only known ones).
FAMILY_EXPONENTS: dict[str, float] = {"qwen": 0.0775, "llama": 0.781}
# HF config `model_type` -> family. Only types known to belong to a fitted family are mapped.
_MODEL_TYPE_FAMILY: dict[str, str] = {"llama": "llama", "qwen2": "qwen", "qwen3": "qwen"}


def get_lora_lr(hidden_size: int, family: str) -> float:
    """The recommended LoRA learning rate for a model of width `hidden_size`.

    `family` is "qwen" or "llama" (case-insensitive). Raises ValueError for anything else.
    """
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    key = family.strip().lower()
    if key not in FAMILY_EXPONENTS:
        known = ", ".join(sorted(FAMILY_EXPONENTS))
        raise ValueError(
            f"no LoRA learning-rate fit for model family {family!r}; known families: {known}. "
            "Pass a learning rate explicitly for other models."
        )
    return BASE_FULL_FT_LR * LORA_MULTIPLIER * (REFERENCE_HIDDEN / hidden_size) ** FAMILY_EXPONENTS[key]


def family_of_model_type(model_type: str) -> str:
    """Map a HF config `model_type` to a family of `FAMILY_EXPONENTS`, or raise ValueError."""
    family = _MODEL_TYPE_FAMILY.get(model_type.lower())
    if family is None:
        known = ", ".join(sorted(_MODEL_TYPE_FAMILY))
        raise ValueError(
            f"no LoRA learning-rate fit for model type {model_type!r} (known model types: {known}); "
            "pass a learning rate explicitly"
        )
    return family


def get_lora_lr_for_model(model_dir_or_config: str | PathLike[str] | Mapping[str, Any]) -> float:
    """`get_lora_lr` from a HF config: a model folder, a config.json path, or the parsed dict.

    Reads `hidden_size` and `model_type`; "llama" uses the Llama fit, "qwen2"/"qwen3" the
    Qwen fit, any other model type raises ValueError naming it.
    """
    if isinstance(model_dir_or_config, Mapping):
        config = model_dir_or_config
    else:
        path = Path(model_dir_or_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no HF config at {path} (expected a model folder or config.json)")
        config = json.loads(path.read_text())
    # Some multimodal configs nest the language model's settings under `text_config`.
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        config = {**config["text_config"], "model_type": config.get("model_type")}
    if "hidden_size" not in config or "model_type" not in config:
        raise ValueError("HF config lacks `hidden_size` or `model_type`")
    family = family_of_model_type(str(config["model_type"]))
    return get_lora_lr(int(config["hidden_size"]), family)


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate at `step` (0-based) of a linear-warmup, cosine-decay schedule.

    - warmup, step < warmup_steps: peak_lr * (step + 1) / (warmup_steps + 1), a straight
      line that never trains a step at LR 0 and continues into the peak;
    - step == warmup_steps: peak_lr (the warmup's end);
    - decay: min_lr + (peak_lr - min_lr) * (1 + cos(pi * t)) / 2 with
      t = (step - warmup_steps) / (total_steps - 1 - warmup_steps), so the last step,
      total_steps - 1, is exactly min_lr = peak_lr * min_lr_ratio. Steps past the end stay
      at min_lr. With warmup_steps = 0 the first step is the peak.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps == 0:  # the warmup's end is the last step: nothing left to decay over
        return peak_lr
    t = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = peak_lr * min_lr_ratio
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def rl_lr_for_batch(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Scale `base_lr`, tuned at `base_batch_size`, to `batch_size` by the square-root rule.

    Bigger RL batches give lower-variance policy gradients, which tolerate a larger step;
    sqrt scaling keeps the update's noise level roughly constant: 4x the batch, 2x the LR.
    """
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size}, {base_batch_size}")
    return base_lr * math.sqrt(batch_size / base_batch_size)
