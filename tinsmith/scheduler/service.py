"""The service: what the api layer calls. Owns models, runs, samplers, futures and storage.

Every long operation returns a request id at once; its work is queued on the engine
worker of the run's base model and completes the future there. The operations live by
resource: training runs in run_ops.py, sampling in sampler_ops.py, checkpoints (publishing,
copies) in checkpoint_ops.py, sessions' projects, search and traces in session_ops.py, over
the shared state and lookups of core.py. `build_service` (build.py) constructs a Service;
ids follow the scheme in paths.py.
"""

from __future__ import annotations

import threading

from tinsmith.config import ServerSettings
from tinsmith.engine.losses import LossRegistry
from tinsmith.scheduler.checkpoint_ops import CheckpointOps
from tinsmith.scheduler.core import RunState, SamplerState
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.run_ops import RunOps
from tinsmith.scheduler.sampler_ops import SamplerOps
from tinsmith.scheduler.served import ModelHandle
from tinsmith.scheduler.session_ops import SessionOps
from tinsmith.scheduler.telemetry import Check, readiness
from tinsmith.storage.db import CheckpointRow, MetadataStore
from tinsmith.storage.files import CheckpointStore

__all__ = ["RunState", "SamplerState", "Service"]


class Service(RunOps, SamplerOps, CheckpointOps, SessionOps):
    def __init__(self, settings: ServerSettings, *, db: MetadataStore, store: CheckpointStore,
                 futures: FutureStore, losses: LossRegistry,
                 models: dict[str, ModelHandle]) -> None:
        super().__init__(settings, db=db, store=store, futures=futures, losses=losses,
                         models=models)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="checkpoint-sweeper", daemon=True)
        self._sweeper.start()

    # ----- what the api layer reads ---------------------------------------------------------
    def served_models(self) -> list[ModelHandle]:
        return list(self.models.values())

    def is_loaded(self, run_id: str) -> bool:
        """Whether the training run is in memory (else it is resumed from a checkpoint)."""
        return run_id in self.runs

    def last_checkpoints(self, run_id: str) -> tuple[CheckpointRow | None, CheckpointRow | None]:
        """A run's newest training checkpoint and newest sampler checkpoint."""
        return (self.db.last_checkpoint(run_id, "training"),
                self.db.last_checkpoint(run_id, "sampler"))

    def session_contents(self, session_id: str) -> tuple[list[str], list[str]]:
        """The training run ids and sampler ids of a session (the caller was checked)."""
        return self.db.runs_of_session(session_id), self.db.samplers_of_session(session_id)

    def readiness(self) -> dict[str, Check]:
        """The checks of GET /readyz (tinsmith.scheduler.telemetry.readiness)."""
        return readiness(self.settings.models, self.models, lambda: self.db.get_run("readyz-probe"))
