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

A prompt with image chunks (vision-language models) is recorded with its images: the
prompt keeps IMAGE_SLOT (-1) at each image's positions, and the record names each image by
the SHA-256 of its bytes (`RecordedImage`). The bytes live beside the records in memory,
content-addressed (`record_images.RecordImages`): an image sent in many prompts, or to
many samples of one prompt, is stored once, and goes when the last record naming it does.
Image bytes have their own budget, `max_image_bytes`; beyond it the oldest records go.
`read` gives a record back (GET /api/v1/sampling_records/{sequence_id}), `image` one of its
images' bytes. In `attach`, a prompt span over an image's positions is checked as an image:
the datum's model input must hold the same bytes where the span puts that image (its
targets there are not compared: the record holds IMAGE_SLOT, not a token).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from tinsmith.scheduler.record_images import RecordImages
from tinsmith.types import (
    IMAGE_SLOT,
    DatumIn,
    ImageIn,
    NotFound,
    ProvenanceSpan,
    SampleOut,
    UserError,
)


@dataclass(frozen=True)
class RecordedImage:
    """One image chunk of a recorded prompt: prompt[at : at + length] hold IMAGE_SLOT."""

    sha256: str  # hex digest of the bytes: the key of the stored image
    format: str  # "png" or "jpeg", as sent
    at: int
    length: int  # the chunk's expected_tokens (0 when the client gave none)
    size: int  # bytes


@dataclass(frozen=True)
class RecordView:
    """A record as `read` gives it back (copies: the caller may keep them)."""

    sequence_id: str
    prompt: np.ndarray  # int64 [P], IMAGE_SLOT at image positions
    tokens: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    images: tuple[RecordedImage, ...]


@dataclass
class _Record:
    prompt: np.ndarray  # int64 [P], shared by the samples of one request
    tokens: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    used_at: float
    images: tuple[RecordedImage, ...] = ()

    @property
    def size(self) -> int:
        return int(self.prompt.shape[0] + self.tokens.shape[0])


class StabilityRecords:
    def __init__(self, max_tokens: int = 8_000_000, ttl_s: float = 24 * 3600.0,
                 max_image_bytes: int = 1 << 30) -> None:
        self._records: OrderedDict[str, _Record] = OrderedDict()  # oldest use first
        self._tokens = 0
        self._max_tokens = max_tokens
        self._ttl_s = ttl_s
        self._max_image_bytes = max_image_bytes
        self.images = RecordImages()  # the recorded prompts' image bytes, by SHA-256
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def record(self, sequence_ids: Sequence[str], prompt: np.ndarray, out: SampleOut,
               images: Sequence[ImageIn] = ()) -> None:
        """Record each sampled sequence under its id, with the prompt and its images."""
        now = time.monotonic()
        recorded = tuple(RecordedImage(hashlib.sha256(im.data).hexdigest(), im.format, im.at,
                                       im.length, len(im.data)) for im in images)
        with self._lock:
            for sid, seq in zip(sequence_ids, out.sequences):
                self._drop(sid)
                for r, im in zip(recorded, images):  # one reference per record
                    self.images.add(r.sha256, im.data, im.format)
                rec = _Record(prompt, np.asarray(seq.tokens), np.asarray(seq.logprobs), now,
                              recorded)
                self._records[sid] = rec
                self._tokens += rec.size
            while self._records and (self._tokens > self._max_tokens
                                     or self.images.bytes > self._max_image_bytes):
                self._drop(next(iter(self._records)))

    def _drop(self, sid: str) -> None:
        rec = self._records.pop(sid, None)
        if rec is not None:
            self._tokens -= rec.size
            for im in rec.images:
                self.images.release(im.sha256)

    def read(self, sid: str, visible: Callable[[str], bool] | None = None) -> RecordView:
        """Record `sid` (counts as a use); NotFound if it is missing, expired or invisible."""
        with self._lock:
            rec = self._lookup(sid, visible)
            return RecordView(sid, rec.prompt.copy(), rec.tokens.copy(), rec.logprobs.copy(),
                              rec.images)

    def image(self, sid: str, index: int,
              visible: Callable[[str], bool] | None = None) -> tuple[RecordedImage, bytes]:
        """Image `index` of record `sid`'s prompt and its bytes (NotFound if none such)."""
        with self._lock:
            rec = self._lookup(sid, visible)
            if not 0 <= index < len(rec.images):
                raise NotFound(f"sampling record {sid!r} has {len(rec.images)} image(s); "
                               f"there is no image {index}")
            im = rec.images[index]
            return im, self.images.get(im.sha256)

    def _find(self, sid: str, now: float,
              visible: Callable[[str], bool] | None) -> _Record | None:
        """Record `sid` if it exists, has not expired and `visible` lets the caller see it
        (marked used); None otherwise."""
        rec = self._records.get(sid)
        if rec is not None and now - rec.used_at > self._ttl_s:
            self._drop(sid)
            rec = None
        if rec is not None and visible is not None and not visible(sid):
            rec = None  # someone else's: as if missing (and left as it is)
        if rec is not None:
            rec.used_at = now
            self._records.move_to_end(sid)
        return rec

    def _get(self, sid: str, now: float, where: str,
             visible: Callable[[str], bool] | None) -> _Record:
        rec = self._find(sid, now, visible)
        if rec is None:
            raise UserError(
                f"{where}: provenance span names sequence {sid!r}, which has no sampling record "
                "here; sample with record_stability_info=True, and train within a day (records "
                "expire after a day unused, and a server restart forgets them)"
            )
        return rec

    def _lookup(self, sid: str, visible: Callable[[str], bool] | None) -> _Record:
        """Record `sid` for reading back; NotFound (404) if there is none for this caller."""
        rec = self._find(sid, time.monotonic(), visible)
        if rec is None:
            raise NotFound(f"no sampling record {sid!r}: sample with record_stability_info=True "
                           "(records expire after a day unused; a server restart forgets them)")
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
                    text = want != IMAGE_SLOT  # image positions: checked as images, below
                    if s.kind == "prompt" and not text.all():
                        _check_images(d, rec, s, pos, where)
                    if not np.array_equal(targets[pos : pos + s.length][text], want[text]):
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


def _check_images(d: DatumIn, rec: _Record, span: ProvenanceSpan, pos: int, where: str) -> None:
    """A prompt span covering a recorded image's positions: the datum's model input must hold
    that same image (same bytes, same expected_tokens) where the span puts it. Target t is
    model input t + 1 (next-token targets), so prompt position q, at target pos + q - offset,
    is model input position pos + q - offset + 1."""
    end = span.offset + span.length
    for k, im in enumerate(rec.images):
        if im.length == 0 or im.at + im.length <= span.offset or im.at >= end:
            continue  # no positions in the prompt, or none in this span
        at = pos + im.at - span.offset + 1
        same = [x for x in d.images if x.at == at and x.length == im.length]
        if not same or hashlib.sha256(same[0].data).hexdigest() != im.sha256:
            raise UserError(
                f"{where}: the prompt span over sequence {span.sequence_id!r} covers its image {k} "
                f"(prompt positions [{im.at}, {im.at + im.length}), sha256 {im.sha256[:12]}...); "
                f"the datum's model input must hold that same image at positions "
                f"[{at}, {at + im.length})"
            )
