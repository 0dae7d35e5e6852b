"""Read a recipe's `metrics.jsonl` back as text curves: the numbers a recipe README quotes.

    python -m tinsmith.cookbook.curves runs/math_rl reward eval/accuracy
    python -m tinsmith.cookbook.curves runs/rlhf/reward_model loss --every 2

For each metric: a sparkline over all steps, then the value at every `--every`-th step
(and the last), first -> last, and the wall time the steps took (the sum of `step_s`, the
time each recipe logs per step). Steps where a metric is absent (e.g. evaluation metrics
between evaluation steps) are skipped for that metric.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BARS = "▁▂▃▄▅▆▇█"


def read_rows(log_path: str | Path) -> list[dict[str, Any]]:
    """The rows of <log_path>/metrics.jsonl, in step order (a resumed run's rewritten steps
    keep their last row)."""
    path = Path(log_path) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: no metrics at {path}")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def sparkline(values: Sequence[float]) -> str:
    """One bar per value, scaled between the smallest and the largest."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    return "".join(BARS[round((v - lo) / span * (len(BARS) - 1))] if math.isfinite(v) else " "
                   for v in values)


def curve(rows: Sequence[dict[str, Any]], metric: str, every: int) -> str:
    """The text block for one metric (module docstring)."""
    points = [(int(r["step"]), float(r[metric])) for r in rows
              if isinstance(r.get(metric), int | float)]
    if not points:
        return f"{metric}: not logged"
    shown = [p for i, p in enumerate(points) if i % every == 0 or i == len(points) - 1]
    values = "  ".join(f"{s}:{v:.4g}" for s, v in shown)
    first, last = points[0][1], points[-1][1]
    return (f"{metric}: {first:.4g} -> {last:.4g}  {sparkline([v for _, v in points])}\n"
            f"    {values}")


def wall_time(rows: Sequence[dict[str, Any]]) -> float:
    """Seconds the logged steps took (sum of `step_s`)."""
    return sum(float(r.get("step_s", 0.0)) for r in rows)


def report(log_path: str | Path, metrics: Sequence[str], every: int = 1) -> str:
    rows = read_rows(log_path)
    head = f"{log_path}: {len(rows)} steps, {wall_time(rows):.0f} s of steps"
    return "\n".join([head, *(curve(rows, m, max(1, every)) for m in metrics)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tinsmith.cookbook.curves",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("log_path", help="a recipe's log_path (holds metrics.jsonl)")
    parser.add_argument("metrics", nargs="+", help="metric names, e.g. reward eval/accuracy")
    parser.add_argument("--every", type=int, default=1, help="print every N-th value")
    args = parser.parse_args(argv)
    print(report(args.log_path, args.metrics, args.every))


if __name__ == "__main__":
    main()
