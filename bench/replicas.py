"""Engine replicas: training throughput of N concurrent clients (one run each) against
`tinsmith serve --replicas 2`, over the same clients against one engine, in the same bench
run, with real SDK clients over HTTP (docs/scale-out.md, Replicas).

Arms (each its own `tinsmith serve` process, all up side by side, measured in turn for
`--repeats` rounds; medians compared):
  single      --replicas 1: today's single-process engine (the baseline)
  one group   --sharded: one rank group of one process (the replicas' building block alone,
              so the group's own overhead shows apart from the gain of a second replica; its
              rank uses every core, where each replica's ranks get their share of them)
  2 replicas  --replicas 2: two rank groups, the runs placed on both

Every client takes `--steps` pipelined forward_backward + optim_step steps on its own run
(seeded alike in every arm), so all arms compute the same thing: the table says the largest
difference of their losses from the baseline's. A replica gains only where the machine has
the cores (or GPUs) to compute two passes at once: on a CPU box shared with other work, expect
little or none.

    python bench/replicas.py --model tinsmith/tiny-test
    python bench/replicas.py --model tinsmith/tiny-test --clients 4 --batch 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np
import tinker
from step_overhead import make_batch, start_server
from tinker import types

from tinsmith.config import DEFAULT_MODEL

ARMS = {"single": ["--replicas", "1"], "one group": ["--sharded"], "2 replicas": ["--replicas", "2"]}


def round_of(sc: tinker.ServiceClient, model: str, clients: int, data: list[types.Datum],
             steps: int) -> tuple[float, list[list[float]]]:
    """`clients` fresh runs (seeds 0..clients-1), one thread each, all at once: wall time
    from the first step to the last result, and each run's losses."""
    runs = [sc.create_lora_training_client(base_model=model, rank=8, seed=k).result()
            for k in range(clients)]
    adam = types.AdamParams(learning_rate=1e-3)

    def run(tc: tinker.TrainingClient) -> list[float]:
        losses = []
        for _ in range(steps):
            fb, opt = tc.forward_backward(data, "cross_entropy"), tc.optim_step(adam)
            losses.append(fb.result().metrics["loss:sum"])
            opt.result()
        return losses

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(run, runs))
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="datums per request")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per datum")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-args", default="", help="extra `tinsmith serve` flags for every arm")
    args = ap.parse_args()

    procs = []
    try:
        with tempfile.TemporaryDirectory(prefix="tinsmith-bench-replicas-") as tmp:
            urls = {}
            for name, flags in ARMS.items():
                proc, url = start_server(args.model, Path(tmp) / name.replace(" ", "-"),
                                         [*flags, *args.server_args.split()],
                                         log=Path(tmp) / f"{name.replace(' ', '-')}.log")
                procs.append(proc)
                urls[name] = url
            clients = {n: tinker.ServiceClient(base_url=u, api_key="tml-local") for n, u in urls.items()}
            vocab = clients["single"].create_lora_training_client(
                base_model=args.model, rank=2).result().get_tokenizer().vocab_size
            data = make_batch(vocab, args.batch, args.seq_len)
            tokens = args.clients * args.steps * args.batch * args.seq_len
            for name, sc in clients.items():  # warm-up: first passes allocate and compile
                round_of(sc, args.model, args.clients, data, 1)
            times: dict[str, list[float]] = {n: [] for n in ARMS}
            losses: dict[str, list[list[float]]] = {}
            for _ in range(args.repeats):
                for name, sc in clients.items():
                    seconds, out = round_of(sc, args.model, args.clients, data, args.steps)
                    times[name].append(seconds)
                    losses[name] = out
            base = statistics.median(times["single"])
            print(f"\n{args.clients} clients x {args.steps} steps x {args.batch} datums x "
                  f"{args.seq_len} tokens, {args.model}, {os.cpu_count()} CPU cores, "
                  f"median of {args.repeats}\n")
            print("| arm | seconds | tokens/s | vs single | max loss difference vs single |")
            print("|---|---|---|---|---|")
            for name in ARMS:
                t = statistics.median(times[name])
                diff = np.max(np.abs(np.asarray(losses[name]) - np.asarray(losses["single"])))
                print(f"| {name} | {t:.2f} | {tokens / t:.0f} | **{base / t:.2f}x** | {diff:.1e} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
