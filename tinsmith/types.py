"""Plain data that crosses layer boundaries (api -> scheduler -> engine).

Nothing here imports torch: the api layer decodes wire bodies into these dataclasses
(NumPy arrays at most), the scheduler queues them, and only the engine turns them into
tensors. Shapes: N = number of model-input tokens of one datum, K = top-K width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

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
class ProvenanceSpan:
    """Where `length` consecutive loss positions came from: tokens [offset, offset+length)
    of a recorded sampled sequence's prompt ("prompt") or of its sampled tokens ("sampled")."""

    kind: Literal["prompt", "sampled"]
    sequence_id: str
    offset: int
    length: int


# The id an image's placeholder positions hold in DatumIn.tokens / SampleSpec.prompt until the
# engine (engine/vision.py) replaces them with the model's image token; never a real token.
IMAGE_SLOT = -1


@dataclass(frozen=True)
class ImageIn:
    """One image chunk of a model input, as the client sent it (bytes stay bytes here).

    It sits at `tokens[at : at + length]`, which hold IMAGE_SLOT: `length` is the chunk's
    `expected_tokens` (what the SDK's `ModelInput.length` counts), 0 when the client gave
    none. The engine decodes it and checks how many tokens it really becomes."""

    data: bytes
    format: str  # as sent: "png" or "jpeg" are accepted
    at: int
    length: int
    expected_tokens: int | None = None


@dataclass(frozen=True)
class DatumIn:
    """One training example: model-input tokens [N] and its loss inputs (dense arrays).

    Every loss input shares next-token alignment with `tokens`: position i of the model
    input predicts `target_tokens[i]`, so arrays are [N] or [N, K]. `spans` (the SDK's
    loss_fn_input_spans) tile the N loss positions, in order, when the client sent them.
    """

    tokens: np.ndarray  # int64 [N]; IMAGE_SLOT at the positions of `images`
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    spans: tuple[ProvenanceSpan, ...] = ()
    images: tuple[ImageIn, ...] = ()  # in order of position


OptimizerType = Literal["adamw", "dimuon"]
_OPTIMIZER_VERSIONS: dict[str, tuple[int, ...]] = {"adamw": (), "dimuon": (1,)}


@dataclass(frozen=True)
class OptimizerConfig:
    """A training run's optimizer family, fixed when the run is created (the SDK's
    AdamOptimizerConfig / DimuonOptimizerConfig; docs/optimizers.md). AdamW has no version."""

    type: OptimizerType = "adamw"
    version: int | None = None

    def to_json(self) -> dict[str, object]:
        """The SDK's wire form: {"type": "adamw"} or {"type": "dimuon", "version": 1}."""
        return {"type": self.type} if self.version is None else {"type": self.type, "version": self.version}

    def to_db(self) -> dict[str, object] | None:
        """The `training_runs.optimizer` column: NULL for AdamW."""
        return None if self.type == "adamw" else self.to_json()

    @classmethod
    def from_json(cls, d: Mapping[str, object] | None) -> OptimizerConfig:
        """Parse the wire / stored form (None: AdamW); a type, version or field this server
        does not know raises UserError, never a silent default."""
        if d is None:
            return ADAMW
        kind = d.get("type")
        if kind not in _OPTIMIZER_VERSIONS:
            raise UserError(f"unknown optimizer type {kind!r}: this server supports "
                            f"{sorted(_OPTIMIZER_VERSIONS)}")
        extra = sorted(set(d) - {"type", "version"})
        if extra:
            raise UserError(f"optimizer config {kind!r} has unknown fields {extra}")
        versions = _OPTIMIZER_VERSIONS[str(kind)]
        version = d.get("version", versions[-1] if versions else None)
        if versions and (isinstance(version, bool) or version not in versions):
            raise UserError(f"optimizer {kind!r} version {version!r} is not supported; "
                            f"this server supports versions {list(versions)}")
        if not versions and version is not None:
            raise UserError(f"optimizer {kind!r} has no version, got {version!r}")
        return cls(kind, version)  # type: ignore[arg-type]


ADAMW = OptimizerConfig()
DIMUON = OptimizerConfig("dimuon", 1)


@dataclass(frozen=True)
class AdamSpec:
    """AdamW hyperparameters of one optim_step (weight decay is decoupled; clip 0 = off)."""

    family: ClassVar[OptimizerType] = "adamw"
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class DimuonSpec:
    """Dimuon hyperparameters of one optim_step (docs/optimizers.md): the SDK's DimuonParams.
    beta1 is the momentum's EMA coefficient; grad_clip_norm <= 0 means no clipping."""

    family: ClassVar[OptimizerType] = "dimuon"
    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9


OptimSpec = AdamSpec | DimuonSpec


@dataclass(frozen=True)
class SampleSpec:
    """One sampling request, decoded. `stop_tokens` is empty and `stop_strings` empty means
    no stop at all; the api layer turns the SDK's "stop omitted" into the model's EOS ids."""

    prompt: np.ndarray  # int64 [P]; IMAGE_SLOT at the positions of `images`
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: int | None = None  # also limits the rows of topk_prompt_logprobs
    topk_prompt_logprobs: int = 0  # k most likely tokens at every prompt position; 0 = off
    topk_sample_logprobs: int = 0  # k most likely tokens at every sampled position; 0 = off
    # target_prompt_logprobs: the request tensor [R, K] (R = P - 1; row i scores prompt[i + 1])
    # as its stored values, so a sparse request stays sparse: dense -> all R*K ids row-major,
    # CSR -> the listed ids with `target_csr` = (crow int64 [R + 1], col int64 [C]). -1 = no id.
    target_ids: np.ndarray | None = None  # int64 [C]
    target_shape: tuple[int, ...] = ()  # the dense shape [R, K]
    target_csr: tuple[np.ndarray, np.ndarray] | None = None
    prompt_alt_tokens_k: int = 0  # draws at every prompt position after the first; 0 = off
    images: tuple[ImageIn, ...] = ()  # image chunks of the prompt, in order of position


@dataclass
class SampledSeq:
    tokens: np.ndarray  # int32 [T], stop token / stop-string tokens included
    logprobs: np.ndarray  # float32 [T], log p(token) under the model at temperature 1
    stop_reason: StopReason
    # topk_sample_logprobs: the k most likely tokens at each step, by descending logprob
    topk_ids: np.ndarray | None = None  # int32 [T, k]
    topk_logprobs: np.ndarray | None = None  # float32 [T, k], temperature-1 logprobs


@dataclass
class SampleOut:
    sequences: list[SampledSeq]
    prompt_logprobs: np.ndarray | None = None  # float32 [P], NaN where not scored (always pos 0)
    # topk_prompt_logprobs: row p = the k most likely tokens at prompt position p; rows not
    # scored (position 0, and before prompt_logprobs_last_n) hold the SDK's (0, -99999.0)
    topk_prompt_ids: np.ndarray | None = None  # int32 [P, k]
    topk_prompt_logprobs: np.ndarray | None = None  # float32 [P, k]
    # target_prompt_logprobs in the request's layout (SampleSpec.target_*): float32 values
    # [C] in the order of SampleSpec.target_ids, 0.0 where the id was -1
    target_logprobs: np.ndarray | None = None
    target_shape: tuple[int, ...] = ()
    target_csr: tuple[np.ndarray, np.ndarray] | None = None
    # prompt_alt_tokens: row i = k draws for prompt position i + 1, with raw logprobs
    alt_tokens: np.ndarray | None = None  # int64 [P - 1, k]
    alt_logprobs: np.ndarray | None = None  # float32 [P - 1, k]


@dataclass
class FwdBwdOut:
    """Per-datum loss outputs (e.g. {"logprobs": f32 [N]}) and `name:reduction` metrics."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]
