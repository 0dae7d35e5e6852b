"""Packed training passes, engine level: R runs' forward+backward in one pass with shared
base GEMMs, the same with exact (per-request block) packing, and the runs one after another.

The three arms run in one process on one runner each, alternating round by round, and the
medians are printed with their ratio to the sequential arm. This is what decides the CPU
default of `--exact-packing` (docs/gpu.md):

    .venv/bin/python bench/packing.py                          # bundled model, 4 runs of 2 x 64
    .venv/bin/python bench/packing.py --runs 8 --rows 2 --tokens 64 --device cuda --dtype bfloat16 \\
        --model synthetic/llama-3.2-1b
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from tinsmith.config import DEFAULT_MODEL
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.device import placement, synchronize
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import DatumIn, LoraSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2, help="datums per run's request")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per datum")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    where = placement(args.device, args.dtype)
    model_dir = resolve_model_dir(args.model)
    rng = np.random.default_rng(0)

    def request() -> list[DatumIn]:
        out = []
        for _ in range(args.rows):
            t = rng.integers(3, 256, size=args.tokens + 1)
            out.append(DatumIn(t[:-1], {"target_tokens": t[1:]}))
        return out

    arms = {}
    for exact in (False, True):
        runner = ModelRunner(model_dir, args.model, where, exact_packing=exact)
        slots = [runner.attach(Adapter.create(LoraSpec(rank=args.rank, seed=i), runner.layers))
                 for i in range(args.runs)]

        def packed(runner: ModelRunner = runner, slots: list[int] = slots) -> None:
            rows, owner = [], []
            for i, s in enumerate(slots):
                rows += [(s, d) for d in request()]
                owner += [i] * args.rows
            lps = runner.target_logprobs(rows, grad=True, parts=owner)
            torch.stack([-lp.sum() for lp in lps]).sum().backward()

        def sequential(runner: ModelRunner = runner, slots: list[int] = slots) -> None:
            for s in slots:
                lps = runner.target_logprobs([(s, d) for d in request()], grad=True)
                torch.stack([-lp.sum() for lp in lps]).sum().backward()

        arms["exact packed" if exact else "shared packed"] = packed
        if exact:
            arms["one after another"] = sequential
    times: dict[str, list[float]] = {k: [] for k in arms}
    for fn in arms.values():  # warm-up
        fn()
    for rep in range(args.repeats):
        for name, fn in arms.items():
            synchronize(where.device)
            t = time.perf_counter()
            fn()
            synchronize(where.device)
            times[name].append(time.perf_counter() - t)
        print(f"round {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              flush=True)
    base = statistics.median(times["one after another"])
    tokens = args.runs * args.rows * args.tokens
    print(f"\n{args.model} on {where.device} ({where.dtype}), {args.runs} runs x {args.rows} x {args.tokens} "
          f"tokens, rank {args.rank}, forward+backward, medians of {args.repeats}")
    print("| arm | median | tokens/s | speed vs one after another |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} s | {tokens / m:,.0f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
