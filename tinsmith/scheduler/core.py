"""The service's state and the lookups every operation shares: served models, loaded runs
and samplers, sessions, and what each caller may see (tinsmith.scheduler.access).

`Service` (service.py) adds the operations by resource on top of `ServiceCore`: training
runs (run_ops.py), sampling (sampler_ops.py) and checkpoints (checkpoint_ops.py).
`build_service` (build.py) constructs it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

from tinsmith.config import ServerSettings
from tinsmith.engine.losses import LossRegistry
from tinsmith.scheduler.access import OPEN, ApiKeys, Caller, sees, visible
from tinsmith.scheduler.accounting import Accounting
from tinsmith.scheduler.billing import Reports
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.history import MetricHistory
from tinsmith.scheduler.limits import Limits, StoredBytes
from tinsmith.scheduler.ordering import SeqGate
from tinsmith.scheduler.paths import CheckpointRef, session_of
from tinsmith.scheduler.playground import Playground
from tinsmith.scheduler.sampling_records import StabilityRecords
from tinsmith.scheduler.served import ModelHandle
from tinsmith.scheduler.signing import UrlSigner, stored_secret
from tinsmith.scheduler.telemetry import ModelSnapshot, ServerMetrics
from tinsmith.scheduler.tokens import TOKEN_PREFIX, Tokens
from tinsmith.scheduler.utilisation import Utilisation
from tinsmith.storage.db import CheckpointRow, MetadataStore, RunRow, SessionRow
from tinsmith.storage.files import CheckpointStore
from tinsmith.types import ADAMW, DatumIn, LoraSpec, NotFound, OptimizerConfig, UserError

log = logging.getLogger("tinsmith.service")
MAX_TTL_S = 10 * 365 * 24 * 3600

@dataclass
class RunState:
    run_id: str
    handle: ModelHandle
    lora: LoraSpec
    create_request_id: str  # the create_model / create-via-load request (retries get it back)
    gate: SeqGate = field(default_factory=SeqGate)
    owner: str | None = None  # API key id that made it (tinsmith.scheduler.access)
    optimizer: OptimizerConfig = ADAMW  # its optimizer family, fixed at creation

    @property
    def base_model(self) -> str:
        return self.handle.name


class SampleRetries:
    """What each sample seq_id of one sampler was issued (request id, sequence ids), so a
    retried request gets the same answer. Retries come soon after the first try: beyond
    `limit` entries the oldest half is forgotten. Callers hold the service lock."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._issued: dict[int, tuple[str, list[str]]] = {}

    def get(self, seq_id: int) -> tuple[str, list[str]] | None:
        return self._issued.get(seq_id)

    def put(self, seq_id: int, request_id: str, sequence_ids: list[str]) -> None:
        self._issued[seq_id] = (request_id, sequence_ids)
        if len(self._issued) > self.limit:
            for old in list(self._issued)[: self.limit // 2]:
                del self._issued[old]


@dataclass
class SamplerState:
    sampler_id: str
    handle: ModelHandle
    model_path: str | None  # tinker path it samples, None for the base model or ephemeral
    adapter_key: str | None  # its key in the sampling backend; None = base model
    storage_key: str | None  # where to reload its files from; None = not reloadable
    issued: SampleRetries = field(default_factory=SampleRetries)
    owner: str | None = None  # None for ephemeral ones: their session's owner is theirs


def _now() -> datetime:
    return datetime.now(UTC)


class ServiceCore:
    """What every operation shares. Built by `build_service`, which loads the models."""

    def __init__(self, settings: ServerSettings, *, db: MetadataStore, store: CheckpointStore,
                 futures: FutureStore, losses: LossRegistry,
                 models: dict[str, ModelHandle]) -> None:
        self.settings = settings
        self.db = db  # close() closes it too
        self.store = store
        self.futures = futures
        self.signer = UrlSigner.stored(settings.data_dir, settings.download_url_ttl_s)
        self.losses = losses
        self.stability = StabilityRecords(max_tokens=settings.stability_max_tokens)
        self.metrics = ServerMetrics(self._metrics_snapshot)  # build_service attaches the workers
        self.history = MetricHistory(settings.metric_history_points)
        self.stored = StoredBytes()
        self.utilisation = Utilisation(self.metrics)
        self.playground = Playground(self)
        self.accounting = Accounting(db, flush_s=settings.accounting_flush_s,
                                     request_owner=futures.owner)  # audit log, usage
        self.reports = Reports(db, self.accounting, settings.prices)
        self.tokens = Tokens(stored_secret(settings.data_dir), self.keys,
                             settings.auth_token_ttl_s)  # POST /auth/token's
        self.models = models
        self.runs: dict[str, RunState] = {}
        self.samplers: dict[str, SamplerState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def close(self) -> None:
        self._stop.set()
        for h in self.models.values():
            h.worker.close()
            h.close()  # a sharded model's rank processes
        self.futures.fail_all_pending("the server is shutting down")
        self.accounting.close()  # its last usage and audit entries, before the db closes
        self.db.close()

    def _metrics_snapshot(self) -> dict[str, ModelSnapshot]:
        with self._lock:
            runs, samplers = list(self.runs.values()), list(self.samplers.values())
        stats = {name: h.trainer.stats() for name, h in self.models.items()}
        return {name: ModelSnapshot(
            queued=h.worker.queued,
            held=sum(r.gate.waiting() for r in runs if r.handle is h),
            training_runs=sum(r.handle is h for r in runs),
            sampling_sessions=sum(s.handle is h for s in samplers),
            resident_runs=stats[name].resident_runs,
            run_spills=stats[name].run_spills,
            run_restores=stats[name].run_restores,
            replica_runs=stats[name].replica_runs,
            replica_moves=stats[name].replica_moves,
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
        if not sees(caller, r):
            row = self.db.get_run(run_id)
            if sees(caller, row) and row is not None and row.copied_from is not None:
                raise UserError(
                    f"training run {run_id!r} is a copy of {row.copied_from} (copy_weights) and "
                    "cannot be trained; load its checkpoint into a new training run with "
                    "create_training_client_from_state")
            if sees(caller, row):
                raise NotFound(
                    f"training run {run_id!r} is not loaded (the server restarted since it was "
                    "created); resume it with create_training_client_from_state(<its checkpoint path>)"
                )
            raise NotFound(f"unknown training run (model_id) {run_id!r}")
        assert r is not None
        return r

    def _check_unused(self, run_id: str) -> None:
        if self.db.get_run(run_id) is not None:
            raise UserError(
                f"training run {run_id!r} already exists from before a server restart; "
                "start a new ServiceClient (a new session) to create runs"
            )

    def checkpoint(self, ref: CheckpointRef, caller: Caller | None = None) -> CheckpointRow:
        return visible(self.db.get_checkpoint(ref.run_id, ref.checkpoint_id), caller,
                       f"checkpoint {ref.tinker_path} does not exist")

    # ----- access: API keys and what each caller sees (tinsmith.scheduler.access) ----------
    @cached_property
    def keys(self) -> ApiKeys:
        s = self.settings
        return ApiKeys(self.db, defaults=Limits(s.max_concurrent, s.max_request_tokens,
                                                s.max_stored_bytes))

    def authenticate(self, api_key: str | None) -> Caller:
        """The caller of a request's `X-API-Key`: an API key, or a token standing for one
        (tinsmith.scheduler.tokens). Raises Unauthorized, or InvalidToken (both 401)."""
        if api_key and api_key.startswith(TOKEN_PREFIX):
            return self.tokens.authenticate(api_key)
        return self.keys.authenticate(api_key)

    def session(self, session_id: str, caller: Caller | None = None) -> SessionRow:
        return visible(self.db.get_session(session_id), caller, f"unknown session {session_id!r}")

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
            self.accounting.record("session_finished", caller, session_id=session_id, reason=reason)

    def _own_session(self, session_id: str, caller: Caller) -> bool:
        return sees(caller, self.db.get_session(session_id))

    def list_sessions(self, caller: Caller, limit: int, offset: int) -> list[SessionRow]:
        return self.db.list_sessions(limit, offset, owner=caller.listing_owner)

    def list_runs(self, caller: Caller, limit: int, offset: int) -> tuple[list[RunRow], int]:
        return self.db.list_runs(limit, offset, owner=caller.listing_owner)

    def run_row(self, run_id: str, caller: Caller) -> RunRow:
        """A training run's stored record (loaded or not)."""
        return visible(self.db.get_run(run_id), caller, f"unknown training run {run_id!r}")

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
        sessions = {session_of(s.sequence_id) for d in data for s in d.spans or ()}
        mine = {sid for sid in sessions if sees(caller, self.db.get_session(sid))}
        return lambda sequence_id: session_of(sequence_id) in mine

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
        self.accounting.record("session_created", caller, session_id=session_id, project_id=project_id)
        return session_id

