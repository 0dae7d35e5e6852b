"""`tinsmith plan`: memory per device to train LoRA runs on a model (engine/plan.py), as a
table; and `parse_bytes` for its `--device-memory`."""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # engine/device.py DTYPES, without importing torch

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """`80GiB`, `80GB`, `141e9`, `512 MiB` -> bytes (GB = 10^9, GiB = 2^30)."""
    number = text.strip().rstrip("BbIiKkMmGgTt ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 80GiB, 80GB, 141e9)") from None


def cmd_plan(args: argparse.Namespace) -> int:
    """Per-device memory of a training pass, from each model's config (engine/plan.py)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from tinsmith.cli import format_bytes
    from tinsmith.engine.budget import free_memory_bytes
    from tinsmith.engine.device import DTYPES
    from tinsmith.engine.plan import max_pass_tokens, model_facts, plan_memory

    device = args.device_memory
    if device is None:  # this machine's first GPU, else the host's free memory
        device = free_memory_bytes(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    n, k, r, t = args.devices, args.runs, args.rank, args.pass_tokens
    table = Table(title=f"Memory per device: {n} x {format_bytes(device)}, {args.dtype} weights, "
                        f"{k} LoRA run{'s' * (k != 1)} of rank {r}, a pass of {t:,} tokens "
                        f"({-(-t // n):,} a device)")
    for col in ("model", "params", "weights", "adapters", "FSDP gather", "activations",
                "logits", "total", "largest pass"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in args.model:
        facts = model_facts(name, DTYPES[args.dtype])
        plan = plan_memory(facts, pass_tokens=t, devices=n, runs=k, rank=r)
        most = max_pass_tokens(facts, device, devices=n, runs=k, rank=r)
        total = format_bytes(plan.total)
        params = (f"{facts.params / 1e9:.2f}B" if facts.params >= 1e9
                  else f"{facts.params / 1e6:.1f}M")
        table.add_row(name, params, *(format_bytes(b) for b in (
            plan.weights, plan.adapters, plan.gathered, plan.activations, plan.logits)),
            total if plan.total <= device else f"[red]{total}[/red]",
            f"{most:,} tokens" if most else "[red]does not fit[/red]")
    console = Console(width=max(Console().width, 140))
    console.print(table)
    console.print("weights, adapters (float32 factors, gradients, AdamW moments) and activations "
                  "(the tensors a pass saves) as engine/plan.py counts them; not counted: the "
                  "CUDA context, allocator fragmentation, the sampler's KV cache.", style="dim")
    return 0
