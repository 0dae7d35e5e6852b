"""Prompt-wide outputs of a sampling request, all read from the one prefill that serves it.

A sampling request can ask, besides its samples, for things about the prompt itself:
- `prompt_logprobs`: log p(prompt[t] | prompt[:t]) for every t >= 1;
- `topk_prompt_logprobs=k`: the k most likely tokens at every prompt position;
- `target_prompt_logprobs`: log p of chosen ids at chosen positions;
- `prompt_alt_tokens_k=k`: k draws, with replacement and at the request's temperature, from
  the next-token distribution at every prompt position after the first.
`prompt_logprobs_last_n` limits the first two to the last N prompt tokens.

Every logprob is the model's raw one (temperature 1, no top-k/top-p). The prefill keeps logits
only from the first position any of them needs (`first_position`), so a request that asks for
nothing extra still computes logits at the last position alone; the positions that are kept
share one logsumexp, and logprobs are read as logit - logsumexp, never from a [P, V] log_softmax.

Alignment: logits at prompt position j predict prompt[j + 1], so "row i" of the SDK's
[P - 1, K] tensors (target_prompt_logprobs, prompt_alt_tokens) is position i, while the
[P]-long outputs (prompt_logprobs, topk_prompt_logprobs) put it at index i + 1.

Temperature 0 alternatives are the argmax, repeated k times. The draws come from their own
generator (seeded from the request's seed), so asking for them leaves the samples unchanged.

Shapes: P = prompt length, V = vocab size, S = first scored position, L = P - S kept logits.
"""

from __future__ import annotations

import numpy as np
import torch

from tinsmith.engine.draw import draw
from tinsmith.types import SampleOut, SampleSpec

# The SDK's "no entry" cell of a TopkLogprobs matrix (tinker.types.topk_logprobs).
MASK_TOKEN, MASK_LOGPROB = 0, -99999.0
# Offset between a request's seed and its alternative-token generator's seed (< 2**64).
_ALT_SEED_OFFSET = 0x9E3779B97F4A7C15
# Rows of fp64 CDFs built at once when drawing alternatives: [rows, V] <= 4M doubles.
_DRAW_CELLS = 1 << 22


def suffix_len(spec: SampleSpec, n_prompt: int) -> int:
    """How many trailing prompt tokens prompt_logprobs and topk_prompt_logprobs score."""
    if spec.prompt_logprobs_last_n is None:
        return n_prompt - 1
    return max(0, min(int(spec.prompt_logprobs_last_n), n_prompt - 1))


def target_cells(spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """(row [C], id [C]) of each stored cell of target_prompt_logprobs, in storage order."""
    ids = np.asarray(spec.target_ids, dtype=np.int64).reshape(-1)
    n_rows, width = (int(s) for s in spec.target_shape)
    if spec.target_csr is None:
        rows = np.repeat(np.arange(n_rows), width)
    else:
        rows = np.repeat(np.arange(n_rows), np.diff(np.asarray(spec.target_csr[0], np.int64)))
    return rows, ids


def first_position(spec: SampleSpec, n_prompt: int) -> int:
    """The first prompt position whose logits the request needs (P - 1: only the last)."""
    start = n_prompt - 1
    if spec.prompt_logprobs or spec.topk_prompt_logprobs > 0:
        start -= suffix_len(spec, n_prompt)
    if spec.prompt_alt_tokens_k > 0:
        start = 0
    if spec.target_ids is not None:
        rows, ids = target_cells(spec)
        asked = rows[ids >= 0]
        if asked.size:  # rows before the first one naming an id are not scored
            start = min(start, int(asked.min()))
    return start


def _alt_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed((int(seed) + _ALT_SEED_OFFSET) % (1 << 64))
    return gen


def _draw_alternatives(scored: torch.Tensor, k: int, temperature: float, seed: int | None) -> torch.Tensor:
    """k draws with replacement per row of logits [R, V] from softmax(logits / T): ids [R, k]."""
    if temperature == 0:
        return scored.argmax(dim=-1, keepdim=True).expand(-1, k).contiguous()
    gen = _alt_generator(seed)
    out = torch.empty(scored.shape[0], k, dtype=torch.long)
    step = max(1, _DRAW_CELLS // scored.shape[1])
    for a in range(0, scored.shape[0], step):
        probs = (scored[a : a + step] / temperature).softmax(dim=-1)
        out[a : a + step] = draw(probs, gen, k)
    return out


def score_prompt(logits: torch.Tensor, prompt: torch.Tensor, start: int, spec: SampleSpec) -> SampleOut:
    """Every prompt-wide output `spec` asks for, from prefill logits [L, V] of positions
    start..P-1 (L = P - start); returns a SampleOut without sequences."""
    n_prompt = int(prompt.shape[0])
    out = SampleOut(sequences=[])
    scored = logits[:-1]  # [L - 1, V]: row r = position start + r, predicting prompt[start + r + 1]
    log_z = torch.logsumexp(scored, dim=-1)  # [L - 1], shared by every output below
    last_n = suffix_len(spec, n_prompt)
    first = n_prompt - 1 - last_n  # first position scored for prompt_logprobs and top-k
    if spec.prompt_logprobs:
        out.prompt_logprobs = np.full(n_prompt, np.nan, dtype=np.float32)
        if last_n > 0:
            rows = slice(first - start, None)
            targets = prompt[first + 1 :, None]
            lp = scored[rows].gather(-1, targets)[:, 0] - log_z[rows]
            out.prompt_logprobs[first + 1 :] = lp.numpy()
    k = spec.topk_prompt_logprobs
    if k > 0:
        out.topk_prompt_ids = np.full((n_prompt, k), MASK_TOKEN, dtype=np.int32)
        out.topk_prompt_logprobs = np.full((n_prompt, k), MASK_LOGPROB, dtype=np.float32)
        if last_n > 0:
            rows = slice(first - start, None)
            vals, ids = scored[rows].topk(k, dim=-1)  # sorted, most likely first
            out.topk_prompt_ids[first + 1 :] = ids.numpy()
            out.topk_prompt_logprobs[first + 1 :] = (vals - log_z[rows, None]).numpy()
    if spec.target_ids is not None:
        rows_np, ids_np = target_cells(spec)
        values = np.zeros(ids_np.shape[0], dtype=np.float32)  # [C]; 0.0 where the id is -1
        asked = np.flatnonzero(ids_np >= 0)
        if asked.size:
            r = torch.as_tensor(rows_np[asked] - start)  # >= 0: first_position covers them
            t = torch.as_tensor(ids_np[asked])
            values[asked] = (scored[r, t] - log_z[r]).numpy()
        out.target_logprobs = values if spec.target_csr is not None else values.reshape(spec.target_shape)
        out.target_shape, out.target_csr = tuple(spec.target_shape), spec.target_csr
    k = spec.prompt_alt_tokens_k
    if k > 0:  # first_position made start 0: scored covers rows 0..P-2
        alt = _draw_alternatives(scored, k, spec.temperature, spec.seed)  # [P - 1, k]
        out.alt_tokens = alt.numpy().astype(np.int64)
        out.alt_logprobs = (scored.gather(-1, alt) - log_z[:, None]).numpy().astype(np.float32)
    return out
