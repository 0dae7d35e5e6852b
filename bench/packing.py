"""Packed training passes, engine level: R runs' forward+backward in one pass with shared
base GEMMs, the same with exact (per-request block) packing, the runs one after another, and
plain transformers + PEFT taking the same R steps one after another.

The arms run in one process, alternating round by round, and the medians are printed with
their ratio to the one-after-another arm. Each arm's kernel launches (operators dispatched,
views and metadata left out) are counted once, apart from the timed rounds: a small step on
a GPU costs about one launch-and-overhead per kernel whatever its size, so the launch ratio
is what packing can gain where steps are launch-bound, on any device. This is what decides
the CPU default of `--exact-packing` (docs/gpu.md).

`--thin` keeps the named model's layout (layers, projections, heads ratio, tied head) at
hidden size 64 and a 512-token vocabulary: compute is then negligible and the host time per
arm is its launch overhead, measurable on a CPU.

    .venv/bin/python bench/packing.py                          # bundled model, 4 runs of 2 x 64
    .venv/bin/python bench/packing.py --thin --model synthetic/llama-3.2-1b --runs 8 --dtype bfloat16
    .venv/bin/python bench/packing.py --runs 8 --rows 2 --tokens 64 --device cuda --dtype bfloat16 \\
        --model synthetic/llama-3.2-1b
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinsmith.config import DEFAULT_MODEL
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.device import Placement, placement, synchronize
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import DatumIn, LoraSpec

# Operators that launch no kernel: views, aliases and allocations.
NO_KERNEL = {"view", "_unsafe_view", "select", "slice", "transpose", "t", "as_strided", "expand",
             "unsqueeze", "squeeze", "permute", "alias", "detach", "unbind", "split",
             "split_with_sizes", "reshape", "narrow", "_reshape_alias", "diagonal", "unfold",
             "chunk", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "_record_function_enter_new", "_record_function_exit", "view_as"}


class LaunchCounter(TorchDispatchMode):
    """Counts the operators dispatched inside it (by name), those in NO_KERNEL left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_launches(fn: Callable[[], None], where: Placement | None = None) -> int:
    """Kernels `fn` launches: on a GPU, the device kernels the profiler records (compiled code
    included); elsewhere, the operators dispatched (LaunchCounter)."""
    if where is not None and where.device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    with LaunchCounter() as counter:
        fn()
    return counter.total


def thin_folder(model: str, out: Path) -> Path:
    """A synthetic folder with `model`'s layout at hidden 64 and a 512-token vocabulary."""
    from tinsmith.models.synthetic import PREFIX, write_folder

    if not model.startswith(PREFIX):
        raise SystemExit(f"--thin needs a synthetic/* model, got {model}")
    write_folder(model[len(PREFIX):], out)
    cfg = json.loads((out / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    cfg.update(hidden_size=64, intermediate_size=256, num_attention_heads=4, head_dim=16,
               num_key_value_heads=max(1, 4 * kv // heads), vocab_size=512)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def plain_peft(cfg, device: str | torch.device, dtype: torch.dtype, rank: int,
               alpha: float | None = None) -> torch.nn.Module:
    """transformers + PEFT as a user would train one run: random weights of `cfg` built on
    `device`, LoRA of `rank` (alpha: the rank) on all linear layers. Also the GPU check's
    plain baseline (bench/gpu/phases.py)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                                            target_modules="all-linear", lora_dropout=0.0))


ARMS = ("shared packed", "shared packed, compiled", "exact packed", "one after another",
        "plain PEFT, one after another")


def measure(model_dir: Path, model: str, where: Placement, *, runs: int, rows: int, tokens: int,
            rank: int, repeats: int, arms: Sequence[str] = ARMS,
            progress: Callable[[str], None] = print) -> dict[str, tuple[float, int | None]]:
    """Each of `arms`' median forward+backward seconds over `repeats` alternating rounds and
    its kernel launches (counted once, after a warm-up; None where not countable: a compiled
    arm on a CPU), by arm name. "shared packed, compiled" is `--compile-passes` (inductor):
    its warm-up compiles."""
    vocab = int(json.loads((model_dir / "config.json").read_text()).get("vocab_size", 256))
    rng = np.random.default_rng(0)

    def request() -> list[DatumIn]:
        out = []
        for _ in range(rows):
            t = rng.integers(3, min(256, vocab), size=tokens + 1)
            out.append(DatumIn(t[:-1], {"target_tokens": t[1:]}))
        return out

    def engine(exact: bool, compiled: bool) -> tuple[ModelRunner, list[int], list[Adapter]]:
        runner = ModelRunner(model_dir, model, where, exact_packing=exact,
                             compile_passes="inductor" if compiled else None)
        adapters = [Adapter.create(LoraSpec(rank=rank, seed=i), runner.layers) for i in range(runs)]
        return runner, [runner.attach(a) for a in adapters], adapters

    def packed(runner: ModelRunner, slots: list[int], adapters: list[Adapter]) -> None:
        batch, owner = [], []
        for i, s in enumerate(slots):
            batch += [(s, d) for d in request()]
            owner += [i] * rows
        lps = runner.target_logprobs(batch, grad=True, parts=owner)
        torch.stack([-lp.sum() for lp in lps]).sum().backward()
        for a in adapters:
            a.zero_grad()

    def sequential(runner: ModelRunner, slots: list[int], adapters: list[Adapter]) -> None:
        for s, a in zip(slots, adapters):
            lps = runner.target_logprobs([(s, d) for d in request()], grad=True)
            torch.stack([-lp.sum() for lp in lps]).sum().backward()
            a.zero_grad()

    engines: dict[tuple[bool, bool], tuple[ModelRunner, list[int], list[Adapter]]] = {}
    fns: dict[str, Callable[[], None]] = {}
    for name in arms:
        if name == "plain PEFT, one after another":
            from transformers import AutoConfig

            plain = plain_peft(AutoConfig.from_pretrained(model_dir), where.device, where.dtype, rank)

            def peft_steps(plain: torch.nn.Module = plain) -> None:
                for _ in range(runs):
                    ids = torch.as_tensor(np.stack([d.tokens for d in request()])).to(where.device)
                    plain(input_ids=ids, labels=ids).loss.backward()
                    plain.zero_grad(set_to_none=True)

            fns[name] = peft_steps
            continue
        key = (name in ("exact packed", "one after another"), name == "shared packed, compiled")
        if key not in engines:
            engines[key] = engine(*key)
        fns[name] = partial(sequential if name == "one after another" else packed, *engines[key])
    launches: dict[str, int | None] = {}
    for name, fn in fns.items():  # also the warm-up
        fn()
        compiled = name == "shared packed, compiled"
        if compiled and not engines[False, True][0].compiled.enabled:  # type: ignore[union-attr]
            raise RuntimeError("--compile-passes: compilation failed (logged above); no compiled arm")
        launches[name] = None if compiled and where.device.type != "cuda" else count_launches(fn, where)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        for name, fn in fns.items():
            synchronize(where.device)
            t = time.perf_counter()
            fn()
            synchronize(where.device)
            times[name].append(time.perf_counter() - t)
        progress(f"round {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    return {k: (statistics.median(v) if v else float("nan"), launches[k]) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--thin", action="store_true", help="the model's layout at hidden 64 (launch-bound)")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2, help="datums per run's request")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per datum")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-peft", action="store_true", help="leave out the plain PEFT arm")
    ap.add_argument("--compiled", action="store_true", help="add the --compile-passes arm (it compiles first)")
    args = ap.parse_args()

    where = placement(args.device, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = thin_folder(args.model, Path(tmp)) if args.thin else resolve_model_dir(args.model)
        arms = measure(model_dir, args.model, where, runs=args.runs, rows=args.rows, tokens=args.tokens,
                       rank=args.rank, repeats=args.repeats, progress=lambda m: print(m, flush=True),
                       arms=[a for a in ARMS if (a != "shared packed, compiled" or args.compiled)
                             and (a != "plain PEFT, one after another" or not args.no_peft)])
    base, base_launches = arms["one after another"]
    tokens = args.runs * args.rows * args.tokens
    thin = " (thin: hidden 64, vocabulary 512)" if args.thin else ""
    print(f"\n{args.model}{thin} on {where.device} ({where.dtype}), {args.runs} runs x {args.rows} x "
          f"{args.tokens} tokens, rank {args.rank}, forward+backward, medians of {args.repeats}")
    print("| arm | median | tokens/s | speed vs one after another | kernel launches | launches vs one after another |")
    print("|---|---|---|---|---|---|")
    for name, (m, launches) in arms.items():
        fewer = "-" if launches is None or base_launches is None else f"{base_launches / launches:.2f}x fewer"
        print(f"| {name} | {m:.3f} s | {tokens / m:,.0f} | {base / m:.2f}x | "
              f"{'-' if launches is None else f'{launches:,}'} | {fewer} |")


if __name__ == "__main__":
    main()
