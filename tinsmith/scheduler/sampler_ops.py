"""Sampling sessions and sample requests (continuous batching on the model's worker).

Each SamplingClient numbers its requests `1_000_000_000 * clone + k`: clone 0 is the
original client, an unpickled copy has its own clone id (random, or handed out by
`join_sampling_session`). A request's completion is reported to the feed of its
(sampler, clone), which /retrieve_futures long-polls (`feed_key`). A request not yet
admitted can be cancelled (cancel_future): its admission is skipped.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import cached_property

from tinsmith.engine.validation import check_sample
from tinsmith.engine.vision import counted_length
from tinsmith.scheduler import paths
from tinsmith.scheduler.access import OPEN, Caller, visible
from tinsmith.scheduler.core import SamplerState, ServiceCore
from tinsmith.scheduler.limits import check_request_tokens
from tinsmith.scheduler.paths import parse_path
from tinsmith.scheduler.sampling_records import RecordedImage, RecordView
from tinsmith.types import SampleOut, SampleSpec, UserError

CLONE_STRIDE = 1_000_000_000  # a SamplingClient's seq_ids: CLONE_STRIDE * clone id + k


def inflight_key(run_id: str) -> str:
    """The sampling backend's key of run `run_id`'s inflight adapter: one per run, shared by
    all its inflight samplers and replaced by each inflight save (kind="inflight")."""
    return f"inflight:{run_id}"


def feed_key(sampler_id: str, clone: int) -> str:
    """The completion feed (FutureStore.completions) of one sampling client."""
    return f"{sampler_id}#{clone}"


def clone_of(seq_id: int) -> int | None:
    """The clone id a sample seq_id carries (None for the server-made ids of old clients)."""
    return seq_id // CLONE_STRIDE if seq_id >= 0 else None


class SamplerOps(ServiceCore):
    def create_sampling_session(
        self, *, session_id: str, sampling_session_seq_id: int, base_model: str | None,
        model_path: str | None, caller: Caller = OPEN,
    ) -> str:
        self._check_session(session_id, caller)
        sampler_id = paths.sampler_id(session_id, sampling_session_seq_id)
        with self._lock:
            if sampler_id in self.samplers:
                return sampler_id
        state = self._new_sampler(sampler_id, base_model, model_path, caller)
        with self._lock:
            self.samplers[sampler_id] = state
        self.db.add_sampler(sampler_id, session_id=session_id, base_model=state.handle.name,
                            model_path=model_path, owner=caller.owner)
        return sampler_id

    def _new_sampler(self, sampler_id: str, base_model: str | None, model_path: str | None,
                     caller: Caller | None = None, owner: str | None = None) -> SamplerState:
        """`caller` (when given) must see the checkpoint; the sampler is `caller`'s, else `owner`'s."""
        if caller is not None:
            owner = caller.owner
        if model_path is None:
            if base_model is None:
                raise UserError("a sampling session needs base_model or model_path")
            return SamplerState(sampler_id, self.model(base_model), None, None, None, owner=owner)
        ref = parse_path(model_path)
        ckpt = self.checkpoint(ref, caller)
        if base_model is not None and base_model != ckpt.base_model:
            raise UserError(f"{model_path} was trained on {ckpt.base_model!r}, not {base_model!r}")
        # The engine caches adapters by this key: a path saved again (a new row, a fresh
        # created_at) is a new key, so new sampling sessions get the new weights.
        key = f"{ref.tinker_path}@{ckpt.created_at.isoformat()}"
        return SamplerState(sampler_id, self.model(ckpt.base_model), model_path, key,
                            ckpt.storage_key, owner=owner)

    def sampler(self, sampler_id: str, caller: Caller | None = None) -> SamplerState:
        """A sampling session; ones made before a restart are rebuilt from the database
        (ephemeral ones are never stored, so they are gone). With `caller`, one it may not
        see is an unknown one."""
        missing = f"unknown sampling session {sampler_id!r}"
        s = self.samplers.get(sampler_id)
        if s is not None:
            return visible(s, caller, missing)
        row = visible(self.db.get_sampler(sampler_id), caller, missing)
        state = self._new_sampler(sampler_id, row.base_model, row.model_path, owner=row.owner)
        with self._lock:
            self.samplers[sampler_id] = state
        return state

    def join_sampling_session(self, sampler_id: str, caller: Caller | None = None) -> int:
        """A new clone id for an unpickled SamplingClient of `sampler_id`. Ids increase within
        this process from a random start per sampler (clones that joined before a restart
        keep theirs; a new start makes a clash with them unlikely), in the SDK's own range for
        clone ids (about 1e9), so CLONE_STRIDE * id + k stays far within int64."""
        self.sampler(sampler_id, caller)  # it exists and the caller may see it
        with self._lock:
            clone = self._next_clone.get(sampler_id) or 1 + secrets.randbelow(CLONE_STRIDE // 2)
            self._next_clone[sampler_id] = clone + 1
        return clone

    @cached_property
    def _next_clone(self) -> dict[str, int]:
        """sampler id -> the next clone id join_sampling_session hands out."""
        return {}

    def get_sampler_info(self, sampler_id: str, caller: Caller | None = None) -> dict[str, object]:
        s = self.sampler(sampler_id, caller)
        out: dict[str, object] = {"sampler_id": sampler_id, "base_model": s.handle.name}
        if s.model_path:
            out["model_path"] = s.model_path
        return out

    def sample(
        self, sampler_id: str, seq_id: int, spec: SampleSpec, *, record_stability_info: bool = False
    ) -> tuple[str, list[str]]:
        s = self.sampler(sampler_id)
        h = s.handle
        with self._lock:
            issued = s.issued.get(seq_id)
            if issued is not None:
                return issued
        limits = self.keys.limits(s.owner)
        prompt_tokens = counted_length(spec.prompt, spec.images, h.vision)  # images included
        try:
            check_request_tokens(prompt_tokens + spec.max_tokens * spec.num_samples, limits,
                                 "this sampling request (prompt + max_tokens * num_samples)")
            check_sample(spec, h.vocab_size, h.max_context, h.vision)
            refusal = getattr(h.sampler, "refusal", None)  # what this engine cannot serve (vLLM)
            why = refusal(spec) if refusal is not None else None
            if why is not None:
                raise UserError(why)
        except UserError:
            self.metrics.rejected(h.name, "sample")
            raise
        loader = (lambda: self.store.get(s.storage_key)) if s.storage_key else None
        with self._lock:
            clone = clone_of(seq_id)
            rid = self.futures.create(
                "sample", s.owner, limits.max_concurrent, cancellable=True,
                feed=None if clone is None else feed_key(sampler_id, clone))
            seq_ids = paths.sequence_ids(sampler_id, seq_id, spec.num_samples)
            s.issued.put(seq_id, rid, seq_ids)

        def start(done: Callable[[object], None]) -> None:  # on the worker thread
            if not self.futures.begin(rid):  # cancelled while queued: never admitted
                done(UserError("sampling request cancelled before it started"))
                return

            def finish(out: SampleOut | BaseException) -> None:
                if record_stability_info and isinstance(out, SampleOut):
                    try:
                        self.stability.record(seq_ids, spec.prompt, out, spec.images)
                    except Exception as e:
                        out = e
                done(out)

            h.sampler.start_sample(s.adapter_key, spec, loader, finish)

        def tokens(out: object) -> int:  # prompt once per sample, plus what was generated
            assert isinstance(out, SampleOut)
            return prompt_tokens * spec.num_samples + sum(len(q.tokens) for q in out.sequences)

        h.worker.submit_sample(rid, start, tokens)
        return rid, seq_ids

    # ----- sampling records, read back (GET /api/v1/sampling_records/...) -----------------
    def _record_visible(self, caller: Caller, sequence_id: str) -> Callable[[str], bool] | None:
        """Whether the caller may read that record: one of its own sessions' (admins: all).
        Looked up here, not under the records' lock; someone else's reads as missing."""
        if caller.admin:
            return None
        mine = self._own_session(paths.session_of(sequence_id), caller)
        return lambda _sid: mine

    def sampling_record(self, sequence_id: str, caller: Caller = OPEN) -> RecordView:
        """The record of a sequence sampled with record_stability_info (NotFound if none)."""
        return self.stability.read(sequence_id, self._record_visible(caller, sequence_id))

    def sampling_record_image(self, sequence_id: str, index: int,
                              caller: Caller = OPEN) -> tuple[RecordedImage, bytes]:
        """Image `index` of that record's prompt, and its bytes."""
        return self.stability.image(sequence_id, index,
                                    self._record_visible(caller, sequence_id))

