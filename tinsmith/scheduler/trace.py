"""A session's timeline as a trace (the SDK's export_session_trace).

The hosted service builds a Perfetto protobuf trace; this one is the Chrome trace-event
JSON format (`{"traceEvents": [...]}`), which https://ui.perfetto.dev and chrome://tracing
open alike, whatever the file is named (the SDK's CLI names it `<session>.pftrace`).

What it holds is what the server keeps: the session's start, heartbeat and finish, each
training run's creation (or copy), its forward_backward and optim_step completions with
their metrics (tinsmith.scheduler.history: in memory, so since the server started), its
checkpoints, and the session's sampling sessions. One track (thread) per training run, one
for the sampling sessions; loss and gradient norm also as counters. A request's start is
not recorded, so requests are instants at their completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from tinsmith.scheduler.history import MetricPoint
from tinsmith.storage.db import CheckpointRow, RunRow, SamplerRow, SessionRow

PID = 1
SESSION_TID, SAMPLERS_TID = 1, 2
COUNTERS = ("loss:sum", "grad_norm:mean")  # metrics also drawn as counter tracks


def _us(t: datetime | float) -> int:
    """Trace time: microseconds since the epoch."""
    return int((t.timestamp() if isinstance(t, datetime) else t) * 1e6)


def _instant(name: str, tid: int, at: datetime | float, **args: object) -> dict[str, object]:
    return {"name": name, "ph": "i", "s": "t", "pid": PID, "tid": tid, "ts": _us(at),
            "args": args}


def _track(tid: int, name: str) -> dict[str, object]:
    return {"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}}


def session_trace(session: SessionRow,
                  runs: Sequence[tuple[RunRow, Sequence[CheckpointRow], Sequence[MetricPoint]]],
                  samplers: Sequence[SamplerRow]) -> dict[str, object]:
    events: list[dict[str, object]] = [
        {"name": "process_name", "ph": "M", "pid": PID,
         "args": {"name": f"session {session.session_id}"
                          + (f" ({session.display_name})" if session.display_name else "")}},
        _track(SESSION_TID, "session"), _track(SAMPLERS_TID, "sampling sessions"),
        _instant("session created", SESSION_TID, session.created_at,
                 project_id=session.project_id, user_metadata=session.user_metadata,
                 tags=session.tags, sdk_version=session.sdk_version),
        _instant("last heartbeat", SESSION_TID, session.last_heartbeat_at),
    ]
    if session.finished_at is not None:
        events.append(_instant("session finished", SESSION_TID, session.finished_at,
                               reason=session.finish_reason))
    for i, (run, checkpoints, points) in enumerate(runs):
        tid = SAMPLERS_TID + 1 + i
        events.append(_track(tid, f"training run {run.training_run_id}"))
        made = "copied" if run.copied_from else "created"
        events.append(_instant(f"training run {made}", tid, run.created_at,
                               base_model=run.base_model, lora=run.lora,
                               copied_from=run.copied_from))
        for p in points:
            events.append(_instant(p.kind, tid, p.time, **{"step": p.step, **p.metrics}))
            shown = {k: v for k, v in p.metrics.items() if k in COUNTERS}
            if shown:
                events.append({"name": run.training_run_id, "ph": "C", "pid": PID,
                               "ts": _us(p.time), "args": shown})
        for c in checkpoints:
            events.append(_instant(f"saved {c.checkpoint_id}", tid, c.created_at,
                                   tinker_path=c.tinker_path, size_bytes=c.size_bytes,
                                   public=c.public))
    for s in samplers:
        events.append(_instant(f"sampling session {s.sampler_id}", SAMPLERS_TID, s.created_at,
                               base_model=s.base_model, model_path=s.model_path))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"session_id": session.session_id, "exporter": "tinsmith"}}
