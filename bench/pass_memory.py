"""Activation memory of one training pass, measured against the estimate the pass budget uses.

For each batch shape, one forward + backward of a rank-8 adapter over random tokens, in this
process: the peak resident memory above what was resident before the pass (Linux VmHWM, reset
through /proc/self/clear_refs before each pass) over the tokens of the pass, next to
`engine.budget.activation_bytes_per_token` (which should be the larger: it is an upper
estimate, so the budget derived from it never lets a pass outgrow its share of memory).

    python bench/pass_memory.py                                 # bundled SmolLM2-135M
    python bench/pass_memory.py --model tinsmith/tiny-test --shapes 4x64 8x128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from tinsmith.config import DEFAULT_MODEL
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.budget import activation_bytes_per_token
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import DatumIn, LoraSpec

STATUS = Path("/proc/self/status")


def _status_mib(field: str) -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in {STATUS}")


def measure(runner: ModelRunner, slot: int, rows: int, width: int, vocab: int) -> float:
    """Peak MiB above the resident baseline during one forward + backward of rows x width."""
    rng = np.random.default_rng(rows * 1000 + width)
    data = [(slot, DatumIn(rng.integers(3, vocab, width),
                           {"target_tokens": rng.integers(3, vocab, width)})) for _ in range(rows)]
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    lps = runner.target_logprobs(data, grad=True)
    torch.stack([lp.sum() for lp in lps]).sum().backward()
    return _status_mib("VmHWM") - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--shapes", nargs="+", default=["1x128", "4x128", "8x128", "8x256"],
                    help="ROWSxWIDTH batches, measured in this order")
    args = ap.parse_args()
    if not STATUS.exists():
        print("needs Linux /proc to read peak memory", file=sys.stderr)
        return 2
    runner = ModelRunner(resolve_model_dir(args.model), args.model)
    adapter = Adapter.create(LoraSpec(rank=8, seed=0), runner.layers)
    slot = runner.attach(adapter)
    estimate = activation_bytes_per_token(runner.config) / 2**20
    measure(runner, slot, 1, 16, runner.vocab_size)  # warm-up: allocator pools, kernels
    print(f"model {args.model}: estimate {estimate * 1024:.0f} KiB a token")
    print("| pass (rows x width) | tokens | peak above baseline | per token | estimate / measured |")
    print("|---|---|---|---|---|")
    for i, shape in enumerate(args.shapes):
        rows, width = (int(x) for x in shape.lower().split("x"))
        started = time.perf_counter()
        adapter.zero_grad()
        peak = measure(runner, slot, rows, width, runner.vocab_size)
        tokens = rows * width
        per_token = peak / tokens
        print(f"| {rows} x {width} | {tokens} | {peak:.0f} MiB | {per_token * 1024:.0f} KiB "
              f"| {estimate / per_token:.2f} |")
        print(f"  [{i + 1}/{len(args.shapes)}] {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
