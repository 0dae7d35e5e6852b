"""Checks of training inputs against a model and a loss, before anything is queued.

Pure NumPy: the scheduler calls this at submission so that a bad request is answered at
once with an HTTP 400 naming the problem, and never reaches the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tinsmith.engine.losses import LOSSES
from tinsmith.types import DatumIn, SampleSpec, UserError


def check_loss(loss_fn: str, config: Mapping[str, object]) -> None:
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise UserError(f"unknown loss function {loss_fn!r}; available: {', '.join(sorted(LOSSES))}")
    unknown = sorted(set(config) - set(spec.config_keys))
    if unknown:
        allowed = ", ".join(spec.config_keys) or "none"
        raise UserError(
            f"unknown loss_fn_config key(s) {unknown} for loss {loss_fn!r} (accepted: {allowed})"
        )


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


def check_data(
    data: Sequence[DatumIn], loss_fn: str, config: Mapping[str, object], vocab_size: int, max_context: int
) -> None:
    """Raise UserError naming the first problem in `data` for this loss and model."""
    check_loss(loss_fn, config)
    spec = LOSSES[loss_fn]
    if not data:
        raise UserError("no data: forward_backward needs at least one datum")
    for i, d in enumerate(data):
        where = f"datum {i}"
        check_tokens(d.tokens, vocab_size, max_context, where)
        n = d.tokens.shape[0]
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
        for key in spec.required_inputs:
            arr = d.inputs.get(key)
            if arr is None:
                raise UserError(f"{where}: loss {loss_fn!r} needs loss_fn_inputs[{key!r}]")
            if arr.shape != targets.shape:
                raise UserError(
                    f"{where}: {key} has shape {list(arr.shape)} but target_tokens has shape "
                    f"{list(targets.shape)}"
                )
            if not np.isfinite(arr).all():
                raise UserError(f"{where}: {key} contains a non-finite value (NaN or inf)")


def check_sample(spec: SampleSpec, vocab_size: int, max_context: int) -> None:
    """Raise UserError naming the first problem of a sampling request for this model."""
    check_tokens(spec.prompt, vocab_size, max_context, "prompt")
    n_prompt = int(spec.prompt.shape[0])
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
