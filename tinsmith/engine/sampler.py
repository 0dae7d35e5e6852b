"""Token sampling with continuous batching: many requests, adapters and prompts decode
together, one token per row per step.

A request is admitted with its own prefill (batch 1, which also yields every prompt-wide
output; see prompt_scoring) and its first token, drawn for all `num_samples` rows from the
prefill's last logits. Its surviving rows then join the shared batch and advance one token
per `step()` together with every other live row, under their own adapter slots. The batch is
a `SlabBatch` (engine/slab_batch.py: a preallocated KV cache, each sample row getting a copy
of the one prefill's KV) unless `kv_cache="dynamic"` asks for the `DecodeBatch` of
engine/decode.py (Hugging Face DynamicCache rows, concatenated every step), which models
with sliding-window layers always use, one request at a time. With `cuda_graphs` on (by
default on CUDA) the slab's decoding step runs in static shapes and is replayed from CUDA
graphs (engine/graph_decode.py; on a CPU, "on" runs the same static step eagerly). A prompt longer than
`prefill_chunk` tokens is prefilled one chunk per `step()`, interleaved with the decoding
steps of the rows in flight, and joins the batch after its last chunk (docs/sampling.md). Rows that stop leave the batch at once, and a request whose rows have all
stopped completes through its `on_done` callback, so nobody waits for the longest sequence.
`sample()` is the synchronous form: admit one request and step until it is done.

Semantics follow the hosted Tinker service:
- tokens are drawn from softmax(logits / temperature) restricted by top-k and top-p
  (temperature 0 = greedy), from the request's own generator, seeded by `seed` when one is
  given; each request draws from its rows' logits only, in sample order, so its draws do
  not depend on what else is decoding;
- the logprob reported for a token is always log p(token) under the model's raw
  distribution (temperature 1, no top-k/top-p), i.e. what a training forward pass gives;
- a stop token, or a stop string appearing in the decoded generated text, ends a row and
  the tokens that produced it are kept (stop_reason "stop"); otherwise "length";
- `topk_sample_logprobs=k` adds, for every sampled token, the k most likely tokens of that
  step's raw distribution. Prompt-wide outputs (prompt logprobs, top-k, target ids and
  alternative tokens) come from the prefill; see prompt_scoring.
Batched with others, or prefilled in chunks, a request's logits differ from decoding alone
in one piece by float rounding only (decode.py, slab_batch.py). Tokens are drawn by the exponential race (draw.race), which such rounding can
only flip where the two best candidates are that close, so a seeded request returns the same
tokens alone or batched except on such near-ties (after one, the rest of that sequence
differs); bench/multi_tenant.py counts the sequences that differ.

Shapes: P = prompt length, B = rows of a request still decoding (<= num_samples), V = vocab.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from transformers import DynamicCache

from tinsmith.engine.decode import DecodeBatch, mergeable
from tinsmith.engine.draw import race
from tinsmith.engine.graph_decode import GraphDecoder, graphs_wanted
from tinsmith.engine.prompt_scoring import first_position, score_prompt
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.slab_batch import SlabBatch
from tinsmith.engine.validation import check_sample
from tinsmith.types import SampledSeq, SampleOut, SampleSpec, StopReason

# Sampler.kv_cache: the preallocated slab (kv_cache.py), or the DynamicCache batch (decode.py).
KV_CACHES = ("slab", "dynamic")

# Candidate counts tried before a full sort when only top-p is on (see Sampler._pick).
_NUCLEUS_GUESSES = (1024, 8192)

# Called once with the finished output, or with the exception that ended the request.
OnDone = Callable[[SampleOut | BaseException], None]

# One request's draw for a step: tokens [b], their raw logprobs, top-k ([b, k] logprobs, ids).
_Choice = tuple[torch.Tensor, list[float], tuple[np.ndarray, np.ndarray] | None]


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


class _Prefill:
    """A request being prefilled (in chunks when its prompt is long): its private cache and
    the fp32 logits [keep, V] of each chunk from the first position its outputs need."""

    def __init__(self, slot: int | None, spec: SampleSpec, on_done: OnDone, prompt: torch.Tensor,
                 gen: torch.Generator, cache: DynamicCache) -> None:
        self.slot, self.spec, self.on_done, self.prompt, self.gen = slot, spec, on_done, prompt, gen
        self.cache = cache  # [1, Hkv, done, D] per layer
        self.n_prompt = int(prompt.shape[0])
        self.start = first_position(spec, self.n_prompt)
        self.done = 0  # prompt tokens prefilled so far
        self.logits: list[torch.Tensor] = []
        self.rope_delta = 0  # an image prompt's RoPE delta (runner.prefill_inputs)


class _Request:
    """One sampling request in flight: its generator, what its samples drew so far, and which
    of them are still decoding (`live`, sample indices in batch-row order)."""

    def __init__(
        self, slot: int | None, spec: SampleSpec, gen: torch.Generator, result: SampleOut,
        on_done: OnDone, tokenizer,
    ) -> None:
        n = spec.num_samples
        self.slot, self.spec, self.gen, self.result, self.on_done = slot, spec, gen, result, on_done
        self.toks: list[list[int]] = [[] for _ in range(n)]
        self.lps: list[list[float]] = [[] for _ in range(n)]
        # topk_sample_logprobs: per sample, one ([k] ids, [k] logprobs) pair per step
        self.tops: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]
        self.reasons: list[StopReason] = ["length"] * n
        self.stop_tokens = set(spec.stop_tokens)
        self.watchers = (
            [_StopStringWatcher(tokenizer, spec.stop_strings) for _ in range(n)]
            if spec.stop_strings
            else None
        )
        self.live = list(range(n)) if spec.max_tokens > 0 else []
        self.steps = 0
        self.rope_delta = 0  # image prompts: see runner.rope_offsets

    @property
    def done(self) -> bool:
        return not self.live

    def take(
        self, tokens: list[int], logprobs: list[float],
        tops: tuple[np.ndarray, np.ndarray] | None, shared: bool,
    ) -> list[int]:
        """Record one drawn token per live sample; return the positions (in the old `live`)
        of the samples that go on. `tops` holds ([b, k] logprobs, [b, k] ids), or one row for
        all samples when `shared` (the first token, drawn from the prefill's logits)."""
        keep: list[int] = []
        for b, (t, lp) in enumerate(zip(tokens, logprobs)):
            i = self.live[b]
            self.toks[i].append(t)
            self.lps[i].append(lp)
            if tops is not None:
                r = 0 if shared else b
                self.tops[i].append((tops[1][r], tops[0][r]))
            if t in self.stop_tokens or (self.watchers is not None and self.watchers[i].push(t)):
                self.reasons[i] = "stop"
            else:
                keep.append(b)
        self.steps += 1
        if self.steps >= self.spec.max_tokens:
            keep = []
        self.live = [self.live[b] for b in keep]
        return keep

    def output(self) -> SampleOut:
        k = self.spec.topk_sample_logprobs
        self.result.sequences = [
            Sampler._seq(self.toks[i], self.lps[i], self.reasons[i], self.tops[i], k)
            for i in range(self.spec.num_samples)
        ]
        return self.result


class Sampler:
    """Continuous-batching sampler over a runner's base model and its adapter slots.

    Single-threaded: admit(), step() and sample() are called from the model's worker thread.
    """

    def __init__(
        self, runner: ModelRunner, tokenizer, *, kv_cache: str = "slab", prefill_chunk: int = 512,
        cuda_graphs: str = "auto", pick_threads: int | None = None,
    ) -> None:
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, not {kv_cache!r}")
        graphs = graphs_wanted(cuda_graphs, runner.device)  # ValueError for an unknown mode
        self.runner = runner
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill pass; <= 0: whole prompts
        self._live: list[_Request] = []  # in batch-row order: rows of one slot adjacent
        # Models whose cache rows cannot be merged (sliding-window layers) decode one request
        # at a time; the others wait here, not yet prefilled.
        self._shared = mergeable(DynamicCache(config=runner.config))
        # The preallocated slab (kv_cache.py) unless asked for the DynamicCache batch, which
        # the one-request-at-a-time models keep.
        slab = kv_cache == "slab" and self._shared
        # Static (graph) steps for the slab of a dense text model (graph_decode.supported).
        static = (GraphDecoder(runner, capture=runner.device.type == "cuda")
                  if slab and graphs and GraphDecoder.supported(runner) else None)
        self.batch: DecodeBatch | SlabBatch = SlabBatch(runner, static) if slab else DecodeBatch(runner)
        # Token choice runs on the host, per request (its own generator, a pass over V per
        # row): with a replayed GPU step it outweighs the step, so on CUDA the requests of a
        # step choose in parallel threads (results are the same: each request touches only
        # its own rows and generator). None: min(8, cores / 2) on CUDA, none on a CPU, where
        # the model's own ops use the cores.
        if pick_threads is None:
            pick_threads = min(8, (os.cpu_count() or 1) // 2) if runner.device.type == "cuda" else 0
        self._pool = ThreadPoolExecutor(pick_threads, "tinsmith-pick") if pick_threads > 1 else None
        self._waiting: deque[tuple[int | None, SampleSpec, OnDone]] = deque()
        self._prefilling: deque[_Prefill] = deque()  # long prompts, one chunk per step()

    @property
    def pending(self) -> bool:
        """True while some admitted request is still decoding (step() has work)."""
        return bool(self._live or self._waiting or self._prefilling)

    @property
    def live_rows(self) -> int:
        return self.batch.rows

    # ----- validation -----------------------------------------------------------------
    def _check(self, spec: SampleSpec) -> torch.Tensor:
        """The prompt as a tensor, after the same checks the scheduler runs at submission."""
        check_sample(spec, self.runner.vocab_size, self.runner.max_context, self.runner.vision)
        return self.runner.prompt_ids(spec)  # images expanded into image tokens (vision.py)

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
            # x / 1.0 == x exactly: skip that pass over [B, V] at temperature 1.
            scaled = logits if spec.temperature == 1.0 else logits / spec.temperature
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
            idx = race(probs, gen)
            tokens = idx if cand is None else cand.gather(-1, idx[:, None])[:, 0]
        # Raw (temperature 1) logprob of the chosen token, without a [B, V] log_softmax.
        log_z = torch.logsumexp(logits, dim=-1)
        return tokens, logits.gather(-1, tokens[:, None])[:, 0] - log_z, log_z

    # ----- requests -------------------------------------------------------------------
    def admit(self, slot: int | None, spec: SampleSpec, on_done: OnDone) -> None:
        """Prefill a request and draw its first token. It completes here (on_done called) when
        every sample stopped at once; otherwise its live rows join the batch. A prompt longer
        than `prefill_chunk` is prefilled one chunk here and one per later `step()`, between
        the batch's decoding steps, and joins when its last chunk is done. A bad request
        raises here and leaves the batch as it was."""
        if not self._shared and (self._live or self._prefilling):
            self._waiting.append((slot, spec, on_done))
            return
        prompt = self._check(spec)
        gen = torch.Generator()
        if spec.seed is not None:
            gen.manual_seed(int(spec.seed))
        else:
            gen.seed()  # fresh non-deterministic seed
        job = _Prefill(slot, spec, on_done, prompt, gen, DynamicCache(config=self.runner.config))
        with torch.inference_mode():
            self._prefill_chunk(job)
            if job.done < job.n_prompt:
                self._prefilling.append(job)
                return
            self._join(job)

    def _prefill_chunk(self, job: _Prefill) -> None:
        """Run the next chunk of a request's prefill (the whole prompt when it fits one chunk,
        or when chunking is off) into its private cache, keeping the logits it needs."""
        if job.slot is not None and not self.runner.attached(job.slot):
            raise RuntimeError(f"adapter slot {job.slot} was detached while prefilling")
        n, a = job.n_prompt, job.done
        chunked = self.prefill_chunk > 0 and not job.spec.images
        b = min(n, a + self.prefill_chunk) if chunked else n
        # Logits are kept from the first position any output needs (position i-1 scores
        # prompt[i]); a chunk before it keeps one (logits_to_keep=0 would mean all).
        keep = b - max(a, job.start)
        ids = job.prompt[None, a:b].to(self.runner.device)
        # The runner's attention (attention.py) has no mask function registered, so HF builds
        # no mask and SDPA's is_causal would align a later chunk's queries top-left: give it
        # the causal mask [1, 1, T, a + T] explicitly (True = attend; query i sits at a + i).
        mask = None
        if a > 0:
            mask = (torch.arange(b)[None, :] <= torch.arange(a, b)[:, None])[None, None].to(ids.device)
        # An image prompt (one chunk): its pixel features and RoPE positions (runner.py).
        extra, job.rope_delta = self.runner.prefill_inputs(job.spec, ids) if not chunked else ({}, 0)
        with self.runner.ctx.rows([(job.slot, 1)]):
            out = self.runner.model(
                input_ids=ids, attention_mask=mask, past_key_values=job.cache,
                use_cache=True, logits_to_keep=max(keep, 1), **extra,
            )
        if keep > 0:
            # Token choice runs on the host, with the request's own CPU generator, so a seed
            # draws the same tokens on every device; the logits cross once, here.
            job.logits.append(out.logits[0, -keep:].float().cpu())  # [keep, V]
        job.done = b

    def _join(self, job: _Prefill) -> None:
        """A fully prefilled request: its prompt-wide outputs, its first token for every
        sample, and its live rows into the batch (or its completion)."""
        spec, n_prompt = job.spec, job.n_prompt
        logits = job.logits[0] if len(job.logits) == 1 else torch.cat(job.logits)  # [P - start, V]
        job.logits = []
        result = score_prompt(logits, job.prompt, job.start, spec)  # no sequences yet
        last = logits[-1:].clone()  # [1, V]; lets the prompt-wide logits go
        del logits
        req = _Request(job.slot, spec, job.gen, result, job.on_done, self.tokenizer)
        req.rope_delta = job.rope_delta
        if req.live:  # the first token of every sample comes from the same logits
            kept, tokens = self._advance(req, last.expand(spec.num_samples, -1), shared=True)
        if req.done:
            job.on_done(req.output())
            return
        cache = job.cache
        if not isinstance(self.batch, SlabBatch) and len(kept) > 1:
            cache.batch_repeat_interleave(len(kept))  # one copy of the prompt's KV per live row
        # (SlabBatch copies the one prefilled row into each sample's slab row itself.)
        # Requests stay sorted by slot (base model last), so each slot's rows are adjacent.
        order = _slot_order(job.slot)
        at = next((i for i, r in enumerate(self._live) if _slot_order(r.slot) > order), len(self._live))
        row = sum(len(r.live) for r in self._live[:at])
        self.batch.join(cache, n_prompt, tokens, job.slot, row)
        self._live.insert(at, req)

    def _advance_prefill(self) -> None:
        """One chunk of the oldest request still prefilling; it joins the batch when done.
        A failure ends that request alone."""
        job = self._prefilling[0]
        try:
            with torch.inference_mode():
                self._prefill_chunk(job)
                if job.done < job.n_prompt:
                    return
                self._prefilling.popleft()
                self._join(job)
        except Exception as e:  # noqa: BLE001 - any failure ends this request, reported to it
            if self._prefilling and self._prefilling[0] is job:
                self._prefilling.popleft()
            job.on_done(e)

    def step(self) -> None:
        """One token for every live row; completes the requests whose rows all stopped. If
        the forward pass fails, every live request fails with it and the error is raised."""
        if self._prefilling:
            self._advance_prefill()
        if not self._live:
            self._admit_waiting()
            return
        with torch.inference_mode():
            try:
                with self.runner.rope_offsets(self._rope_offsets()):
                    logits = self.batch.forward()  # [rows, V]
            except Exception as e:
                failed, self._live = self._live, []
                self.batch.clear()
                for req in failed:
                    req.on_done(e)
                raise
            parts: list[tuple[_Request, torch.Tensor]] = []
            start = 0
            for req in self._live:  # each request draws from its own rows, with its own generator
                parts.append((req, logits[start : start + len(req.live)]))
                start += len(req.live)
            choices: list[_Choice | None] = [None] * len(parts)
            if self._pool is not None and len(parts) > 1:
                choices = list(self._pool.map(lambda p: self._choose(p[0], p[1], shared=False), parts))
            rows: list[int] = []
            nexts: list[torch.Tensor] = []
            start = 0
            for (req, part), choice in zip(parts, choices):  # recorded in order, on this thread
                kept, tokens = self._advance(req, part, shared=False, choice=choice)
                rows.extend(start + b for b in kept)
                nexts.append(tokens)
                start += part.shape[0]
            self.batch.keep(rows, torch.cat(nexts))
        finished = [r for r in self._live if r.done]
        self._live = [r for r in self._live if not r.done]
        for req in finished:
            req.on_done(req.output())
        self._admit_waiting()

    def _rope_offsets(self) -> torch.Tensor | None:
        """Each live row's RoPE delta [rows] when some request's prompt held images (its
        positions run behind its length), else None: text decoding is left as it was."""
        if not any(r.rope_delta for r in self._live):
            return None
        return torch.tensor([r.rope_delta for r in self._live for _ in r.live])

    def _admit_waiting(self) -> None:
        while self._waiting and not self._live and not self._prefilling:
            slot, spec, on_done = self._waiting.popleft()
            try:
                self.admit(slot, spec, on_done)
            except Exception as e:
                on_done(e)

    def sample(self, slot: int | None, spec: SampleSpec) -> SampleOut:
        """Synchronous sampling (tests, tools): admit one request and step until it is done;
        other live requests advance meanwhile."""
        box: list[SampleOut | BaseException] = []
        self.admit(slot, spec, box.append)
        while not box:
            self.step()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _choose(self, req: _Request, logits: torch.Tensor, *, shared: bool) -> _Choice:
        """The next token of each of the request's live rows from fp32 logits [b, V], its raw
        logprob and (with topk_sample_logprobs) the step's top k; touches only `req.gen`, so
        requests may choose in parallel threads."""
        with torch.inference_mode():  # thread-local: a pool thread enters it itself
            tokens, logprobs, log_z = self._pick(logits, req.spec, req.gen)
            k = req.spec.topk_sample_logprobs
            tops = None
            if k > 0:  # when shared, every row has the same logits: one row is enough
                rows = slice(0, 1) if shared else slice(None)
                tops = self._topk(logits[rows], log_z[rows], k)
        return tokens, logprobs.tolist(), tops

    def _advance(self, req: _Request, logits: torch.Tensor, *, shared: bool,
                 choice: _Choice | None = None) -> tuple[list[int], torch.Tensor]:
        """Draw (or take the `choice` already drawn) and record the next token of each of the
        request's live rows; returns (positions of the rows that go on, their tokens)."""
        tokens, logprobs, tops = choice if choice is not None else self._choose(req, logits, shared=shared)
        kept = req.take(tokens.tolist(), logprobs, tops, shared)
        return kept, tokens[kept]

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


def _slot_order(slot: int | None) -> tuple[bool, int]:
    """Sort key of a row's slot: adapters by slot number, the base model (None) last."""
    return (slot is None, slot or 0)
