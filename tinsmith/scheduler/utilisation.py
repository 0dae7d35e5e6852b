"""The dashboard's engine panel: per base model, the queue, the busy fraction, tokens per
second and requests per training pass, read from the server's Prometheus registry (the same
numbers `GET /metrics` exposes), so the panel and the scrapes never disagree.

Tokens per second is the rate of `tinsmith_tokens_total` over the last `window_s` seconds
or a little more: since the newest earlier read at least that old (none yet: since the
server started). An idle engine reads 0 after `window_s`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from tinsmith.scheduler.telemetry import ServerMetrics


@dataclass(frozen=True)
class EngineFigures:
    model: str
    queued: int
    held: int
    busy_fraction: float
    tokens_total: float
    tokens_per_s: float
    requests_total: float
    requests_per_pass: float | None  # mean over the server's life; None before any pass
    training_runs: int
    sampling_sessions: int

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


class Utilisation:
    def __init__(self, metrics: ServerMetrics, window_s: float = 30.0) -> None:
        self.metrics = metrics
        self.window_s = window_s
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._seen: dict[str, deque[tuple[float, float]]] = defaultdict(deque)  # model -> (t, tokens)

    def _rate(self, model: str, now: float, total: float) -> float:
        """Tokens/s since the newest earlier read at least `window_s` old (else since start)."""
        with self._lock:
            seen = self._seen[model]
            while len(seen) > 1 and now - seen[1][0] >= self.window_s:
                seen.popleft()
            old = seen and now - seen[0][0] >= self.window_s
            t0, v0 = seen[0] if old else (self.started, 0.0)
            seen.append((now, total))
        return max(0.0, (total - v0) / (now - t0)) if now > t0 else 0.0

    def figures(self) -> list[EngineFigures]:
        sums: dict[tuple[str, str], float] = defaultdict(float)  # (series, model) -> value
        for family in self.metrics.registry.collect():
            for s in family.samples:
                model = s.labels.get("model")
                if model is None:
                    continue
                name = s.name
                if name == "tinsmith_queue_depth":
                    name += ":" + s.labels.get("state", "")
                sums[(name, model)] += s.value
        now = time.monotonic()
        models = sorted({m for _, m in sums})
        out = []
        for m in models:
            passes = sums[("tinsmith_pass_requests_count", m)]
            tokens = sums[("tinsmith_tokens_total", m)]
            out.append(EngineFigures(
                model=m,
                queued=int(sums[("tinsmith_queue_depth:queued", m)]),
                held=int(sums[("tinsmith_queue_depth:held", m)]),
                busy_fraction=sums[("tinsmith_engine_busy_fraction", m)],
                tokens_total=tokens,
                tokens_per_s=self._rate(m, now, tokens),
                requests_total=sums[("tinsmith_requests_total", m)],
                requests_per_pass=sums[("tinsmith_pass_requests_sum", m)] / passes if passes else None,
                training_runs=int(sums[("tinsmith_training_runs", m)]),
                sampling_sessions=int(sums[("tinsmith_sampling_sessions", m)]),
            ))
        return out
