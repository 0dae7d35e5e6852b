"""Metrics logging for recipes: metrics.jsonl, a progress bar, a console table, TensorBoard, W&B.

    logger = MetricsLogger(cfg.log_path, total_steps=cfg.max_steps, start_step=start_step)
    for step in range(start_step, cfg.max_steps):
        ...
        logger.log(step, {"nll": 1.23, "grad_norm": 0.4})
    logger.close()

- `<log_path>/metrics.jsonl`: one JSON object per step, `{"step": step, **metrics}`, flushed
  at once. A resumed run (start_step > 0) appends; rows at or past `start_step`, left by a
  run that stopped after its last checkpoint, are dropped first, so each step appears once.
- A tqdm progress bar (rate and ETA) with the first few metrics, and every `table_every`
  steps a compact table of the steps since the last one (rich, or plain aligned text).
- TensorBoard event files in `<log_path>/tensorboard` when asked and `tensorboard` is
  installed; a Weights & Biases run when a project is given and `wandb` is installed (its id
  is kept in `<log_path>/wandb_run_id`, so a resumed run continues the same W&B run).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import uuid
from pathlib import Path
from typing import Any, Self

from tqdm import tqdm

Metrics = dict[str, float | int]


def _plain(value: Any) -> Any:
    """numpy / torch scalars -> Python numbers, so json and the table print them plainly."""
    return value.item() if hasattr(value, "item") else value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a table, one column per key (in first-seen order)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain aligned text
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for k in keys:
        table.add_column(k, justify="right")
    for row in cells:
        table.add_row(*row)
    # Wide enough for the table's natural width: columns are never squeezed or truncated.
    console = Console(width=1000, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get().rstrip("\n")


def _truncate_from(path: Path, start_step: int) -> int:
    """Drop the rows of metrics.jsonl with step >= start_step; returns how many were dropped."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", -1) < start_step]
    if len(keep) != len(lines):
        path.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


class MetricsLogger:
    """Writes each step's metrics to metrics.jsonl, the console, and the optional backends."""

    def __init__(self, log_path: str | Path, total_steps: int, start_step: int = 0, *,
                 wandb_project: str | None = None, tensorboard: bool = False,
                 table_every: int = 5, config: dict[str, Any] | None = None,
                 progress: bool = True, desc: str | None = None) -> None:
        self.log_path = Path(log_path)
        self.log_path.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.table_every = total_steps, table_every
        dropped = _truncate_from(self.log_path / "metrics.jsonl", start_step)
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} rows from step {start_step} on "
                  "(written after the last checkpoint)", file=sys.stderr)
        if config is not None:
            (self.log_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self._rows: list[dict[str, Any]] = []  # the steps since the last table
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                         dynamic_ncols=True, disable=not progress)
        self._tb = self._wandb = None
        if tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                self._note("tensorboard=true but the `tensorboard` package is not installed")
            else:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.log_path / "tensorboard"))
        if wandb_project:
            if importlib.util.find_spec("wandb") is None:
                self._note("wandb_project is set but the `wandb` package is not installed")
            else:
                import wandb

                id_file = self.log_path / "wandb_run_id"
                if not id_file.exists():
                    id_file.write_text(uuid.uuid4().hex[:12])
                self._wandb = wandb.init(project=wandb_project, id=id_file.read_text().strip(),
                                         resume="allow", config=config, dir=str(self.log_path))

    def _note(self, message: str) -> None:
        tqdm.write(f"note: {message}", file=sys.stderr)

    def log(self, step: int, metrics: Metrics) -> None:
        """Record one step's metrics (step is 0-based)."""
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.log_path / "metrics.jsonl", "a") as f:  # closed, so flushed, each step
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        self._bar.update(step + 1 - self._bar.n)
        self._bar.set_postfix({k: _fmt(v) for k, v in list(numbers.items())[:3]}, refresh=False)
        self._rows.append(row)
        if len(self._rows) >= self.table_every or step + 1 >= self.total_steps:
            self._flush_table()

    def _flush_table(self) -> None:
        if self._rows:
            tqdm.write(format_table(self._rows))
            self._rows = []

    def close(self) -> None:
        self._flush_table()
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
