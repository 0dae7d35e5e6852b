"""Checks of training inputs against a model and a loss, before anything is queued.

Pure NumPy, except images: the scheduler calls this at submission so that a bad request is
answered at once with an HTTP 400 naming the problem, and never reaches the engine. Image
chunks are decoded and counted here by the model's `vision.Vision` (None: a text-only model,
which refuses them); lengths are then those of the model input, images expanded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from tinsmith.engine.losses import LossSpec
from tinsmith.engine.moe_routing import AUX_COEF, ENGINE_CONFIG
from tinsmith.engine.vision import Vision
from tinsmith.types import DatumIn, ImageIn, SampleSpec, UserError


def check_config(spec: LossSpec, loss_fn: str, config: Mapping[str, object]) -> None:
    # ENGINE_CONFIG keys (e.g. moe_aux_loss_coef) are accepted by every loss: the engine reads them.
    unknown = sorted(set(config) - set(spec.config) - set(ENGINE_CONFIG))
    if unknown:
        allowed = ", ".join(sorted(spec.config)) or "none"
        raise UserError(
            f"unknown loss_fn_config key(s) {unknown} for loss {loss_fn!r} (accepted: {allowed})"
        )
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
    if float(config.get(AUX_COEF, 0.0)) < 0:  # type: ignore[arg-type]
        raise UserError(f"loss_fn_config[{AUX_COEF!r}] must be >= 0")
    if spec.check_config is not None:
        own = {k: v for k, v in config.items() if k not in ENGINE_CONFIG}
        spec.check_config({**spec.config, **own})  # type: ignore[dict-item]


MAX_NUM_SAMPLES = 256


def check_tokens(tokens: np.ndarray, vocab_size: int, max_context: int, where: str) -> None:
    if tokens.ndim != 1 or tokens.shape[0] == 0:
        raise UserError(f"{where}: the input is empty (at least one token is needed)")
    if tokens.shape[0] > max_context:
        raise UserError(
            f"{where}: sequence of {tokens.shape[0]} tokens exceeds the model's context "
            f"length of {max_context}"
        )
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"{where}: token id {int(tokens[i])} at position {i} is outside the vocabulary "
            f"[0, {vocab_size})"
        )


def model_tokens(
    tokens: np.ndarray, images: Sequence[ImageIn], vision: Vision | None, where: str
) -> np.ndarray:
    """The token ids [N] the model sees: images expanded into image tokens (and decoded, so a
    bad image fails here); UserError for images sent to a text-only model."""
    if not images:
        return tokens if vision is None else vision.expand(tokens, (), where)[0]
    if vision is None:
        raise UserError(f"{where}: image inputs are not supported by this model: it is "
                        "text-only (serve a vision-language model such as Qwen3-VL)")
    return vision.expand(tokens, images, where)[0]


def check_data(
    data: Sequence[DatumIn], loss_fn: str, spec: LossSpec, config: Mapping[str, object],
    vocab_size: int, max_context: int, vision: Vision | None = None,
) -> None:
    """Raise UserError naming the first problem in `data` for this loss and model."""
    check_config(spec, loss_fn, config)
    if not data:
        raise UserError("no data: forward_backward needs at least one datum")
    if spec.paired and len(data) % 2:
        raise UserError(
            f"loss {loss_fn!r} takes (chosen, rejected) pairs as consecutive datums, but this "
            f"request has an odd number of datums ({len(data)}); note that the SDK splits a call "
            "of over 5 MB or 1024 datums into several requests, so keep each call below that"
        )
    # Inputs the loss does not take are ignored (the engine drops them), as clients may
    # reuse one datum for several losses; those it takes are checked.
    accepted = {"target_tokens", *spec.required_inputs, *spec.optional_inputs}
    for i, d in enumerate(data):
        where = f"datum {i}"
        tokens = model_tokens(d.tokens, d.images, vision, where)
        check_tokens(tokens, vocab_size, max_context, where)
        n = tokens.shape[0]
        targets = d.inputs.get("target_tokens")
        if targets is None:
            raise UserError(f"{where}: loss {loss_fn!r} needs loss_fn_inputs['target_tokens']")
        if targets.ndim not in (1, 2) or (targets.ndim == 2 and not spec.allow_2d_targets):
            raise UserError(f"{where}: target_tokens has shape {list(targets.shape)}; expected [{n}]")
        if targets.shape[0] != n:
            raise UserError(
                f"{where}: target_tokens has {targets.shape[0]} entries but the model input has "
                f"{n} tokens (they must be equal: position i predicts target_tokens[i])"
            )
        bad = (targets < 0) | (targets >= vocab_size)
        if bad.any():
            raise UserError(
                f"{where}: target token id {int(targets[bad][0])} is outside the vocabulary [0, {vocab_size})"
            )
        for key in spec.optional_inputs:
            if (key in d.inputs) != (key in data[0].inputs):
                raise UserError(
                    f"{where}: loss_fn_inputs[{key!r}] must be given on every datum of a request "
                    "or on none"
                )
        for key in spec.required_inputs:
            if key not in d.inputs:
                raise UserError(f"{where}: loss {loss_fn!r} needs loss_fn_inputs[{key!r}]")
        for key in sorted((set(d.inputs) & accepted) - {"target_tokens"}):
            arr = d.inputs[key]
            if arr.shape != targets.shape:
                raise UserError(
                    f"{where}: {key} has shape {list(arr.shape)} but target_tokens has shape "
                    f"{list(targets.shape)}"
                )
            if not np.isfinite(arr).all():
                raise UserError(f"{where}: {key} contains a non-finite value (NaN or inf)")


# Widest top-k / draw count a sampling request may ask for, and the most cells (positions x
# width) one of its per-position outputs may hold: 4M cells is ~32 MB of ids + logprobs.
MAX_TOPK = 1000
MAX_OUTPUT_CELLS = 1 << 22


def check_sample(
    spec: SampleSpec, vocab_size: int, max_context: int, vision: Vision | None = None
) -> None:
    """Raise UserError naming the first problem of a sampling request for this model."""
    prompt = model_tokens(spec.prompt, spec.images, vision, "prompt")
    check_tokens(prompt, vocab_size, max_context, "prompt")
    n_prompt = int(prompt.shape[0])
    if not 1 <= spec.num_samples <= MAX_NUM_SAMPLES:
        raise UserError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, got {spec.num_samples}")
    if spec.max_tokens < 0:
        raise UserError(f"max_tokens must be >= 0, got {spec.max_tokens}")
    if n_prompt + spec.max_tokens > max_context:
        raise UserError(
            f"prompt length ({n_prompt}) + max_tokens ({spec.max_tokens}) exceeds the "
            f"model's context length of {max_context} tokens"
        )
    if not (spec.temperature >= 0 and np.isfinite(spec.temperature)):
        raise UserError(f"temperature must be a finite number >= 0, got {spec.temperature}")
    if not 0.0 < spec.top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {spec.top_p}")
    if spec.top_k < -1:
        raise UserError(f"top_k must be -1 (off), 0 (off) or positive, got {spec.top_k}")
    if any(s == "" for s in spec.stop_strings):
        raise UserError("sampling_params.stop contains an empty string")
    # Per-position extras: (field, k, most k allowed, cells of its output).
    extras = (
        ("topk_prompt_logprobs", spec.topk_prompt_logprobs, min(MAX_TOPK, vocab_size), n_prompt),
        ("topk_sample_logprobs", spec.topk_sample_logprobs, min(MAX_TOPK, vocab_size),
         spec.num_samples * spec.max_tokens),
        ("prompt_alt_tokens_k", spec.prompt_alt_tokens_k, MAX_TOPK, n_prompt - 1),  # with replacement
    )
    for name, k, limit, rows in extras:
        if not 0 <= k <= limit:
            raise UserError(f"{name} must be between 0 and {limit}, got {k}")
        if k * rows > MAX_OUTPUT_CELLS:
            raise UserError(
                f"{name}={k} asks for {k * rows} values ({rows} positions x {k}); the limit is "
                f"{MAX_OUTPUT_CELLS}"
            )
    if spec.target_ids is not None:
        _check_target_ids(spec, vocab_size, n_prompt)


def _check_target_ids(spec: SampleSpec, vocab_size: int, n_prompt: int) -> None:
    """target_prompt_logprobs: an int64 [len(prompt) - 1, K] tensor, dense or CSR, of ids or -1."""
    where = "target_prompt_logprobs"
    ids = np.asarray(spec.target_ids).reshape(-1)  # [C]
    shape = tuple(int(s) for s in spec.target_shape)
    if len(shape) != 2 or min(shape) < 0:
        raise UserError(f"{where} must be 2-D, [len(prompt) - 1, K], got shape {list(shape)}")
    rows, width = shape
    if rows != n_prompt - 1:
        raise UserError(
            f"{where} has {rows} rows but the prompt has {n_prompt} tokens: it needs "
            f"len(prompt) - 1 = {n_prompt - 1} rows (row i scores prompt position i + 1)"
        )
    if spec.target_csr is None:
        if ids.size != rows * width:
            raise UserError(f"{where}: {ids.size} values do not fill shape {list(shape)}")
    else:
        crow, col = (np.asarray(a).reshape(-1) for a in spec.target_csr)
        if (len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != ids.size or col.size != ids.size
                or (np.diff(crow) < 0).any()):
            raise UserError(f"{where}: malformed sparse CSR tensor for shape {list(shape)}")
        if col.size and (col.min() < 0 or col.max() >= width):
            raise UserError(f"{where}: sparse CSR column index out of range for shape {list(shape)}")
    bad = (ids < -1) | (ids >= vocab_size)
    if bad.any():
        raise UserError(
            f"{where}: token id {int(ids[bad][0])} is outside the vocabulary [0, {vocab_size}) "
            "(use -1 for cells that request nothing)"
        )
    distinct = np.unique(ids[ids >= 0]).size
    if distinct == 0:
        raise UserError(f"{where} names no token id (every cell is -1)")
    if n_prompt * distinct > MAX_OUTPUT_CELLS:
        raise UserError(
            f"{where} asks for {distinct} distinct ids over {n_prompt} prompt tokens; "
            f"len(prompt) * distinct ids is limited to {MAX_OUTPUT_CELLS}"
        )
