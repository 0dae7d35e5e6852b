"""Accounting: the audit log and usage metering of one server, kept off the hot path.

Both are gathered in memory and written by one background thread every `flush_s` seconds
and at shutdown (`close`), so a training step never waits on the database:

- **audit** (`record`): who did what, `<resource>_<action>` events (session_created,
  run_created, checkpoint_saved, checkpoint_deleted, ...). Operations call `record` where
  they happen; API keys are audited by the storage layer itself (queries/keys.py), since
  the CLI makes and revokes them outside any server.
- **usage** (`job_done`, called by each engine worker as a job completes): tokens trained
  (forward_backward), forward-only tokens, prompt tokens prefilled and tokens sampled, and
  checkpoints saved, summed per UTC hour, API key, base model and session. The same hook
  turns finished create/load/save jobs into audit entries, so those need no edits where
  the jobs are made.

A server killed with SIGKILL loses at most the last `flush_s` of both. Reports over what
was written are in tinsmith.scheduler.billing.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tinsmith.scheduler.access import Caller
from tinsmith.scheduler.paths import session_of
from tinsmith.storage.db import MetadataStore
from tinsmith.storage.queries.audit import AuditEntry
from tinsmith.storage.queries.base import utcnow
from tinsmith.storage.queries.usage import UsageKey
from tinsmith.types import SampleOut

log = logging.getLogger("tinsmith.accounting")

# Usage kinds, as stored; the billing report maps them to the SDK's event types.
TRAINING, FORWARD, PREFILL, SAMPLE, CHECKPOINT = (
    "training", "forward", "sampling_prefill", "sampling_sample", "checkpoint")


def actor_of(caller: Caller | None) -> str:
    """How the audit log names who acted: a key id, "open" (no keys) or "server"."""
    if caller is None:
        return "server"
    return caller.key_id or "open"


class Accounting:
    def __init__(self, db: MetadataStore, *, flush_s: float = 5.0,
                 request_owner: Callable[[str], str | None] = lambda rid: None) -> None:
        self.db = db
        self.flush_s = flush_s
        self._request_owner = request_owner  # request id -> the API key it belongs to
        self._lock = threading.Lock()  # guards the two buffers
        self._write_lock = threading.Lock()  # one flush at a time, in order
        self._usage: Counter[UsageKey] = Counter()
        self._audit: list[AuditEntry] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="accounting", daemon=True)
        self._thread.start()

    # ----- recording (any thread; never touches the database) ------------------------------
    def record(self, event: str, caller: Caller | None, *, owner: str | None = None,
               **details: Any) -> None:
        """Audit `event` done by `caller` (None: the server itself). The entry goes to the log
        of `owner` if given, else of the caller's key; `details` (JSON values) say what it
        was about, e.g. `tinker_path=...`, `model_id=...`."""
        entry = AuditEntry(utcnow(), event, owner if owner is not None else
                           (caller.owner if caller is not None else None),
                           {"actor": actor_of(caller), **details})
        with self._lock:
            self._audit.append(entry)

    def record_checkpoint(self, event: str, caller: Caller | None, row: Any,
                          **details: Any) -> None:
        """`record` an event about a checkpoint (a CheckpointRow), in its owner's log."""
        self.record(event, caller, owner=row.owner, model_id=row.training_run_id,
                    tinker_path=row.tinker_path, **details)

    def add_usage(self, kind: str, amount: int, *, owner: str | None, base_model: str,
                  session_id: str | None = None) -> None:
        if amount <= 0:
            return
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        with self._lock:
            self._usage[UsageKey(hour, owner, base_model, session_id, kind)] += amount

    def job_done(self, model: str, label: str, run_id: str | None, request_id: str,
                 tokens: int, value: object) -> None:
        """An engine job finished well (tinsmith.scheduler.worker): meter it, and audit the
        runs and checkpoints it made. `run_id`: the run whose order it kept, if any;
        `tokens`: what the worker counted for the tokens metric."""
        owner = self._request_owner(request_id)
        session = session_of(run_id) if run_id else None
        if label in ("forward_backward", "forward"):
            self.add_usage(TRAINING if label == "forward_backward" else FORWARD, tokens,
                           owner=owner, base_model=model, session_id=session)
        elif label == "sample" and isinstance(value, SampleOut):
            # The worker counts prompt x num_samples + generated; the prompt is prefilled once.
            sampled = sum(len(q.tokens) for q in value.sequences)
            prompt = (tokens - sampled) // max(1, len(value.sequences))
            self.add_usage(PREFILL, prompt, owner=owner, base_model=model)
            self.add_usage(SAMPLE, sampled, owner=owner, base_model=model)
        elif isinstance(value, dict):
            self._audit_job(model, label, run_id, owner, value)

    def _audit_job(self, model: str, label: str, run_id: str | None, owner: str | None,
                   value: dict[str, Any]) -> None:
        who = Caller(owner)
        model_id = value.get("model_id") or run_id
        if label == "create_model" or (label == "load_weights" and run_id is None):
            self.record("run_created", who, model_id=model_id, base_model=model,
                        **({"from_checkpoint": value["path"]} if "path" in value else {}))
        elif label == "load_weights":
            self.record("checkpoint_loaded", who, model_id=model_id, tinker_path=value.get("path"))
        elif label.startswith("save") and "path" in value:
            self.record("checkpoint_saved", who, model_id=run_id, tinker_path=value["path"],
                        size_bytes=value.get("size_bytes"))
            self.add_usage(CHECKPOINT, 1, owner=owner, base_model=model,
                           session_id=session_of(run_id) if run_id else None)

    # ----- writing -----------------------------------------------------------------------
    def flush(self) -> None:
        """Write what was gathered; on failure it is kept for the next try."""
        with self._write_lock:
            with self._lock:
                usage, self._usage = self._usage, Counter()
                audit, self._audit = self._audit, []
            try:
                self.db.add_usage(usage)
                usage = Counter()
                self.db.add_audit_entries(audit)
            except Exception:
                with self._lock:  # put back in front of what came meanwhile
                    self._usage.update(usage)
                    self._audit[:0] = audit
                raise

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:
                log.exception("writing usage and audit entries failed; retrying in %g s",
                              self.flush_s)

    def close(self) -> None:
        """Stop the writer thread and write what is left (call before closing the db)."""
        self._stop.set()
        self._thread.join(10)
        try:
            self.flush()
        except Exception:
            log.exception("writing usage and audit entries at shutdown failed")
