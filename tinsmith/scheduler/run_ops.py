"""Training runs: create one (or load one from a checkpoint), then forward_backward,
optim_step and saves, each queued behind the run's earlier seq_ids.

Training operations of one run pass through that run's `SeqGate` first, so they execute in
the client's seq_id order. Inputs are validated at submission: a bad request gets an HTTP
4xx immediately (its seq_id is consumed so the run's later requests still flow) and never
reaches the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from datetime import timedelta
from functools import cached_property

from prometheus_client import Counter

from tinsmith.engine.backend import TrainWork
from tinsmith.engine.budget import padded_tokens
from tinsmith.engine.checkpoint import TINSMITH_FILE, read_optimizer_config
from tinsmith.engine.export import peft_files
from tinsmith.engine.validation import check_data
from tinsmith.engine.vision import counted_length
from tinsmith.scheduler import paths
from tinsmith.scheduler.access import OPEN, Caller, sees
from tinsmith.scheduler.checkpoint_ops import write_key
from tinsmith.scheduler.core import MAX_TTL_S, RunState, SamplerState, ServiceCore, _now, log
from tinsmith.scheduler.limits import check_request_tokens, check_stored_room
from tinsmith.scheduler.ordering import RETRY_GRACE_S, GapPolicy, SeqGate
from tinsmith.scheduler.paths import CheckpointRef, check_name, parse_path
from tinsmith.scheduler.sampler_ops import inflight_key
from tinsmith.scheduler.served import ModelHandle
from tinsmith.scheduler.worker import Pack
from tinsmith.types import (
    ADAMW,
    AdamSpec,
    DatumIn,
    DimuonSpec,
    LoraSpec,
    OptimizerConfig,
    OptimSpec,
    UserError,
)

_SAVE_TYPES = {"weights": "save_weights", "sampler_weights": "save_weights_for_sampler",
               "external_weights": "save_weights_external"}


class RunOps(ServiceCore):
    def create_model(
        self, *, session_id: str, model_seq_id: int, base_model: str, lora: LoraSpec,
        user_metadata: Mapping[str, object] | None, caller: Caller = OPEN,
        optimizer: OptimizerConfig = ADAMW,
    ) -> tuple[str, str]:
        """Create a LoRA training run with optimizer family `optimizer`, fixed for its life.
        Returns (request_id, model_id)."""
        self._check_session(session_id, caller)
        handle = self.model(base_model)
        if not 1 <= lora.rank <= 512:
            raise UserError(f"LoRA rank must be between 1 and 512, got {lora.rank}")
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise UserError("LoRA config trains nothing: enable train_mlp, train_attn or train_unembed")

        def work(run_id: str) -> dict[str, object]:
            handle.trainer.create_run(run_id, lora, optimizer)
            return {"model_id": run_id, "type": "create_model"}

        return self._new_run(session_id, model_seq_id, handle, lora, user_metadata,
                             "create_model", work, caller.owner, optimizer)

    def _new_run(
        self, session_id: str, model_seq_id: int, handle: ModelHandle, lora: LoraSpec,
        user_metadata: Mapping[str, object] | None, kind: str,
        work: Callable[[str], object], owner: str | None = None,
        optimizer: OptimizerConfig = ADAMW,
    ) -> tuple[str, str]:
        """Register run `<session>:train:<model_seq_id>` (its optimizer family stored with it)
        and queue `work(run_id)`, which creates its adapter. A retried creation gets the first
        request id back."""
        run_id = paths.run_id(session_id, model_seq_id)
        max_pending = self.keys.limits(owner).max_concurrent
        with self._lock:
            existing = self.runs.get(run_id)
            if existing is not None:
                return existing.create_request_id, run_id
            self._check_unused(run_id)
            rid = self.futures.create(kind, owner, max_pending)
            self.runs[run_id] = RunState(run_id, handle, lora, rid, owner=owner, optimizer=optimizer)
        self.db.add_run(run_id, session_id=session_id, base_model=handle.name, lora=lora.to_json(),
                        user_metadata=dict(user_metadata) if user_metadata else None, owner=owner,
                        optimizer=optimizer.to_db())
        handle.worker.submit(rid, lambda: work(run_id), kind)
        return rid, run_id

    def get_info(self, run_id: str, caller: Caller | None = None) -> dict[str, object]:
        r = self.run(run_id, caller)
        return {
            "type": "get_info",
            "model_id": run_id,
            "model_data": {"arch": r.handle.arch, "model_name": r.base_model,
                           "tokenizer_id": str(r.handle.model_dir)},
            "optimizer_config": r.optimizer.to_json(),
            "is_lora": True,
            "lora_rank": r.lora.rank,
            "model_name": r.base_model,
        }

    def _ordered(
        self, r: RunState, seq_id: int, kind: str, work: Callable[[], object] | None,
        validate: Callable[[], None] | None = None, tokens: int = 0, pack: Pack | None = None,
    ) -> str:
        """Queue `work` (or the packable work `pack`) behind run `r`'s earlier seq_ids.
        Returns the request id, a future owned by the run's owner. Over the owner's
        concurrent-request limit it raises TooManyRequests (429) and consumes nothing, except
        for the seq_id the run's held requests wait for: that one always passes, so the
        limit can never wedge a run whose requests arrived out of order. A request that
        fails `validate` consumes its seq_id (its future holds the error, for retries)."""
        max_pending = self.keys.limits(r.owner).max_concurrent
        with self._lock:
            gate = self._gate(r)
            previous = gate.issued(seq_id)
            if previous is not None:
                return previous  # a retried submission: same request, same result
            gate.check_new(seq_id)
            if seq_id == gate.next_seq and gate.waiting():
                max_pending = None
            # Cancellable while the gate holds it (cancel_future): released, it is skipped.
            rid = self.futures.create(kind, r.owner, max_pending, cancellable=True)
            try:
                if validate is not None:
                    validate()

                def job() -> None:
                    if self.futures.begin(rid):
                        r.handle.worker.submit(rid, work, kind, tokens, owner=r.run_id, pack=pack)
                gate.submit(seq_id, rid, job, _call)  # raises if skipped meanwhile
            except UserError as e:
                self.metrics.rejected(r.base_model, kind)
                self.futures.set_error(rid, str(e), "user")
                gate.reject(seq_id, str(e), rid)
                raise
        return rid

    def _gate(self, r: RunState) -> SeqGate:
        """Run `r`'s SeqGate, with this server's gap policy (seq_gap_timeout_s) bound on
        first use. Call with self._lock held."""
        if r.gate.policy.name != r.run_id:
            timeout = self.settings.seq_gap_timeout_s
            r.gate.policy = GapPolicy(
                timeout if timeout and timeout > 0 else None,
                retry_grace_s=max(RETRY_GRACE_S, timeout or 0.0), name=r.run_id,
                on_skip=lambda seqs, waited: self._gap_skipped(r, seqs, waited))
        return r.gate

    def _visible_run(self, run_id: str, caller: Caller) -> RunState | None:
        r = self.runs.get(run_id)
        return r if sees(caller, r) else None

    def reject_seq(self, run_id: str, seq_id: int, reason: str, caller: Caller = OPEN) -> bool:
        """Consume `seq_id` of run `run_id` for a request refused before it was queued (the
        api layer calls this for every 4xx it gives a request it could read model_id and
        seq_id from), so the run's later requests do not wait for it. Nothing happens for
        a run the caller may not see, or a seq_id already used; returns whether it consumed."""
        r = self._visible_run(run_id, caller)
        if r is None:
            return False
        with self._lock:
            return self._gate(r).reject(seq_id, reason)

    def defer_seq(self, run_id: str, seq_id: int, caller: Caller = OPEN) -> None:
        """`seq_id` of run `run_id` was refused with a status the SDK retries with the same
        seq_id (429, 5xx): it is in flight, so the run's gaps get the longer retry grace."""
        r = self._visible_run(run_id, caller)
        if r is not None:
            with self._lock:
                self._gate(r).defer(seq_id)

    @cached_property
    def _skipped_seqs(self) -> Counter:
        """Created on the first skip (the sweeper thread is its only caller)."""
        return Counter("tinsmith_skipped_seq_ids", "seq_ids a training run's requests stopped "
                       "waiting for after seq_gap_timeout_s (numbered by the client, never sent)",
                       ["model"], registry=self.metrics.registry)

    def _gap_skipped(self, r: RunState, seqs: list[range], waited: float) -> None:
        n = sum(len(g) for g in seqs)
        log.warning("training run %s: skipped seq_id(s) %s after later requests waited %.1f s "
                    "for them (seq_gap_timeout_s); a late arrival of one gets a 400",
                    r.run_id, ", ".join(f"{g.start}" if len(g) == 1 else f"{g.start}-{g.stop - 1}"
                                        for g in seqs), waited)
        self._skipped_seqs.labels(model=r.base_model).inc(n)

    def forward_backward(
        self, run_id: str, seq_id: int, data: Sequence[DatumIn], loss_fn: str,
        config: Mapping[str, float | str], *, forward_only: bool, caller: Caller = OPEN,
    ) -> str:
        r = self.run(run_id, caller)
        h = r.handle
        prepared: list[DatumIn] = []

        # Image tokens included, also for images sent without expected_tokens.
        lengths = [counted_length(d.tokens, d.images, h.vision) for d in data]
        n_tokens = sum(lengths)
        visible = self._stability_visible(caller, data)

        def validate() -> None:
            check_request_tokens(n_tokens, self.keys.limits(r.owner),
                                 f"this {'forward' if forward_only else 'forward_backward'} request")
            spec = self.losses.get(loss_fn)
            check_data(data, loss_fn, spec, config, h.vocab_size, h.max_context, h.vision)
            prepared.extend(self.stability.attach(data, visible) if spec.server_inputs else data)

        # Filled by validate() before the job is released; several runs' works share a pass.
        kind = "forward" if forward_only else "forward_backward"

        def run_pass(works: list[TrainWork]) -> list[object]:  # the works of every run in the pass
            outs = h.trainer.forward_backward_many(works, forward_only=forward_only)
            if not forward_only:
                for w, out in zip(works, outs):
                    if not isinstance(out, Exception):
                        self.history.record(w.run_id, kind, out.metrics)
            return outs  # type: ignore[return-value]

        def split(work: TrainWork, budget: int) -> Generator[None, None, object]:  # one big request
            out = yield from h.trainer.forward_backward_chunked(work, forward_only=forward_only,
                                                                budget=budget)
            if not forward_only:
                self.history.record(work.run_id, kind, out.metrics)
            return out

        pack = Pack(kind, padded_tokens(lengths),
                    TrainWork(run_id, prepared, loss_fn, config), run_pass, split)  # type: ignore[arg-type]
        return self._ordered(r, seq_id, kind, None, validate, tokens=n_tokens, pack=pack)

    def optim_step(self, run_id: str, seq_id: int, params: OptimSpec, caller: Caller = OPEN) -> str:
        """One step of the run's optimizer: `params` must be of the family the run was
        created with (AdamSpec for AdamW, DimuonSpec for Dimuon), else a 400 naming both."""
        r = self.run(run_id, caller)

        def validate() -> None:
            if params.family != r.optimizer.type:
                given = "AdamParams" if isinstance(params, AdamSpec) else "DimuonParams"
                wanted = "AdamParams" if r.optimizer.type == "adamw" else "DimuonParams"
                raise UserError(
                    f"optim_step got {given} ({params.family}), but this run's optimizer is "
                    f"{r.optimizer.type}, fixed when it was created; send {wanted}")
            if isinstance(params, DimuonSpec):
                if not params.learning_rate >= 0 or not 0 <= params.beta1 < 1:
                    raise UserError("DimuonParams need learning_rate >= 0 and 0 <= beta1 < 1")
                if not math.isfinite(params.learning_rate + params.grad_clip_norm):
                    raise UserError("DimuonParams need finite learning_rate and grad_clip_norm")
                return
            adam = params
            if adam.learning_rate < 0 or not 0 <= adam.beta1 < 1 or not 0 <= adam.beta2 < 1:
                raise UserError("AdamParams need learning_rate >= 0 and 0 <= beta1, beta2 < 1")
            if adam.eps <= 0 or adam.weight_decay < 0 or adam.grad_clip_norm < 0:
                raise UserError("AdamParams need eps > 0, weight_decay >= 0 and grad_clip_norm >= 0")

        def work() -> object:
            metrics = r.handle.trainer.optim_step(run_id, params)
            self.db.touch_run(run_id)
            self.history.record(run_id, "optim_step", metrics)
            return {"metrics": metrics, "type": "optim_step"}

        return self._ordered(r, seq_id, "optim_step", work, validate)

    def save(
        self, run_id: str, seq_id: int, *, kind: str, name: str, ttl_seconds: int | None,
        overwrite: bool, user_metadata: Mapping[str, object] | None, caller: Caller = OPEN,
    ) -> str:
        """save_state (kind "weights"), a named save_weights_for_sampler ("sampler_weights")
        or save_weights_external ("external_weights": the PEFT adapter files only)."""
        r = self.run(run_id, caller)
        ref = CheckpointRef(run_id, kind, name)
        limits = self.keys.limits(r.owner)

        def validate() -> None:
            check_name(name)
            if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_S:
                raise UserError(f"ttl_seconds must be between 1 and {MAX_TTL_S}, got {ttl_seconds}")
            if limits.max_stored_bytes is not None:  # unlimited (the default): no query
                check_stored_room(self.db.stored_bytes(r.owner), limits)

        def work() -> object:
            if not overwrite and self.db.get_checkpoint(run_id, ref.checkpoint_id) is not None:
                raise UserError(
                    f"checkpoint {ref.tinker_path} already exists; pass overwrite=True to replace it"
                )
            files = r.handle.trainer.export_run(run_id, r.base_model, include_optimizer=kind == "weights")
            if kind == "external_weights":
                files = peft_files(files)
            # The size is known before writing: past the owner's max_stored_bytes nothing is written.
            size = sum(len(b) for b in files.values())
            stored = (0 if limits.max_stored_bytes is None
                      else self.db.stored_bytes(r.owner, excluding=(run_id, ref.checkpoint_id)))
            with self.stored.reserve(r.owner, size, stored, limits):
                key = write_key(self.db, ref)  # not over files a copy still shares
                self.store.put(key, files)
                self.db.upsert_checkpoint(
                    run_id, ref.checkpoint_id,
                    checkpoint_type=ref.checkpoint_type, tinker_path=ref.tinker_path,
                    storage_key=key, size_bytes=size,
                    expires_at=_now() + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
                    user_metadata=dict(user_metadata) if user_metadata else None,
                    base_model=r.base_model, lora=r.lora.to_json(), owner=r.owner,
                )
            self.db.touch_run(run_id)
            return {"path": ref.tinker_path, "size_bytes": size, "type": _SAVE_TYPES[kind]}

        return self._ordered(r, seq_id, "save_" + kind, work, validate)

    def save_ephemeral_sampler(
        self, run_id: str, seq_id: int, sampling_session_seq_id: int, caller: Caller = OPEN,
        kind: str = "snapshot",
    ) -> str:
        """save_weights_and_get_sampling_client: snapshot the weights in memory, no files.
        kind "snapshot": the new sampler's own adapter, which never changes. kind "inflight":
        publish them as the run's one shared inflight adapter (`inflight_key`), which every
        inflight sampler of the run samples, so this save updates the earlier ones too;
        requests already decoding finish on the weights they started with."""
        r = self.run(run_id, caller)
        sampler_id = paths.sampler_id(paths.session_of(run_id), sampling_session_seq_id)
        key = inflight_key(run_id) if kind == "inflight" else sampler_id

        def work() -> object:
            r.handle.sampler.put_snapshot(key, r.handle.trainer.snapshot(run_id))
            with self._lock:  # in memory only: ephemeral samplers do not survive a restart
                self.samplers[sampler_id] = SamplerState(sampler_id, r.handle, None, key, None,
                                                         owner=r.owner)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return self._ordered(r, seq_id, "save_weights_for_sampler", work)

    def load_weights(
        self, *, path: str, optimizer: bool, session_id: str | None = None,
        model_seq_id: int | None = None, model_id: str | None = None, seq_id: int | None = None,
        base_model: str | None = None, user_metadata: Mapping[str, object] | None = None,
        caller: Caller = OPEN, optimizer_config: OptimizerConfig | None = None,
    ) -> tuple[str, str]:
        """Create a run from a checkpoint (session_id + model_seq_id), or load one into an
        existing run in order (model_id + seq_id, the deprecated load_state). Returns
        (request_id, model_id).

        The optimizer family (docs/optimizers.md): a new run restoring the optimizer state
        gets the checkpoint's family; a new weights-only run gets `optimizer_config` (AdamW
        if None); an existing run keeps its own, and restoring optimizer state of the other
        family into it is a 400. `optimizer_config` that contradicts either is a 400."""
        ref = parse_path(path)
        ckpt = self.checkpoint(ref, caller)
        if optimizer and ckpt.checkpoint_type != "training":
            raise UserError(f"{path} is a {ckpt.checkpoint_type} checkpoint and holds no "
                            "optimizer state; load a tinker://.../weights/... checkpoint")
        if base_model is not None and base_model != ckpt.base_model:
            raise UserError(f"{path} was trained on {ckpt.base_model!r}, not {base_model!r}")
        handle = self.model(ckpt.base_model)
        lora = LoraSpec.from_json(ckpt.lora)
        saved = self.checkpoint_optimizer(ckpt.storage_key) if optimizer else None

        def load(run_id: str) -> object:
            files = self.store.get(ckpt.storage_key)
            r = self.runs[run_id]
            r.lora = handle.trainer.load_run(run_id, files, with_optimizer=optimizer,
                                             optimizer=r.optimizer)
            return {"model_id": run_id, "path": path, "type": "load_weights"}

        if model_id is not None:  # legacy: into an existing run, ordered by seq_id
            r = self.run(model_id, caller)
            if r.base_model != ckpt.base_model:
                raise UserError(f"{path} was trained on {ckpt.base_model!r}, this run uses {r.base_model!r}")
            if seq_id is None:
                raise UserError("load_weights into an existing model needs seq_id")
            if optimizer_config is not None and optimizer_config != r.optimizer:
                raise UserError(f"optimizer_config {optimizer_config.type} cannot change an existing "
                                f"run's optimizer ({r.optimizer.type}, fixed at its creation)")
            if saved is not None and saved != r.optimizer:
                raise UserError(f"{path} holds {saved.type} optimizer state and this run's optimizer "
                                f"is {r.optimizer.type}: load its weights only (load_state), or resume "
                                "it with create_training_client_from_state_with_optimizer")
            return self._ordered(r, seq_id, "load_weights", lambda: load(model_id)), model_id
        if session_id is None or model_seq_id is None:
            raise UserError("load_weights needs session_id and model_seq_id (or model_id and seq_id)")
        if saved is not None and optimizer_config is not None and optimizer_config != saved:
            raise UserError(f"{path} holds {saved.type} optimizer state, which optimizer_config "
                            f"{optimizer_config.type} cannot override; drop optimizer_config or "
                            "load the weights only")
        family = saved or optimizer_config or ADAMW
        self._check_session(session_id, caller)
        return self._new_run(session_id, model_seq_id, handle, lora, user_metadata,
                             "load_weights", load, caller.owner, family)

    def checkpoint_optimizer(self, storage_key: str) -> OptimizerConfig:
        """The optimizer family a stored checkpoint was saved with (AdamW for one from before
        families were recorded): what weights_info's `optimizer_config` should answer."""
        try:
            info = self.store.read(storage_key, TINSMITH_FILE)
        except FileNotFoundError:  # no tinsmith.json (or no checkpoint: the load says so)
            return ADAMW
        try:
            return read_optimizer_config({TINSMITH_FILE: info})
        except ValueError as e:
            raise UserError(f"cannot load checkpoint: {e}") from e


def _call(job: Callable[[], None]) -> None:
    job()
