"""The service: what the api layer calls. Owns models, runs, samplers, futures and storage.

Every long operation returns a request id at once; its work is queued on the engine
worker of the run's base model and completes the future there. Training operations of one
run pass through that run's `SeqGate` first, so they execute in the client's seq_id order.
Inputs are validated at submission: a bad request gets an HTTP 4xx immediately (its
seq_id is consumed so the run's later requests still flow) and never reaches the engine.

Ids follow the hosted service's scheme, which the SDK relies on:
training run `<session>:train:<model_seq_id>`, sampler `<session>:sample:<seq>`,
sampled sequence `<sampler>:<seq_id>:<i>`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

from prometheus_client import Counter

from tinsmith.config import ServerSettings
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.budget import padded_tokens
from tinsmith.engine.export import peft_files
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.validation import check_data, check_sample
from tinsmith.scheduler.access import OPEN, ApiKeys, Caller
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.history import MetricHistory
from tinsmith.scheduler.limits import (
    Limits,
    StoredBytes,
    check_request_tokens,
    check_stored_room,
)
from tinsmith.scheduler.models import ModelHandle, load_model
from tinsmith.scheduler.ordering import RETRY_GRACE_S, GapPolicy, SeqGate
from tinsmith.scheduler.paths import CheckpointRef, check_name, parse_path, ref_from_checkpoint_id
from tinsmith.scheduler.playground import Playground
from tinsmith.scheduler.signing import UrlSigner
from tinsmith.scheduler.stability import StabilityRecords
from tinsmith.scheduler.telemetry import ModelSnapshot, ServerMetrics
from tinsmith.scheduler.utilisation import Utilisation
from tinsmith.scheduler.worker import Pack
from tinsmith.storage.checkpoints import remove_checkpoint
from tinsmith.storage.db import CheckpointRow, MetadataStore, RunRow, SessionRow
from tinsmith.storage.files import CheckpointStore
from tinsmith.types import AdamSpec, DatumIn, LoraSpec, NotFound, SampleOut, SampleSpec, UserError

log = logging.getLogger("tinsmith.service")
MAX_TTL_S = 10 * 365 * 24 * 3600
_SAVE_TYPES = {"weights": "save_weights", "sampler_weights": "save_weights_for_sampler",
               "external_weights": "save_weights_external"}


@dataclass
class RunState:
    run_id: str
    handle: ModelHandle
    lora: LoraSpec
    create_request_id: str  # the create_model / create-via-load request (retries get it back)
    gate: SeqGate = field(default_factory=SeqGate)
    owner: str | None = None  # API key id that made it (tinsmith.scheduler.access)

    @property
    def base_model(self) -> str:
        return self.handle.name


@dataclass
class SamplerState:
    sampler_id: str
    handle: ModelHandle
    model_path: str | None  # tinker path it samples, None for the base model or ephemeral
    adapter_key: str | None  # its key in the sampling backend; None = base model
    storage_key: str | None  # where to reload its files from; None = not reloadable
    issued: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    owner: str | None = None  # None for ephemeral ones: their session's owner is theirs


def _now() -> datetime:
    return datetime.now(UTC)


class Service:
    def __init__(self, settings: ServerSettings, db: MetadataStore | None = None) -> None:
        self.settings = settings
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        self.db = db or MetadataStore(settings.resolved_database_url())  # close() closes it too
        self.store = CheckpointStore(settings.resolved_storage_url(),
                                     slow_write_s=settings.debug_slow_writes_s)
        for line in self.store.recover():  # what a crash left mid-write
            log.warning("checkpoint store: %s", line)
        self.futures = FutureStore()
        self.signer = UrlSigner.stored(settings.data_dir, settings.download_url_ttl_s)
        self.losses = LossRegistry.load(settings.loss_modules)
        self.stability = StabilityRecords(max_tokens=settings.stability_max_tokens)
        self.metrics = ServerMetrics(self._metrics_snapshot)
        self.history = MetricHistory(settings.metric_history_points)
        self.stored = StoredBytes()
        self.utilisation = Utilisation(self.metrics)
        self.playground = Playground(self)
        self.models: dict[str, ModelHandle] = {}
        for name in settings.models:
            self.models[name] = load_model(name, settings, self.futures, self.losses)
            self.models[name].worker.attach_metrics(self.metrics)
        self.runs: dict[str, RunState] = {}
        self.samplers: dict[str, SamplerState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="checkpoint-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        for h in self.models.values():
            h.worker.close()
        self.futures.fail_all_pending("the server is shutting down")
        self.db.close()

    def _metrics_snapshot(self) -> dict[str, ModelSnapshot]:
        with self._lock:
            runs, samplers = list(self.runs.values()), list(self.samplers.values())
        return {name: ModelSnapshot(
            queued=h.worker.queued,
            held=sum(r.gate.waiting() for r in runs if r.handle is h),
            training_runs=sum(r.handle is h for r in runs),
            sampling_sessions=sum(s.handle is h for s in samplers),
            resident_runs=h.trainer.stats().resident_runs,
            run_spills=h.trainer.stats().run_spills,
            run_restores=h.trainer.stats().run_restores,
        ) for name, h in self.models.items()}

    # ----- lookups ------------------------------------------------------------------------
    def model(self, name: str) -> ModelHandle:
        h = self.models.get(name)
        if h is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise UserError(f"unknown base model {name!r}: this server serves {served}")
        return h

    def run(self, run_id: str, caller: Caller | None = None) -> RunState:
        """A loaded training run. With `caller`, one it may not see is an unknown run."""
        r = self.runs.get(run_id)
        if r is not None and caller is not None and not caller.sees(r.owner):
            r = None
        if r is None:
            row = self.db.get_run(run_id)
            if row is not None and (caller is None or caller.sees(row.owner)):
                raise NotFound(
                    f"training run {run_id!r} is not loaded (the server restarted since it was "
                    "created); resume it with create_training_client_from_state(<its checkpoint path>)"
                )
            raise NotFound(f"unknown training run (model_id) {run_id!r}")
        return r

    def _check_unused(self, run_id: str) -> None:
        if self.db.get_run(run_id) is not None:
            raise UserError(
                f"training run {run_id!r} already exists from before a server restart; "
                "start a new ServiceClient (a new session) to create runs"
            )

    def checkpoint(self, ref: CheckpointRef, caller: Caller | None = None) -> CheckpointRow:
        row = self.db.get_checkpoint(ref.run_id, ref.checkpoint_id)
        if row is None or (caller is not None and not caller.sees(row.owner)):
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
        return row

    # ----- access: API keys and what each caller sees (tinsmith.scheduler.access) ----------
    @cached_property
    def keys(self) -> ApiKeys:
        s = self.settings
        return ApiKeys(self.db, defaults=Limits(s.max_concurrent, s.max_request_tokens,
                                                s.max_stored_bytes))

    def authenticate(self, api_key: str | None) -> Caller:
        return self.keys.authenticate(api_key)

    def session(self, session_id: str, caller: Caller | None = None) -> SessionRow:
        row = self.db.get_session(session_id)
        if row is None or (caller is not None and not caller.sees(row.owner)):
            raise NotFound(f"unknown session {session_id!r}")
        return row

    def _check_session(self, session_id: str, caller: Caller) -> None:
        """Runs and samplers go into the caller's own sessions. An open server takes any
        session id, as it always has."""
        if not caller.open:
            self.session(session_id, caller)

    def heartbeat(self, session_id: str, caller: Caller = OPEN) -> None:
        if self._own_session(session_id, caller):  # else as for an unknown session: nothing
            self.db.heartbeat(session_id)

    def finish_session(self, session_id: str, reason: str, caller: Caller = OPEN) -> None:
        if self._own_session(session_id, caller):
            self.db.finish_session(session_id, reason)

    def _own_session(self, session_id: str, caller: Caller) -> bool:
        try:
            self.session(session_id, caller)
        except NotFound:
            return False
        return True

    def list_sessions(self, caller: Caller, limit: int, offset: int) -> list[SessionRow]:
        return self.db.list_sessions(limit, offset, owner=caller.listing_owner)

    def list_runs(self, caller: Caller, limit: int, offset: int) -> tuple[list[RunRow], int]:
        return self.db.list_runs(limit, offset, owner=caller.listing_owner)

    def run_row(self, run_id: str, caller: Caller) -> RunRow:
        """A training run's stored record (loaded or not)."""
        row = self.db.get_run(run_id)
        if row is None or not caller.sees(row.owner):
            raise NotFound(f"unknown training run {run_id!r}")
        return row

    def list_checkpoints(self, caller: Caller, run_id: str | None = None, *, limit: int = 100,
                         offset: int = 0) -> tuple[list[CheckpointRow], int]:
        """One run's checkpoints (oldest first), or every visible one (newest first)."""
        if run_id is not None:
            self.run_row(run_id, caller)
            rows = self.db.list_checkpoints(run_id)
            return rows, len(rows)
        return self.db.list_all_checkpoints(limit, offset, owner=caller.listing_owner)

    def _stability_visible(
        self, caller: Caller, data: Sequence[DatumIn]
    ) -> Callable[[str], bool] | None:
        """For stable_reinforce: which sampling records the caller may use (those of its own
        sessions), looked up once per request here, not under the service lock."""
        if caller.admin:
            return None
        sessions = {_session_of(s.sequence_id) for d in data for s in d.spans or ()}
        rows = {sid: self.db.get_session(sid) for sid in sessions}
        mine = {sid for sid, row in rows.items() if row is not None and caller.sees(row.owner)}
        return lambda sequence_id: _session_of(sequence_id) in mine

    # ----- sessions -----------------------------------------------------------------------
    def create_session(
        self, *, tags: Sequence[str], user_metadata: Mapping[str, object] | None,
        display_name: str | None, project_id: str | None, sdk_version: str | None,
        caller: Caller = OPEN,
    ) -> str:
        session_id = uuid.uuid4().hex[:16]
        self.db.add_session(
            session_id, tags=list(tags), user_metadata=dict(user_metadata or {}),
            display_name=display_name, project_id=project_id, sdk_version=sdk_version,
            owner=caller.owner,
        )
        return session_id

    # ----- training runs ------------------------------------------------------------------
    def create_model(
        self, *, session_id: str, model_seq_id: int, base_model: str, lora: LoraSpec,
        user_metadata: Mapping[str, object] | None, caller: Caller = OPEN,
    ) -> tuple[str, str]:
        """Create a LoRA training run. Returns (request_id, model_id)."""
        self._check_session(session_id, caller)
        handle = self.model(base_model)
        if not 1 <= lora.rank <= 512:
            raise UserError(f"LoRA rank must be between 1 and 512, got {lora.rank}")
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise UserError("LoRA config trains nothing: enable train_mlp, train_attn or train_unembed")

        def work(run_id: str) -> dict[str, object]:
            handle.trainer.create_run(run_id, lora)
            return {"model_id": run_id, "type": "create_model"}

        return self._new_run(session_id, model_seq_id, handle, lora, user_metadata,
                             "create_model", work, caller.owner)

    def _new_run(
        self, session_id: str, model_seq_id: int, handle: ModelHandle, lora: LoraSpec,
        user_metadata: Mapping[str, object] | None, kind: str,
        work: Callable[[str], object], owner: str | None = None,
    ) -> tuple[str, str]:
        """Register run `<session>:train:<model_seq_id>` and queue `work(run_id)`, which
        creates its adapter. A retried creation gets the first request id back."""
        run_id = f"{session_id}:train:{model_seq_id}"
        max_pending = self.keys.limits(owner).max_concurrent
        with self._lock:
            existing = self.runs.get(run_id)
            if existing is not None:
                return existing.create_request_id, run_id
            self._check_unused(run_id)
            rid = self.futures.create(kind, owner, max_pending)
            self.runs[run_id] = RunState(run_id, handle, lora, rid, owner=owner)
        self.db.add_run(run_id, session_id=session_id, base_model=handle.name, lora=lora.to_json(),
                        user_metadata=dict(user_metadata) if user_metadata else None, owner=owner)
        handle.worker.submit(rid, lambda: work(run_id), kind)
        return rid, run_id

    def get_info(self, run_id: str, caller: Caller | None = None) -> dict[str, object]:
        r = self.run(run_id, caller)
        return {
            "type": "get_info",
            "model_id": run_id,
            "model_data": {"arch": r.handle.arch, "model_name": r.base_model,
                           "tokenizer_id": str(r.handle.model_dir)},
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
            rid = self.futures.create(kind, r.owner, max_pending)
            try:
                if validate is not None:
                    validate()
                job = lambda: r.handle.worker.submit(rid, work, kind, tokens, owner=r.run_id, pack=pack)
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
        return r if r is not None and caller.sees(r.owner) else None

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

        lengths = [len(d.tokens) for d in data]
        n_tokens = sum(lengths)
        visible = self._stability_visible(caller, data)

        def validate() -> None:
            check_request_tokens(n_tokens, self.keys.limits(r.owner),
                                 f"this {'forward' if forward_only else 'forward_backward'} request")
            spec = self.losses.get(loss_fn)
            check_data(data, loss_fn, spec, config, h.vocab_size, h.max_context)
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

    def optim_step(self, run_id: str, seq_id: int, adam: AdamSpec, caller: Caller = OPEN) -> str:
        r = self.run(run_id, caller)

        def validate() -> None:
            if adam.learning_rate < 0 or not 0 <= adam.beta1 < 1 or not 0 <= adam.beta2 < 1:
                raise UserError("AdamParams need learning_rate >= 0 and 0 <= beta1, beta2 < 1")
            if adam.eps <= 0 or adam.weight_decay < 0 or adam.grad_clip_norm < 0:
                raise UserError("AdamParams need eps > 0, weight_decay >= 0 and grad_clip_norm >= 0")

        def work() -> object:
            metrics = r.handle.trainer.optim_step(run_id, adam)
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
                self.store.put(ref.storage_key, files)
                self.db.upsert_checkpoint(
                    run_id, ref.checkpoint_id,
                    checkpoint_type=ref.checkpoint_type, tinker_path=ref.tinker_path,
                    storage_key=ref.storage_key, size_bytes=size,
                    expires_at=_now() + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
                    user_metadata=dict(user_metadata) if user_metadata else None,
                    base_model=r.base_model, lora=r.lora.to_json(), owner=r.owner,
                )
            self.db.touch_run(run_id)
            return {"path": ref.tinker_path, "size_bytes": size, "type": _SAVE_TYPES[kind]}

        return self._ordered(r, seq_id, "save_" + kind, work, validate)

    def save_ephemeral_sampler(
        self, run_id: str, seq_id: int, sampling_session_seq_id: int, caller: Caller = OPEN
    ) -> str:
        """save_weights_and_get_sampling_client: snapshot the weights in memory, no files."""
        r = self.run(run_id, caller)
        session_id = run_id.split(":train:")[0]
        sampler_id = f"{session_id}:sample:{sampling_session_seq_id}"

        def work() -> object:
            r.handle.sampler.put_snapshot(sampler_id, r.handle.trainer.snapshot(run_id))
            with self._lock:  # in memory only: ephemeral samplers do not survive a restart
                self.samplers[sampler_id] = SamplerState(sampler_id, r.handle, None, sampler_id, None,
                                                         owner=r.owner)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return self._ordered(r, seq_id, "save_weights_for_sampler", work)

    def load_weights(
        self, *, path: str, optimizer: bool, session_id: str | None = None,
        model_seq_id: int | None = None, model_id: str | None = None, seq_id: int | None = None,
        base_model: str | None = None, user_metadata: Mapping[str, object] | None = None,
        caller: Caller = OPEN,
    ) -> tuple[str, str]:
        """Create a run from a checkpoint (session_id + model_seq_id), or load one into an
        existing run in order (model_id + seq_id, the deprecated load_state). Returns
        (request_id, model_id)."""
        ref = parse_path(path)
        ckpt = self.checkpoint(ref, caller)
        if optimizer and ckpt.checkpoint_type != "training":
            raise UserError(f"{path} is a {ckpt.checkpoint_type} checkpoint and holds no "
                            "optimizer state; load a tinker://.../weights/... checkpoint")
        if base_model is not None and base_model != ckpt.base_model:
            raise UserError(f"{path} was trained on {ckpt.base_model!r}, not {base_model!r}")
        handle = self.model(ckpt.base_model)
        lora = LoraSpec.from_json(ckpt.lora)

        def load(run_id: str) -> object:
            files = self.store.get(ckpt.storage_key)
            self.runs[run_id].lora = handle.trainer.load_run(run_id, files, with_optimizer=optimizer)
            return {"model_id": run_id, "path": path, "type": "load_weights"}

        if model_id is not None:  # legacy: into an existing run, ordered by seq_id
            r = self.run(model_id, caller)
            if r.base_model != ckpt.base_model:
                raise UserError(f"{path} was trained on {ckpt.base_model!r}, this run uses {r.base_model!r}")
            if seq_id is None:
                raise UserError("load_weights into an existing model needs seq_id")
            return self._ordered(r, seq_id, "load_weights", lambda: load(model_id)), model_id
        if session_id is None or model_seq_id is None:
            raise UserError("load_weights needs session_id and model_seq_id (or model_id and seq_id)")
        self._check_session(session_id, caller)
        return self._new_run(session_id, model_seq_id, handle, lora, user_metadata,
                             "load_weights", load, caller.owner)

    # ----- sampling -----------------------------------------------------------------------
    def create_sampling_session(
        self, *, session_id: str, sampling_session_seq_id: int, base_model: str | None,
        model_path: str | None, caller: Caller = OPEN,
    ) -> str:
        self._check_session(session_id, caller)
        sampler_id = f"{session_id}:sample:{sampling_session_seq_id}"
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
        missing = NotFound(f"unknown sampling session {sampler_id!r}")
        s = self.samplers.get(sampler_id)
        if s is not None:
            if caller is not None and not caller.sees(s.owner):
                raise missing
            return s
        row = self.db.get_sampler(sampler_id)
        if row is None or (caller is not None and not caller.sees(row.owner)):
            raise missing
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
            if seq_id in s.issued:
                return s.issued[seq_id]
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
            seq_ids = [f"{sampler_id}:{seq_id}:{i}" for i in range(spec.num_samples)]
            s.issued[seq_id] = (rid, seq_ids)
            if len(s.issued) > 4096:  # retries come soon after the first try: keep the newest
                for old in list(s.issued)[:2048]:
                    del s.issued[old]

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

    # ----- checkpoints ----------------------------------------------------------------------
    def set_checkpoint_ttl(self, run_id: str, checkpoint_id: str, ttl_seconds: int | None,
                           caller: Caller | None = None) -> None:
        """Expire the checkpoint `ttl_seconds` from now (None: never)."""
        row = self.checkpoint(ref_from_checkpoint_id(run_id, checkpoint_id), caller)
        if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_S:
            raise UserError(f"ttl_seconds must be between 1 and {MAX_TTL_S}, got {ttl_seconds}")
        expires = _now() + timedelta(seconds=ttl_seconds) if ttl_seconds else None
        self.db.set_checkpoint_expiry(row.training_run_id, row.checkpoint_id, expires)

    def checkpoint_files(self, ref: CheckpointRef, caller: Caller | None = None) -> dict[str, bytes]:
        """Every file of a checkpoint the caller may see."""
        row = self.checkpoint(ref, caller)
        try:
            return self.store.get(row.storage_key)
        except FileNotFoundError as e:  # deleted (or expired) since the row was read
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist") from e

    def checkpoint_file_sizes(self, ref: CheckpointRef, caller: Caller | None = None) -> dict[str, int]:
        """{file name: size} of a checkpoint the caller may see."""
        row = self.checkpoint(ref, caller)
        try:
            return self.store.sizes(row.storage_key)
        except FileNotFoundError as e:
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist") from e

    def read_checkpoint_file(self, ref: CheckpointRef, name: str) -> bytes:
        """One file of a checkpoint (the caller's right to it was checked when signing)."""
        row = self.checkpoint(ref)
        try:
            return self.store.read(row.storage_key, name)
        except (FileNotFoundError, ValueError) as e:
            raise NotFound(f"checkpoint {ref.tinker_path} has no file {name!r}") from e

    def delete_checkpoint(self, run_id: str, checkpoint_id: str, caller: Caller | None = None) -> None:
        ref = ref_from_checkpoint_id(run_id, checkpoint_id)
        remove_checkpoint(self.db, self.store, self.checkpoint(ref, caller))

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.checkpoint_sweep_s):
            try:
                for row in self.db.expired_checkpoints(_now()):
                    remove_checkpoint(self.db, self.store, row)
            except Exception:
                log.exception("checkpoint sweep failed")


def _session_of(sequence_id: str) -> str:
    """The session a sampled sequence id names: `<session>:sample:<n>:<seq_id>:<i>`."""
    return sequence_id.split(":sample:")[0]


def _call(job: Callable[[], None]) -> None:
    job()

