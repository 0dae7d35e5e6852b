"""Construction of the whole server: storage, the loss registry and every served model."""

from __future__ import annotations

import logging
from pathlib import Path

from tinsmith.config import ServerSettings
from tinsmith.engine.losses import LossRegistry
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.served import load_model
from tinsmith.scheduler.service import Service
from tinsmith.storage.db import MetadataStore
from tinsmith.storage.files import CheckpointStore

log = logging.getLogger("tinsmith.service")


def build_service(settings: ServerSettings, db: MetadataStore | None = None) -> Service:
    """A Service over `db` (else the settings' database, opened here); Service.close()
    closes the database either way."""
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    db = db or MetadataStore(settings.resolved_database_url())
    store = CheckpointStore(settings.resolved_storage_url(), slow_write_s=settings.debug_slow_writes_s)
    for line in store.recover():  # what a crash left mid-write
        log.warning("checkpoint store: %s", line)
    futures = FutureStore()
    losses = LossRegistry.load(settings.loss_modules)
    models = {name: load_model(name, settings, futures, losses) for name in settings.models}
    svc = Service(settings, db=db, store=store, futures=futures, losses=losses, models=models)
    for h in models.values():
        h.worker.attach_metrics(svc.metrics)
        h.worker.on_done = svc.accounting.job_done
    return svc
