"""The training runs of one model: a hot set attached to the runner, the rest spilled to disk.

Runs can outnumber what the machine should hold: at most `max_resident` runs keep their
adapter (LoRA factors, pending gradients, AdamW or Dimuon state) in memory, attached to a runner
slot. Using a run (`get`) restores it if it was spilled, makes it the most recently used,
and spills the least recently used unpinned runs beyond the limit. A spill is bit-exact:
the run's checkpoint files with its optimizer state (engine/checkpoint.py, the same format
save_state writes) plus its accumulated gradients, so a run that went out and came back
computes exactly what it would have computed had it stayed.

On a GPU, idle runs go first to page-locked host memory (`max_host` of them: a copy each
way, bit-exact, no serialisation) and only the least recently used beyond that to disk.

Pins keep a run resident while work that spans several calls uses it (a pass that packs
several runs, a request split into micro-batches): a pinned run is never spilled, even if
that leaves more than `max_resident` runs in memory for a while.
"""

from __future__ import annotations

import shutil
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.budget import adapter_layer_shapes, free_memory_bytes, resident_runs_budget
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.runner import ModelRunner
from tinsmith.types import NotFound

GRADS_FILE = "grads.safetensors"  # a spill's pending gradients, by parameter index


@dataclass
class _Run:
    adapter: Adapter | None  # None while spilled
    slot: int | None
    spill: Path | None = None  # the spill's folder while spilled to disk
    host: Adapter | None = None  # its copy in pinned host memory while spilled there


class RunPool:
    def __init__(
        self, runner: ModelRunner, spill_dir: Path, max_resident: int, max_host: int | None = None
    ) -> None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.runner = runner
        self.max_resident = max_resident
        # Runs kept in pinned host memory when spilled off a GPU (none on a CPU: a host copy
        # there would just be a second copy in the same memory).
        if max_host is None:
            shapes = adapter_layer_shapes(runner.layers.values())
            on_gpu = runner.device.type == "cuda"
            max_host = resident_runs_budget(shapes, free_memory_bytes(torch.device("cpu")), 0.25) if on_gpu else 0
        self.max_host = max_host
        self.spill_dir = spill_dir
        self._runs: OrderedDict[str, _Run] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self.spills = 0  # counters, for tests and metrics
        self.restores = 0

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._runs

    @property
    def resident(self) -> int:
        """Runs in memory (read by metrics from other threads: list() copies atomically)."""
        return sum(1 for r in list(self._runs.values()) if r.adapter is not None)

    def put(self, run_id: str, adapter: Adapter) -> None:
        """Add (or replace) a run, resident."""
        self.drop(run_id)
        self._runs[run_id] = _Run(adapter, self.runner.attach(adapter))
        self._evict()

    def drop(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        if run.slot is not None:
            self.runner.detach(run.slot)
        if run.spill is not None:
            shutil.rmtree(run.spill, ignore_errors=True)
        run.host = None

    def get(self, run_id: str) -> tuple[Adapter, int]:
        """The run's adapter and slot, restored first if it was spilled."""
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound(f"training run {run_id!r} is not loaded on this server")
        self._runs.move_to_end(run_id)
        if run.adapter is None:
            self._restore(run)
            self._evict()
        assert run.adapter is not None and run.slot is not None
        return run.adapter, run.slot

    @contextmanager
    def pinned(self, run_ids: Iterable[str]) -> Iterator[None]:
        """Keep these runs (the known ones) resident until the block ends."""
        ids = [r for r in dict.fromkeys(run_ids) if r in self._runs]
        self._pins.update(ids)
        try:
            for r in ids:
                self.get(r)
            yield
        finally:
            self._pins.subtract(ids)
            self._pins += Counter()  # drop zero counts
            self._evict()

    def clear(self) -> None:
        for run_id in list(self._runs):
            self.drop(run_id)
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    # ----- spilling -------------------------------------------------------------------
    def _evict(self) -> None:
        over = self.resident - self.max_resident
        for run_id, run in list(self._runs.items()):  # least recently used first
            if over <= 0:
                break
            if run.adapter is not None and not self._pins[run_id]:
                if self.max_host > 0:
                    self._to_host(run)
                else:
                    self._spill(run)
                over -= 1
        hosted = [r for r in self._runs.values() if r.host is not None]
        for run in hosted[: max(0, len(hosted) - self.max_host)]:  # oldest host copies to disk
            run.adapter, run.slot, run.host = run.host, None, None
            self._spill(run)

    def _to_host(self, run: _Run) -> None:
        assert run.adapter is not None and run.slot is not None
        run.host = run.adapter.to_device(torch.device("cpu"), pin=torch.cuda.is_available())
        self.runner.detach(run.slot)
        run.adapter, run.slot = None, None
        self.spills += 1

    def _spill(self, run: _Run) -> None:
        adapter = run.adapter
        assert adapter is not None
        files = adapter_to_files(adapter, self.runner.name, include_optimizer=True)
        grads = {str(i): p.grad for i, p in enumerate(adapter.parameters()) if p.grad is not None}
        files[GRADS_FILE] = safetensors.torch.save(grads)
        folder = write_spill(self.spill_dir, files)
        if run.slot is not None:
            self.runner.detach(run.slot)
            self.spills += 1  # (a host copy moving on to disk was counted when it left)
        run.adapter, run.slot, run.spill = None, None, folder

    def _restore(self, run: _Run) -> None:
        """Back from host memory (a copy) or from disk (the spill's files)."""
        if run.host is not None:
            adapter = run.host.to_device(self.runner.device)
        else:
            assert run.spill is not None
            files = read_spill(run.spill)
            adapter = adapter_from_files(files, self.runner.layers, load_optimizer=True)
            grads = safetensors.torch.load(files[GRADS_FILE])
            for i, p in enumerate(adapter.parameters()):
                g = grads.get(str(i))
                p.grad = None if g is None else g.to(p.device)
        run.adapter, run.slot, run.spill, run.host = adapter, self.runner.attach(adapter), None, None
        self.restores += 1


def write_spill(spill_dir: Path, files: dict[str, bytes]) -> Path:
    """Checkpoint files into a new folder under `spill_dir` (local scratch, not the store)."""
    folder = spill_dir / uuid.uuid4().hex
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def read_spill(folder: Path) -> dict[str, bytes]:
    """A spill's files; the folder is deleted."""
    files = {f.name: f.read_bytes() for f in folder.iterdir()}
    shutil.rmtree(folder, ignore_errors=True)
    return files
