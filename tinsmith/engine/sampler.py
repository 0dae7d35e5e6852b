"""Token sampling with a KV cache: one prompt, `num_samples` continuations, one adapter slot.

The prompt is prefilled once with batch 1; the cache is then repeated to one row per
sample and all rows decode in lock step (one token per forward pass). Every row has the
same length at every step, so no padding or attention mask is needed. Rows that stop are
dropped from the batch and from the cache, so finished samples cost nothing more.

Semantics follow the hosted Tinker service:
- tokens are drawn from softmax(logits / temperature) restricted by top-k and top-p
  (temperature 0 = greedy), from a generator seeded by `seed` when one is given;
- the logprob reported for a token is always log p(token) under the model's raw
  distribution (temperature 1, no top-k/top-p), i.e. what a training forward pass gives;
- a stop token, or a stop string appearing in the decoded generated text, ends a row and
  the tokens that produced it are kept (stop_reason "stop"); otherwise "length";
- `topk_sample_logprobs=k` adds, for every sampled token, the k most likely tokens of that
  step's raw distribution. Prompt-wide outputs (prompt logprobs, top-k, target ids and
  alternative tokens) come from the prefill; see prompt_scoring.

Shapes: P = prompt length, B = rows still decoding (<= num_samples), V = vocab size.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from tinsmith.engine.draw import draw
from tinsmith.engine.prompt_scoring import first_position, score_prompt
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.validation import check_sample
from tinsmith.types import SampledSeq, SampleOut, SampleSpec, StopReason

# Candidate counts tried before a full sort when only top-p is on (see Sampler._pick).
_NUCLEUS_GUESSES = (1024, 8192)


class _StopStringWatcher:
    """Incremental detokenizer for one row that reports when a stop string appears.

    Decoding all generated ids at every step is quadratic, so the text is built from
    small windows (the vLLM scheme): `ids[prefix:read]` is the last chunk already turned
    into text; decoding `ids[prefix:]` and cutting the prefix's text off gives the new
    text with the right context (leading spaces, multi-byte characters). A chunk whose
    text ends in U+FFFD is an incomplete UTF-8 character and waits for the next token.
    Only the new text plus the last `max_len - 1` old characters can hold a new match.
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stop_strings
        self.overlap = max(len(s) for s in stop_strings) - 1
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""

    def push(self, token: int) -> bool:
        """Add one generated token; True when the text now contains a stop string."""
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        full = self.tokenizer.decode(self.ids[self.prefix :])
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return False
        new = full[len(done) :]
        tail = self.text[max(0, len(self.text) - self.overlap) :] if self.overlap else ""
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        window = tail + new
        return any(s in window for s in self.stops)


class Sampler:
    """Samples continuations from a runner's base model under one adapter slot."""

    def __init__(self, runner: ModelRunner, tokenizer) -> None:
        self.runner = runner
        self.tokenizer = tokenizer

    # ----- validation -----------------------------------------------------------------
    def _check(self, spec: SampleSpec) -> torch.Tensor:
        """The prompt as a tensor, after the same checks the scheduler runs at submission."""
        check_sample(spec, self.runner.vocab_size, self.runner.max_context)
        return torch.as_tensor(np.asarray(spec.prompt), dtype=torch.long).reshape(-1)

    # ----- one decoding step ----------------------------------------------------------
    @classmethod
    def _pick(
        cls, logits: torch.Tensor, spec: SampleSpec, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row from fp32 logits [B, V]: (tokens [B], raw logprobs [B], and
        log_z [B] = logsumexp of each row, for other raw logprobs of the same step)."""
        if spec.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            scaled = logits / spec.temperature
            vocab = scaled.shape[-1]
            # `probs` [B, C] are the weights of the candidates `cand` [B, C] (sorted by
            # descending probability), or of the whole vocabulary when cand is None.
            cand: torch.Tensor | None = None
            if 0 < spec.top_k < vocab:
                vals, cand = scaled.topk(spec.top_k, dim=-1)
                probs = vals.softmax(dim=-1)  # renormalised over the top k, as HF and vLLM do
            elif spec.top_p < 1.0:
                full = scaled.softmax(dim=-1)
                # A full CPU sort of the vocabulary is slow (~10 ms for 4 x 49152); the nucleus
                # usually lies within the top few thousand, so sort everything only when the
                # top k candidates of some row hold less than top_p of its mass.
                for k in _NUCLEUS_GUESSES:
                    if k < vocab:
                        probs, cand = full.topk(k, dim=-1)
                        if bool((probs.cumsum(dim=-1)[:, -1] >= spec.top_p).all()):
                            break
                else:
                    probs, cand = full.sort(dim=-1, descending=True)
            else:
                probs = scaled.softmax(dim=-1)
            if spec.top_p < 1.0:
                # Drop a candidate once the mass strictly before it reaches top_p; the most
                # likely candidate always survives.
                before = probs.cumsum(dim=-1) - probs
                probs = probs.masked_fill(before >= spec.top_p, 0.0)
            idx = draw(probs, gen)[:, 0]
            tokens = idx if cand is None else cand.gather(-1, idx[:, None])[:, 0]
        # Raw (temperature 1) logprob of the chosen token, without a [B, V] log_softmax.
        log_z = torch.logsumexp(logits, dim=-1)
        return tokens, logits.gather(-1, tokens[:, None])[:, 0] - log_z, log_z

    # ----- the request ----------------------------------------------------------------
    def sample(self, slot: int | None, spec: SampleSpec) -> SampleOut:
        prompt = self._check(spec)
        n_prompt = int(prompt.shape[0])
        n = spec.num_samples
        model, ctx = self.runner.model, self.runner.ctx

        gen = torch.Generator()
        if spec.seed is not None:
            gen.manual_seed(int(spec.seed))
        else:
            gen.seed()  # fresh non-deterministic seed

        # Prefill needs logits only at the last position, unless a prompt-wide output is
        # asked for: then from the first position it needs (position i-1 scores prompt[i]).
        start = first_position(spec, n_prompt)
        k_top = spec.topk_sample_logprobs

        with torch.inference_mode():
            cache = DynamicCache(config=self.runner.config)
            with ctx.rows([(slot, 1)]):
                out = model(
                    input_ids=prompt[None],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=n_prompt - start,
                )
            logits = out.logits[0].float()  # [P - start, V]
            result = score_prompt(logits, prompt, start, spec)  # no sequences yet
            last = logits[-1:].clone()  # [1, V]; lets the prompt-wide logits go
            del out, logits

            if spec.max_tokens <= 0:
                result.sequences = [self._seq([], [], "length", [], k_top) for _ in range(n)]
                return result

            toks: list[list[int]] = [[] for _ in range(n)]
            lps: list[list[float]] = [[] for _ in range(n)]
            # topk_sample_logprobs: per sample, one ([k] ids, [k] logprobs) pair per step
            tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
            reasons: list[StopReason] = ["length"] * n
            stop_tokens = set(spec.stop_tokens)
            watchers = (
                [_StopStringWatcher(self.tokenizer, spec.stop_strings) for _ in range(n)]
                if spec.stop_strings
                else None
            )

            # Invariant: batch row b of `next_logits` is sample active[b], and so is cache row
            # b from step 1 on; at step 0 the cache still holds the single prefill row.
            active = list(range(n))
            next_logits = last.expand(n, -1)  # [B, V]; step 0 is the same for all rows
            for step in range(spec.max_tokens):
                tokens, logprobs, log_z = self._pick(next_logits, spec, gen)
                if k_top > 0:
                    rows = slice(None) if step else slice(0, 1)
                    top_lp, top_ids = self._topk(next_logits[rows], log_z[rows], k_top)
                keep_rows: list[int] = []
                for b, (t, lp_) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
                    i = active[b]
                    toks[i].append(t)
                    lps[i].append(lp_)
                    if k_top > 0:  # step 0: every row shares the prefill's last logits
                        tops[i].append((top_ids[b if step else 0], top_lp[b if step else 0]))
                    if t in stop_tokens or (watchers is not None and watchers[i].push(t)):
                        reasons[i] = "stop"
                    else:
                        keep_rows.append(b)
                if not keep_rows or step == spec.max_tokens - 1:
                    break
                if step == 0 or len(keep_rows) < len(active):  # drop finished rows
                    index = torch.tensor(keep_rows, dtype=torch.long)
                    tokens = tokens[index]
                    active = [active[b] for b in keep_rows]
                    if step > 0:
                        cache.batch_select_indices(index)
                    elif len(active) > 1:  # one copy of the prompt's KV per live row
                        cache.batch_repeat_interleave(len(active))
                with ctx.rows([(slot, len(active))]):
                    out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
                next_logits = out.logits[:, -1].float()  # [B, V]

        result.sequences = [self._seq(toks[i], lps[i], reasons[i], tops[i], k_top) for i in range(n)]
        return result

    @staticmethod
    def _topk(logits: torch.Tensor, log_z: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most likely tokens per row of fp32 logits [B, V] whose logsumexp is log_z [B],
        most likely first: (raw logprobs float32 [B, k], ids int32 [B, k])."""
        vals, ids = logits.topk(k, dim=-1)
        lp = vals - log_z[:, None]
        return lp.numpy().astype(np.float32), ids.numpy().astype(np.int32)

    @staticmethod
    def _seq(
        tokens: list[int], logprobs: list[float], reason: StopReason,
        tops: list[tuple[np.ndarray, np.ndarray]], k: int,
    ) -> SampledSeq:
        seq = SampledSeq(np.asarray(tokens, np.int32), np.asarray(logprobs, np.float32), reason)
        if k > 0:  # [T, k] each, one row per sampled token
            seq.topk_ids = np.stack([t for t, _ in tops]) if tops else np.zeros((0, k), np.int32)
            seq.topk_logprobs = (
                np.stack([lp for _, lp in tops]) if tops else np.zeros((0, k), np.float32)
            )
        return seq
