"""What the sampler produced, kept for `stable_reinforce` (sampling with record_stability_info).

A sample request made with `record_stability_info=True` records, under each returned
sequence id, the prompt, the sampled tokens and the sampler's own logprobs of them.
Training datums then point at those records through provenance spans (the SDK's
`Datum.with_provenance`): a `PromptProvenanceSpan` covers loss positions that hold prompt
tokens, a `SampledProvenanceSpan` positions that hold sampled tokens. `attach` turns the
spans into two server-side loss inputs, aligned with target_tokens [N]:

  recorded_logprobs  float32 [N]  the sampler's logprob at sampled positions, 0 elsewhere
  recorded_mask      float32 [N]  1 at sampled positions, 0 at prompt positions

Records live in memory: they expire after `ttl_s` without use (a day, as on the hosted
service), the oldest go first beyond `max_tokens`, and a restart forgets them all; a
datum naming a missing record gets a user error saying so.

Records are keyed by sequence id, which names the sampler that made it. `attach` takes a
`visible` predicate (the service passes one for a keyed caller): a record whose id it
rejects (another API key's sampling) reads exactly as a missing one.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tinsmith.types import DatumIn, SampleOut, UserError


@dataclass
class _Record:
    prompt: np.ndarray  # int64 [P], shared by the samples of one request
    tokens: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    used_at: float

    @property
    def size(self) -> int:
        return int(self.prompt.shape[0] + self.tokens.shape[0])


class StabilityRecords:
    def __init__(self, max_tokens: int = 8_000_000, ttl_s: float = 24 * 3600.0) -> None:
        self._records: OrderedDict[str, _Record] = OrderedDict()  # oldest use first
        self._tokens = 0
        self._max_tokens = max_tokens
        self._ttl_s = ttl_s
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def record(self, sequence_ids: Sequence[str], prompt: np.ndarray, out: SampleOut) -> None:
        now = time.monotonic()
        with self._lock:
            for sid, seq in zip(sequence_ids, out.sequences):
                rec = _Record(prompt, np.asarray(seq.tokens), np.asarray(seq.logprobs), now)
                self._drop(sid)
                self._records[sid] = rec
                self._tokens += rec.size
            while self._tokens > self._max_tokens and self._records:
                self._drop(next(iter(self._records)))

    def _drop(self, sid: str) -> None:
        rec = self._records.pop(sid, None)
        if rec is not None:
            self._tokens -= rec.size

    def _get(self, sid: str, now: float, where: str,
             visible: Callable[[str], bool] | None) -> _Record:
        rec = self._records.get(sid)
        if rec is not None and now - rec.used_at > self._ttl_s:
            self._drop(sid)
            rec = None
        if rec is not None and visible is not None and not visible(sid):
            rec = None  # someone else's: as if missing (and left as it is)
        if rec is None:
            raise UserError(
                f"{where}: provenance span names sequence {sid!r}, which has no sampling record "
                "here; sample with record_stability_info=True, and train within a day (records "
                "expire after a day unused, and a server restart forgets them)"
            )
        rec.used_at = now
        self._records.move_to_end(sid)
        return rec

    def attach(self, data: Sequence[DatumIn],
               visible: Callable[[str], bool] | None = None) -> list[DatumIn]:
        """Each datum with recorded_logprobs / recorded_mask added from its spans; records
        whose sequence id `visible` rejects read as missing (None: all are visible)."""
        now = time.monotonic()
        out = []
        with self._lock:
            for i, d in enumerate(data):
                where = f"datum {i}"
                targets = d.inputs["target_tokens"]
                n = int(targets.shape[0])
                if not d.spans:
                    raise UserError(
                        f"{where}: stable_reinforce needs provenance spans on every datum "
                        "(Datum.with_provenance(...)) pointing at sequences sampled with "
                        "record_stability_info=True"
                    )
                if sum(s.length for s in d.spans) != n:
                    raise UserError(
                        f"{where}: loss_fn_input_spans cover {sum(s.length for s in d.spans)} "
                        f"positions but target_tokens has {n}"
                    )
                lps = np.zeros(n, np.float32)
                mask = np.zeros(n, np.float32)
                pos = 0
                for s in d.spans:
                    rec = self._get(s.sequence_id, now, where, visible)
                    source = rec.prompt if s.kind == "prompt" else rec.tokens
                    if s.offset < 0 or s.length < 0 or s.offset + s.length > source.shape[0]:
                        raise UserError(
                            f"{where}: {s.kind} span [{s.offset}, {s.offset + s.length}) is outside "
                            f"the {source.shape[0]} {s.kind} tokens of sequence {s.sequence_id!r}"
                        )
                    want = source[s.offset : s.offset + s.length]
                    if not np.array_equal(targets[pos : pos + s.length], want):
                        raise UserError(
                            f"{where}: target_tokens[{pos}:{pos + s.length}] differ from the {s.kind} "
                            f"tokens [{s.offset}:{s.offset + s.length}] of sequence {s.sequence_id!r}"
                        )
                    if s.kind == "sampled":
                        lps[pos : pos + s.length] = rec.logprobs[s.offset : s.offset + s.length]
                        mask[pos : pos + s.length] = 1.0
                    pos += s.length
                inputs = {**d.inputs, "recorded_logprobs": lps, "recorded_mask": mask}
                out.append(replace(d, inputs=inputs))
        return out
