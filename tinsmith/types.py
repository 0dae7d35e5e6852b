"""Plain data that crosses layer boundaries (api -> scheduler -> engine).

Nothing here imports torch: the api layer decodes wire bodies into these dataclasses
(NumPy arrays at most), the scheduler queues them, and only the engine turns them into
tensors. Shapes: N = number of model-input tokens of one datum, K = top-K width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

StopReason = Literal["stop", "length"]


class UserError(ValueError):
    """A problem with what the user sent. Becomes an HTTP 4xx or a future error of category "user"."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


class NotFound(UserError):
    """Something the request names does not exist (model id, checkpoint, sampler...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=404)


@dataclass(frozen=True)
class LoraSpec:
    """Geometry of one LoRA adapter. Scale applied to B@A is alpha / rank."""

    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True
    alpha: float = 32.0

    def to_json(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "seed": self.seed,
            "train_mlp": self.train_mlp,
            "train_attn": self.train_attn,
            "train_unembed": self.train_unembed,
            "alpha": self.alpha,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> LoraSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]


@dataclass(frozen=True)
class DatumIn:
    """One training example: model-input tokens [N] and its loss inputs (dense arrays).

    Every loss input shares next-token alignment with `tokens`: position i of the model
    input predicts `target_tokens[i]`, so arrays are [N] or [N, K].
    """

    tokens: np.ndarray  # int64 [N]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class AdamSpec:
    """AdamW hyperparameters of one optim_step (weight decay is decoupled; clip 0 = off)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class SampleSpec:
    """One sampling request, decoded. `stop_tokens` is empty and `stop_strings` empty means
    no stop at all; the api layer turns the SDK's "stop omitted" into the model's EOS ids."""

    prompt: np.ndarray  # int64 [P]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None


@dataclass
class SampledSeq:
    tokens: np.ndarray  # int32 [T], stop token / stop-string tokens included
    logprobs: np.ndarray  # float32 [T], log p(token) under the model at temperature 1
    stop_reason: StopReason


@dataclass
class SampleOut:
    sequences: list[SampledSeq]
    prompt_logprobs: np.ndarray | None = None  # float32 [P], NaN where not scored (always pos 0)


@dataclass
class FwdBwdOut:
    """Per-datum loss outputs (e.g. {"logprobs": f32 [N]}) and `name:reduction` metrics."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]
