"""Sampling requests to a vLLM server and back: SampleSpec -> a `/v1/completions` body, and
its JSON answer -> SampleOut, with the semantics the native sampler (engine/sampler.py) has.

What maps, field by field:
- the prompt goes as token ids (no tokenizer on the way), `n` = num_samples; a greedy
  request (temperature 0) is sent once with n = 1 (vLLM refuses n > 1 when greedy) and its
  one sequence repeated, which is what greedy rows are;
- stops: `ignore_eos` always, and the request's own `stop_token_ids` and `stop` strings, so
  "no stop" really means none, as in Tinsmith; vLLM keeps the tokens that completed a stop
  string in `token_ids` (only its text is cut), which is Tinsmith's rule too;
- logprobs: `logprobs=k` (0 = the sampled token's only), vLLM's default `raw_logprobs` mode,
  i.e. temperature 1 without top-k/top-p, as Tinsmith reports them; tokens come back as
  `token_id:N` strings (`return_tokens_as_token_ids`), never as text;
- prompt logprobs: `prompt_logprobs=k`; each position's dict holds the prompt token (with
  its rank) and the k most likely; `prompt_logprobs_last_n` only masks what is returned;
- `seed` as vLLM's per-request seed (reproducible on one vLLM server, not equal to the
  native sampler's draws), `max_tokens=0` as one token that is dropped.
What vLLM cannot give is refused with a UserError (HTTP 400) naming it (`refusal`).

Shapes: P = prompt length, T = tokens of a sequence, k = a top-k width.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tinsmith.engine.prompt_scoring import MASK_LOGPROB, MASK_TOKEN, suffix_len
from tinsmith.types import SampledSeq, SampleOut, SampleSpec, UserError

_TOKEN_PREFIX = "token_id:"


def refusal(spec: SampleSpec, max_logprobs: int) -> str | None:
    """Why vLLM cannot serve `spec` as Tinsmith would, or None when it can."""
    if spec.images:
        return "image prompts are not served by --sampler vllm (use the native sampler)"
    if spec.target_ids is not None:
        return "target_prompt_logprobs is not available with --sampler vllm (vLLM scores only " \
               "the prompt's own tokens and its top k)"
    if spec.prompt_alt_tokens_k > 0:
        return "prompt_alt_tokens is not available with --sampler vllm"
    for name, k in (("topk_sample_logprobs", spec.topk_sample_logprobs),
                    ("topk_prompt_logprobs", spec.topk_prompt_logprobs)):
        if k > max_logprobs:
            return (f"{name}={k} exceeds what this vLLM sampler returns ({max_logprobs}; "
                    "raise it with --vllm-max-logprobs)")
    return None


def completion_body(model: str, spec: SampleSpec) -> dict[str, Any]:
    """The `/v1/completions` JSON for one sampling request under served model `model`."""
    greedy = spec.temperature == 0
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in np.asarray(spec.prompt).tolist()],
        "n": 1 if greedy else spec.num_samples,
        "max_tokens": max(spec.max_tokens, 1),
        "temperature": float(spec.temperature),
        "top_p": float(spec.top_p),
        "top_k": int(spec.top_k) if spec.top_k > 0 else -1,
        "ignore_eos": True,  # Tinsmith stops only where the request says (api adds the EOS)
        "stop_token_ids": [int(t) for t in spec.stop_tokens],
        "stop": list(spec.stop_strings),
        "skip_special_tokens": False,  # stop strings match text with special tokens, as natively
        "logprobs": int(spec.topk_sample_logprobs),
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
    }
    if spec.seed is not None:
        body["seed"] = int(spec.seed)
    if spec.prompt_logprobs or spec.topk_prompt_logprobs > 0:
        body["prompt_logprobs"] = int(spec.topk_prompt_logprobs)
    return body


def _token_id(key: str) -> int:
    return int(key.removeprefix(_TOKEN_PREFIX))


def _sequence(choice: dict[str, Any], spec: SampleSpec) -> SampledSeq:
    if spec.max_tokens == 0:  # one token was drawn because vLLM needs one; none was asked
        return _seq([], [], "length", [], spec.topk_sample_logprobs)
    tokens = [int(t) for t in choice["token_ids"]]
    lp = choice.get("logprobs") or {}
    logprobs = [float(x) for x in lp.get("token_logprobs") or []]
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(tokens)} tokens but {len(logprobs)} logprobs")
    reason = "stop" if choice.get("finish_reason") == "stop" else "length"
    k = spec.topk_sample_logprobs
    tops: list[list[tuple[int, float]]] = []
    if k > 0:
        # Each step's dict holds the k most likely and the sampled token: keeping the k
        # highest gives the top k whether or not the sampled token is among them.
        for step in lp.get("top_logprobs") or []:
            ranked = sorted(((_token_id(t), float(v)) for t, v in (step or {}).items()),
                            key=lambda iv: -iv[1])
            tops.append(ranked[:k])
    return _seq(tokens, logprobs, reason, tops, k)


def _seq(tokens: list[int], logprobs: list[float], reason: str,
         tops: list[list[tuple[int, float]]], k: int) -> SampledSeq:
    seq = SampledSeq(np.asarray(tokens, np.int32), np.asarray(logprobs, np.float32), reason)  # type: ignore[arg-type]
    if k > 0:  # [T, k], padded with the SDK's mask cell if vLLM gave fewer than k
        ids = np.full((len(tops), k), MASK_TOKEN, np.int32)
        vals = np.full((len(tops), k), MASK_LOGPROB, np.float32)
        for t, row in enumerate(tops):
            for j, (i, v) in enumerate(row):
                ids[t, j], vals[t, j] = i, v
        seq.topk_ids, seq.topk_logprobs = ids, vals
    return seq


def _prompt_outputs(out: SampleOut, entries: list[Any], spec: SampleSpec) -> None:
    """Fill prompt_logprobs [P] and topk_prompt_* [P, k] from vLLM's per-position dicts
    (entry p: {token id: {logprob, rank}} for prompt position p, None at position 0)."""
    prompt = np.asarray(spec.prompt, np.int64)
    n = int(prompt.shape[0])
    if len(entries) != n:
        raise RuntimeError(f"vLLM returned {len(entries)} prompt logprobs for {n} prompt tokens")
    first = n - suffix_len(spec, n)  # first position scored
    k = spec.topk_prompt_logprobs
    if spec.prompt_logprobs:
        out.prompt_logprobs = np.full(n, np.nan, np.float32)
    if k > 0:
        out.topk_prompt_ids = np.full((n, k), MASK_TOKEN, np.int32)
        out.topk_prompt_logprobs = np.full((n, k), MASK_LOGPROB, np.float32)
    for p in range(max(first, 1), n):
        cells = {int(t): c for t, c in (entries[p] or {}).items()}
        if spec.prompt_logprobs:
            own = cells.get(int(prompt[p]))
            if own is None:
                raise RuntimeError(f"vLLM left out prompt token {p}'s logprob")
            out.prompt_logprobs[p] = float(own["logprob"])  # type: ignore[index]
        if k > 0:
            top = sorted(((c["rank"], i, float(c["logprob"])) for i, c in cells.items()
                          if c.get("rank") is not None and c["rank"] <= k))
            for j, (_, i, v) in enumerate(top[:k]):
                out.topk_prompt_ids[p, j] = i  # type: ignore[index]
                out.topk_prompt_logprobs[p, j] = v  # type: ignore[index]


def sample_out(response: dict[str, Any], spec: SampleSpec) -> SampleOut:
    """The SampleOut of a `/v1/completions` answer to `completion_body(_, spec)`."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        raise RuntimeError("vLLM returned no choices")
    seqs = [_sequence(c, spec) for c in choices]
    if spec.temperature == 0:  # sent once: every greedy row is the same sequence
        seqs = [seqs[0]] + [_copy(seqs[0]) for _ in range(spec.num_samples - 1)]
    if len(seqs) != spec.num_samples:
        raise RuntimeError(f"vLLM returned {len(seqs)} samples for {spec.num_samples}")
    out = SampleOut(sequences=seqs)
    if spec.prompt_logprobs or spec.topk_prompt_logprobs > 0:
        _prompt_outputs(out, choices[0].get("prompt_logprobs") or [], spec)
    return out


def _copy(seq: SampledSeq) -> SampledSeq:
    return SampledSeq(seq.tokens.copy(), seq.logprobs.copy(), seq.stop_reason,
                      None if seq.topk_ids is None else seq.topk_ids.copy(),
                      None if seq.topk_logprobs is None else seq.topk_logprobs.copy())


def error_of(status: int, text: str) -> Exception:
    """A vLLM error answer as an exception: its 4xx (a request it refuses) as UserError with
    its message, anything else as RuntimeError."""
    message = text
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    if 400 <= status < 500:
        return UserError(f"vLLM refused the request: {message}")
    return RuntimeError(f"vLLM answered {status}: {message}")

