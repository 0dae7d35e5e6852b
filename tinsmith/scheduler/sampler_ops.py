"""Sampling sessions and sample requests (continuous batching on the model's worker)."""

from __future__ import annotations

from collections.abc import Callable

from tinsmith.engine.validation import check_sample
from tinsmith.scheduler import paths
from tinsmith.scheduler.access import OPEN, Caller, visible
from tinsmith.scheduler.core import SamplerState, ServiceCore
from tinsmith.scheduler.limits import check_request_tokens
from tinsmith.scheduler.paths import parse_path
from tinsmith.types import SampleOut, SampleSpec, UserError


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
        try:
            check_request_tokens(len(spec.prompt) + spec.max_tokens * spec.num_samples, limits,
                                 "this sampling request (prompt + max_tokens * num_samples)")
            check_sample(spec, h.vocab_size, h.max_context)
        except UserError:
            self.metrics.rejected(h.name, "sample")
            raise
        loader = (lambda: self.store.get(s.storage_key)) if s.storage_key else None
        with self._lock:
            rid = self.futures.create("sample", s.owner, limits.max_concurrent)
            seq_ids = paths.sequence_ids(sampler_id, seq_id, spec.num_samples)
            s.issued.put(seq_id, rid, seq_ids)

        def start(done: Callable[[object], None]) -> None:  # on the worker thread
            def finish(out: SampleOut | BaseException) -> None:
                if record_stability_info and isinstance(out, SampleOut):
                    try:
                        self.stability.record(seq_ids, spec.prompt, out)
                    except Exception as e:
                        out = e
                done(out)

            h.sampler.start_sample(s.adapter_key, spec, loader, finish)

        def tokens(out: object) -> int:  # prompt once per sample, plus what was generated
            assert isinstance(out, SampleOut)
            return len(spec.prompt) * spec.num_samples + sum(len(q.tokens) for q in out.sequences)

        h.worker.submit_sample(rid, start, tokens)
        return rid, seq_ids

