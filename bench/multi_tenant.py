"""Multi-tenant engine figures, each a ratio of two arms run side by side against one
`tinsmith serve` process, with real SDK clients over HTTP.

Sampling (continuous batching):
  concurrent/sequential  N sample requests all in flight at once, against the same N sent one
                         after another (each waits for the previous).   goal >= 4x at N=32
  mixed/single adapter   N concurrent requests spread over 4 sampler adapters, against the
                         same N on one adapter.                          goal >= 0.7x
Arms alternate for `--repeats` rounds and the medians are compared. Requests are seeded:
the sequential arm must return the same tokens on every round, and the table says how many
of the concurrent arm's requests differ from it. Batched rows round differently from a row
decoded alone (logits within ~1e-6 relative), so at temperature 1 an occasional draw that sits
on a CDF boundary flips and the rest of that sequence differs; a count near zero shows the
arms computed the same thing.

Training (several runs' requests packed into one engine pass):
  N runs concurrent/sequential  N runs, each a client thread taking `--train-steps` pipelined
                         forward_backward + optim_step steps, all at once against the same
                         steps run by one run after another. Two sets of N runs with the same
                         seeds, one per arm, so their losses must match.
                         goal with small batches: 4 runs >= 1.5x; with large: >= 0.95x
  fairness               slowest/fastest run's throughput in a concurrent round; goal >= 0.8
  memory                 the server's peak resident memory after each row (it only grows)
  paused clients         N runs that each pause after every step (as RL reward computation
                         does): the ideal overlapped time over the measured one. goal >= 0.8

    python bench/multi_tenant.py                               # bundled SmolLM2-135M
    python bench/multi_tenant.py --model tinsmith/tiny-test --requests 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np
import tinker
from step_overhead import make_batch, start_server
from tinker import types
from tqdm import tqdm

from tinsmith.config import DEFAULT_MODEL

Call = tuple[tinker.SamplingClient, types.ModelInput, types.SamplingParams]


def trained_samplers(sc: tinker.ServiceClient, model: str, vocab: int, count: int) -> list[tinker.SamplingClient]:
    """`count` sampler adapters, each from its own run after one real training step."""
    out = []
    for k in range(count):
        tc = sc.create_lora_training_client(base_model=model, rank=8, seed=k).result()
        tc.forward_backward(make_batch(vocab, 2, 32), "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        out.append(tc.save_weights_and_get_sampling_client().result())
    return out


def make_calls(samplers: list[tinker.SamplingClient], vocab: int, n: int, prompt_len: int,
               max_tokens: int) -> list[Call]:
    """n seeded requests of `max_tokens` tokens (no stop tokens, so every arm decodes alike),
    prompts of prompt_len +- 50%, round-robin over `samplers`."""
    rng = np.random.default_rng(0)
    calls = []
    for i in range(n):
        length = int(rng.integers(prompt_len // 2, prompt_len * 3 // 2 + 1))
        prompt = types.ModelInput.from_ints(rng.integers(3, vocab, size=length).tolist())
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, stop=[])
        calls.append((samplers[i % len(samplers)], prompt, params))
    return calls


def sequential(calls: list[Call]) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = [s.sample(p, 1, sp).result().sequences[0].tokens for s, p, sp in calls]
    return time.perf_counter() - t0, out


def concurrent(calls: list[Call]) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    futures = [s.sample(p, 1, sp) for s, p, sp in calls]
    out = [f.result().sequences[0].tokens for f in futures]
    return time.perf_counter() - t0, out


def train_arm(clients: list[tinker.TrainingClient], data: list[types.Datum], steps: int,
              together: bool, pause: float = 0.0) -> tuple[float, list[list[float]]]:
    """Every client takes `steps` steps; all at once (one thread each) or one after another.
    With `pause`, a client waits that long after each step (as reward computation would)."""
    adam = types.AdamParams(learning_rate=1e-4)

    durations: list[float] = []  # each client's own time, first submission to last result

    def run(tc: tinker.TrainingClient) -> list[float]:
        losses = []
        started = time.perf_counter()
        for _ in range(steps):
            fb, opt = tc.forward_backward(data, "cross_entropy"), tc.optim_step(adam)
            losses.append(fb.result().metrics["loss:sum"])
            opt.result()
            time.sleep(pause)
        durations.append(time.perf_counter() - started)
        return losses

    t0 = time.perf_counter()
    if together:
        with ThreadPoolExecutor(len(clients)) as pool:
            out = list(pool.map(run, clients))
        # Fairness: every client did the same work, so slowest/fastest throughput is
        # shortest/longest duration.
        FAIRNESS.setdefault(len(clients), []).append(min(durations) / max(durations))
    else:
        out = [run(tc) for tc in clients]
    return time.perf_counter() - t0, out


FAIRNESS: dict[int, list[float]] = {}  # runs -> slowest/fastest throughput per concurrent round


def peak_rss_gib(pid: int) -> float:
    """The server's peak resident memory so far (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def compare(name: str, base: tuple[str, Callable[[], tuple[float, list]]],
            new: tuple[str, Callable[[], tuple[float, list]]], repeats: int, goal: float,
            tokens: int, same: bool, check_repeats: bool = True) -> str:
    """Alternate the two arms; one table row (ratio = base / new time). With `check_repeats`
    each arm must repeat its own results exactly; with `same`, the arms run the same work and
    the row says how many results differ."""
    times: dict[str, list[float]] = {base[0]: [], new[0]: []}
    results: dict[str, list] = {}
    for _ in tqdm(range(repeats), desc=name, leave=False):
        for label, arm in (base, new):
            seconds, out = arm()
            times[label].append(seconds)
            if check_repeats and label in results and results[label] != out:
                raise SystemExit(f"{name}: arm {label!r} returned different tokens on a repeat")
            results[label] = out
    b, n = statistics.median(times[base[0]]), statistics.median(times[new[0]])
    ratio = b / n
    agree = ""
    if same:
        differ = sum(x != y for x, y in zip(results[base[0]], results[new[0]]))
        agree = f" ({differ} of {len(results[new[0]])} differ)"
    verdict = f">= {goal}x {'met' if ratio >= goal else 'MISSED'}" if goal else "-"
    return (f"| {name}{agree} | {base[0]} {b:.2f} s ({tokens / b:.0f} tok/s) | {new[0]} {n:.2f} s "
            f"({tokens / n:.0f} tok/s) | **{ratio:.2f}x** | {verdict} |")


def overlap_row(n: int, clients: list[list[tinker.TrainingClient]], data: list[types.Datum],
                steps: int, pause: float, repeats: int) -> str:
    """Paused clients: the ideal time of n clients that each pause `pause` s after every step
    is max(engine-bound, client-bound) = max(T, T / n + steps * pause), with T the n runs'
    steps back to back without pauses (measured in the same round); the figure is that ideal
    over the measured concurrent time with pauses (1.0 = the engine never idles needlessly)."""
    ideal, real = [], []
    for _ in tqdm(range(repeats), desc=f"overlap, {n} runs", leave=False):
        t_seq, _ = train_arm(clients[0], data, steps, False)
        t_conc, _ = train_arm(clients[1], data, steps, True, pause)
        ideal.append(max(t_seq, t_seq / n + steps * pause))
        real.append(t_conc)
    i, r = statistics.median(ideal), statistics.median(real)
    verdict = f">= 0.8x {'met' if i / r >= 0.8 else 'MISSED'}"
    return (f"| training, {n} runs pausing {pause:g} s after each step | ideal overlap {i:.2f} s "
            f"| concurrent {r:.2f} s | **{i / r:.2f}x** | {verdict} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, nargs="+", default=[2, 4, 8], help="run counts, small batches")
    ap.add_argument("--large-runs", type=int, nargs="*", default=[4], help="run counts, large batches")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--small", type=int, nargs=2, default=[2, 64], metavar=("DATUMS", "TOKENS"))
    ap.add_argument("--large", type=int, nargs=2, default=[16, 128], metavar=("DATUMS", "TOKENS"))
    ap.add_argument("--pause", type=float, default=1.0,
                    help="seconds each client pauses after a step, in the overlap row (0: no row)")
    ap.add_argument("--pause-runs", type=int, default=4)
    ap.add_argument("--server-args", default="", help="extra `tinsmith serve` flags, e.g. "
                    "'--pass-tokens 256 --max-resident-adapters 4'")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()

    from tinsmith.models import resolve_model_dir

    vocab = int(__import__("json").loads((resolve_model_dir(args.model) / "config.json").read_text())["vocab_size"])
    print(f"model {args.model}; {args.requests} requests, prompts {args.prompt_len} +- 50% tokens, "
          f"{args.max_tokens} new tokens each, median of {args.repeats} alternating rounds")
    rows: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model, Path(tmp), args.server_args.split())
        try:
            sc = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            if not args.skip_training:
                for label, (datums, length), counts in (("small", args.small, args.runs),
                                                        ("large", args.large, args.large_runs)):
                    data = make_batch(vocab, datums, length)
                    for n in counts:
                        arms = [[sc.create_lora_training_client(base_model=args.model, rank=8, seed=k).result()
                                 for k in range(n)] for _ in range(2)]
                        rows.append(compare(
                            f"training, {n} runs, {label} batches ({datums} x {length} tokens)",
                            ("sequential", lambda a=arms[0], d=data: train_arm(a, d, args.train_steps, False)),
                            ("concurrent", lambda a=arms[1], d=data: train_arm(a, d, args.train_steps, True)),
                            args.repeats, (1.5 if n == 4 else 0.0) if label == "small" else 0.95,
                            n * args.train_steps * datums * length, True, check_repeats=False))
                        notes.append(f"after {n} runs, {label} batches: server peak memory "
                                     f"{peak_rss_gib(proc.pid):.2f} GiB")
                if args.pause > 0 and args.pause_runs > 0:
                    n, data = args.pause_runs, make_batch(vocab, *args.small)
                    arms = [[sc.create_lora_training_client(base_model=args.model, rank=8, seed=k).result()
                             for k in range(n)] for _ in range(2)]
                    rows.append(overlap_row(n, arms, data, args.train_steps, args.pause, args.repeats))
            if not args.skip_sampling:
                adapters = trained_samplers(sc, args.model, vocab, 4)
                one = make_calls(adapters[:1], vocab, args.requests, args.prompt_len, args.max_tokens)
                mixed = make_calls(adapters, vocab, args.requests, args.prompt_len, args.max_tokens)
                tokens = args.requests * args.max_tokens
                concurrent(one[:2])  # warm-up: first requests load and attach the adapters
                concurrent(mixed[:4])
                rows.append(compare("sampling, concurrent vs sequential",
                                    ("sequential", lambda: sequential(one)),
                                    ("concurrent", lambda: concurrent(one)), args.repeats, 4.0, tokens, True,
                                    check_repeats=False))
                rows.append(compare("sampling, 4 adapters vs 1 adapter",
                                    ("1 adapter", lambda: concurrent(one)),
                                    ("4 adapters", lambda: concurrent(mixed)), args.repeats, 0.7, tokens, False,
                                    check_repeats=False))
        finally:
            proc.terminate()
            proc.wait(30)
    print("| figure | baseline arm | new arm | ratio | goal |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    for n, values in sorted(FAIRNESS.items()):
        goal = "goal >= 0.8, " + ("met" if min(values) >= 0.8 else "MISSED")
        print(f"fairness, {n} concurrent runs: slowest/fastest throughput {min(values):.2f} "
              f"(worst round; {goal})")
    print("\n".join(notes))  # peak memory only grows, so run counts go in increasing order
    return 0


if __name__ == "__main__":
    sys.exit(main())
