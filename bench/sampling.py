"""Native sampler throughput, in process: the preallocated-slab path against the old
DynamicCache path and plain Hugging Face `generate`, side by side in one run.

N concurrent requests (default 32) of P-token prompts (default 128, seeded random ids) each
generate T tokens (default 64; no stop tokens, so every row runs to T). Arms:
  slab        Sampler(kv_cache="slab", cuda_graphs="off"): all N admitted at once, stepped
              until done (the eager slab step)
  static      the same with cuda_graphs="on": the static-shape step (engine/graph_decode.py),
              replayed from CUDA graphs on a GPU, run eagerly on a CPU (--no-static skips)
  dynamic     Sampler(kv_cache="dynamic"): the same, on the DynamicCache batch
  generate    model.generate on the [N, P] batch (greedy, min_new_tokens=T)
  sequential  the slab sampler, the same N requests one after another (--no-sequential skips)
Arms alternate for `--repeats` rounds; medians of generated tokens/s are printed, with
ratios against `slab`. Then the decode phase alone is compared with the slab's, the static
step's and the dynamic path's steps alternated one by one, which a busy machine's drifting load affects
alike (--no-interleaved skips it). Greedy decoding, so the table also says whether the arms' tokens
agree (batched rows round differently, so a near-tie can flip a token; a count near zero
shows the arms computed the same thing).

    .venv/bin/python bench/sampling.py                      # bundled SmolLM2-135M
    .venv/bin/python bench/sampling.py --tiny --max-tokens 4  # seconds: a dry run
    .venv/bin/python bench/sampling.py --device cuda --dtype bfloat16  # on a GPU
    .venv/bin/python bench/sampling.py --tiny --choice-split --max-tokens 20  # model vs token choice
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoTokenizer

from tinsmith.config import DEFAULT_MODEL
from tinsmith.engine.device import placement
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import SampleSpec

TINY = "tinsmith/tiny-test"


def progress(msg: str) -> None:
    print(f"\r[bench] {msg:<70}", end="", file=sys.stderr, flush=True)


def specs(vocab: int, n: int, prompt_len: int, max_tokens: int) -> list[SampleSpec]:
    rng = np.random.default_rng(0)
    return [
        SampleSpec(prompt=rng.integers(100, vocab - 100, prompt_len).astype(np.int64),
                   max_tokens=max_tokens, temperature=0.0)
        for _ in range(n)
    ]


def run_sampler(runner: ModelRunner, tok, reqs: list[SampleSpec], kv_cache: str, label: str,
                prefill_chunk: int, graphs: str = "off") -> list[list[int]]:
    sampler = Sampler(runner, tok, kv_cache=kv_cache, prefill_chunk=prefill_chunk, cuda_graphs=graphs)
    boxes: list[list] = [[] for _ in reqs]
    for i, (spec, box) in enumerate(zip(reqs, boxes)):
        if i % 8 == 7 or i + 1 == len(reqs):
            progress(f"{label}: prefill {i + 1}/{len(reqs)}")
        sampler.admit(None, spec, box.append)
    steps = 0
    while sampler.pending:
        sampler.step()
        steps += 1
        if steps % 8 == 0:
            progress(f"{label}: step {steps}/{reqs[0].max_tokens - 1}")
    return [list(map(int, b[0].sequences[0].tokens)) for b in boxes]


def interleaved_decode(runner: ModelRunner, tok, reqs: list[SampleSpec], prefill_chunk: int,
                       static: bool) -> dict[str, float]:
    """Decode-phase seconds of the slab, static and dynamic paths, their steps alternated so
    that a busy machine's drifting load falls on all alike (prefills not timed)."""
    arms = {"slab": ("slab", "off"), "static": ("slab", "on"), "dynamic": ("dynamic", "off")}
    if not static:
        del arms["static"]
    samplers = {arm: Sampler(runner, tok, kv_cache=kv, prefill_chunk=prefill_chunk, cuda_graphs=g)
                for arm, (kv, g) in arms.items()}
    for kv, sampler in samplers.items():
        for spec in reqs:
            sampler.admit(None, spec, lambda out: None)
    spent = dict.fromkeys(samplers, 0.0)
    steps = 0
    while any(s.pending for s in samplers.values()):
        for kv, sampler in samplers.items():
            t0 = time.perf_counter()
            sampler.step()
            spent[kv] += time.perf_counter() - t0
        steps += 1
        if steps % 8 == 0:
            progress(f"interleaved decode: step {steps}/{reqs[0].max_tokens - 1}")
    return spent


def run_sequential(runner: ModelRunner, tok, reqs: list[SampleSpec], prefill_chunk: int,
                   graphs: str = "off") -> list[list[int]]:
    sampler = Sampler(runner, tok, kv_cache="slab", prefill_chunk=prefill_chunk, cuda_graphs=graphs)
    out = []
    for i, spec in enumerate(reqs):
        if i % 8 == 7:
            progress(f"sequential: request {i + 1}/{len(reqs)}")
        out.append(list(map(int, sampler.sample(None, spec).sequences[0].tokens)))
    return out


def choice_split(runner: ModelRunner, tok, n: int, steps: int, graphs: str) -> None:
    """Per decoding step of n rows (16-token random prompts): the model step vs the rest
    (host-side token choice, bookkeeping), greedy and seeded temperature 1, with the
    requests choosing one after another and in 2 threads (identical draws)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, runner.vocab_size - 100, 16).astype(np.int64) for _ in range(n)]
    for label, kw in (("greedy", {"temperature": 0.0}), ("seeded t=1", {"temperature": 1.0, "seed": 1})):
        for threads in (0, 2):
            sampler = Sampler(runner, tok, cuda_graphs=graphs, pick_threads=threads)
            for p in prompts:
                sampler.admit(None, SampleSpec(prompt=p, max_tokens=steps + 4, **kw), lambda out: None)
            batch, spent = sampler.batch, [0.0]
            forward = batch.forward

            def timed_forward(forward=forward, spent=spent) -> torch.Tensor:
                t0 = time.perf_counter()
                out = forward()
                spent[0] += time.perf_counter() - t0
                return out

            batch.forward = timed_forward  # type: ignore[method-assign]
            for _ in range(2):
                sampler.step()
            spent[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                sampler.step()
            total = (time.perf_counter() - t0) / steps * 1e3
            model = spent[0] / steps * 1e3
            print(f"choice split, {n} rows, {label}, {threads} choice threads: step {total:.1f} ms = "
                  f"model {model:.1f} ms + rest {total - model:.1f} ms")
            while sampler.pending:
                sampler.step()


def run_generate(runner: ModelRunner, reqs: list[SampleSpec]) -> list[list[int]]:
    progress("generate: running")
    ids = torch.as_tensor(np.stack([r.prompt for r in reqs])).to(runner.device)
    t = reqs[0].max_tokens
    with torch.inference_mode():
        out = runner.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=t, min_new_tokens=t, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tiny", action="store_true", help=f"use {TINY}")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--no-static", action="store_true", help="skip the static-step (graph) arms")
    ap.add_argument("--choice-split", action="store_true",
                    help="only time the model step vs host-side token choice (see choice_split)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-interleaved", action="store_true",
                    help="skip the decode-only comparison with alternating slab/dynamic steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = TINY if args.tiny else args.model
    runner = ModelRunner(resolve_model_dir(name), name, placement(args.device, args.dtype))
    tok = AutoTokenizer.from_pretrained(runner.model_dir)
    if args.choice_split:
        choice_split(runner, tok, args.requests, args.max_tokens, "off" if args.no_static else "on")
        return
    reqs = specs(runner.vocab_size, args.requests, args.prompt_len, args.max_tokens)
    arms: dict[str, Callable[[], list[list[int]]]] = {
        "slab": lambda: run_sampler(runner, tok, reqs, "slab", "slab", args.prefill_chunk),
        "static": lambda: run_sampler(runner, tok, reqs, "slab", "static", args.prefill_chunk, "on"),
        "dynamic": lambda: run_sampler(runner, tok, reqs, "dynamic", "dynamic", args.prefill_chunk),
        "generate": lambda: run_generate(runner, reqs),
    }
    if args.no_static:
        del arms["static"]
    if not args.no_sequential:
        arms["sequential"] = lambda: run_sequential(runner, tok, reqs, args.prefill_chunk)
        if not args.no_static:
            arms["sequential static"] = lambda: run_sequential(runner, tok, reqs, args.prefill_chunk, "on")
    warm = specs(runner.vocab_size, 2, 8, 2)  # one-time costs (kernels, lazy inits) out of the figures
    for kv in ("slab", "dynamic"):
        run_sampler(runner, tok, warm, kv, f"warm-up {kv}", args.prefill_chunk)
    if not args.no_static:
        run_sampler(runner, tok, warm, "slab", "warm-up static", args.prefill_chunk, "on")
    run_generate(runner, warm)
    times: dict[str, list[float]] = {k: [] for k in arms}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        for arm, fn in arms.items():
            t0 = time.perf_counter()
            tokens[arm] = fn()
            times[arm].append(time.perf_counter() - t0)
            progress(f"round {r + 1}/{args.repeats}: {arm} {times[arm][-1]:.2f} s")
    print(file=sys.stderr)
    generated = args.requests * args.max_tokens
    base = statistics.median(times["slab"])
    print(f"{name}: {args.requests} requests x {args.prompt_len}-token prompts x {args.max_tokens} "
          f"new tokens, {torch.get_num_threads()} threads, device {runner.device}, "
          f"median of {args.repeats}")
    print(f"{'arm':<18}{'seconds':>10}{'tokens/s':>12}{'slab tok/s / arm tok/s':>24}{'seqs != slab':>14}")
    for arm in arms:
        s = statistics.median(times[arm])
        diff = sum(a != b for a, b in zip(tokens[arm], tokens["slab"]))
        print(f"{arm:<18}{s:>10.2f}{generated / s:>12.1f}{s / base:>23.2f}x{diff:>14}")
    if not args.no_interleaved:
        spent = interleaved_decode(runner, tok, reqs, args.prefill_chunk, not args.no_static)
        print(file=sys.stderr)
        decoded = args.requests * (args.max_tokens - 1)  # the first token comes from the prefill
        rates = ", ".join(f"{arm} {decoded / t:.1f} tok/s" for arm, t in spent.items())
        ratios = ", ".join(f"{arm}/slab {spent['slab'] / t:.2f}x" for arm, t in spent.items() if arm != "slab")
        print(f"decode steps alternated (prefill not timed): {rates}; {ratios}")


if __name__ == "__main__":
    main()
