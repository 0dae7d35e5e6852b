"""Tinsmith on one GPU against plain PEFT, as ratios measured in one run on the same GPU:
the official `tinker` SDK driving a real `tinsmith serve --device cuda` subprocess.

  B1  one run, Llama-3.2-1B shapes, 8 x 512 tokens: SDK pipelined step vs the plain PEFT
      eager loop (bf16, LoRA r=32 on all linear layers, AdamW), median step time. <= 1.0x
  B2  8 runs, each 2 x 64 tokens a step, concurrent (a thread each) vs one after another:
      aggregate tokens/s >= 5x; fairness (slowest/fastest run's throughput) >= 0.8; and the
      same runs' forward+backward at the engine alone (no API), packed vs one after another,
      with kernel launches (reported)
  B3  4 concurrent runs of 8 x 512: trained tokens/s x 4N FLOPs / this GPU's bf16 matmul
      peak (8192^3, measured here) >= 45% MFU
  B4  Llama-3.1-8B shapes at 32 x 512 trains through the server (plain PEFT: out of memory
      or its time); the server's peak GPU memory at 8 x 512 vs plain PEFT's <= 1.0x
  S1  32 concurrent sampling requests (128-token prompts, 128 new tokens, temperature 1) on
      one adapter: tokens/s vs plain HF generate at batch 32 >= 3x; S2 one request alone vs
      generate at batch 1 >= 4x; S3 the S1 requests over 8 adapters vs S1 >= 0.8x
  G   B1 on `tinsmith serve --sharded` (the rank-group engine, one rank) vs B1 <= 1.05x
  MoE, VL  step time and tokens/s, server vs plain PEFT (Qwen3-30B-A3B 4 x 512; Qwen3-VL-8B
      4 x 512 with a 448x448 image each), reported
  and, with --exact-packing, B1 and B2 again on a server started with that flag; with
  --compiled, B2's and B3's shapes at the engine, eager against --compile-passes.

Every phase (phases.py) runs in its own process with a time budget, killed with its server
if it overruns; the whole bench stays within --budget-s. Records go to results.jsonl, one
JSON object a line, and table.py turns them into the table printed at the end.

    python bench/gpu/bench.py                     # on the GPU machine (bench/gpu/run.sh)
    python bench/gpu/bench.py --tiny              # the same code on a CPU, tiny shapes
    TINSMITH_BENCH_SERVE_ARGS="--pass-tokens 16384" python bench/gpu/bench.py --only server-big
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from plan import OPTIONAL, PHASES, PLANS, Plan
from table import render


def append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def run_phase_process(name: str, plan: Plan, results: Path, workdir: Path, budget_s: float) -> tuple[str, str]:
    """Run one phase in a child process (its own process group, so a server it started dies
    with it); (status, detail), status one of ok, error, timeout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--plan", plan.name,
           "--results", str(results), "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return "timeout", f"cut at its {budget_s:.0f} s budget"
    finally:
        try:  # anything the phase left behind (a server whose stop timed out)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return ("ok", "") if rc == 0 else ("error", f"exit status {rc}")


def orchestrate(args: argparse.Namespace, plan: Plan) -> int:
    t0 = float(os.environ.setdefault("TINSMITH_BENCH_T0", str(time.time())))
    # Stopped from outside (run.sh's timeout): unwind, so the running phase's group is killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = os.environ.get("OUT")
    results = Path(args.results or (Path(out) / "results.jsonl" if out else Path("results.jsonl")))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("")
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="tinsmith-gpu-bench-"))
    phases = [p for p in PHASES if p not in OPTIONAL or getattr(args, OPTIONAL[p])]
    if args.only:
        phases = [p for p in phases if p in args.only.split(",")]
    append(results, {"kind": "plan", **dataclasses.asdict(plan), "phases": phases,
                     "budget_s": args.budget_s})
    deadline = t0 + args.budget_s
    failed = 0
    for name in PHASES:
        if name not in phases:
            continue
        left = max(0.0, deadline - time.time())
        budget = min(plan.phase_budget_s.get(name, 60), left)
        stamp = f"[bench +{time.time() - t0:6.1f}s]"
        if budget < plan.min_phase_s:
            print(f"{stamp} {name}: skipped, {left:.0f} s left of the bench's budget", flush=True)
            append(results, {"kind": "phase", "phase": name, "status": "skipped",
                             "detail": "out of time", "elapsed_s": 0, "budget_s": round(budget, 1)})
            continue
        print(f"{stamp} {name}: start (budget {budget:.0f} s)", flush=True)
        started = time.time()
        status, detail = run_phase_process(name, plan, results, workroot / name, budget)
        elapsed = time.time() - started
        print(f"[bench +{time.time() - t0:6.1f}s] {name}: {status} in {elapsed:.1f} s {detail}", flush=True)
        append(results, {"kind": "phase", "phase": name, "status": status, "detail": detail,
                         "elapsed_s": round(elapsed, 1), "budget_s": round(budget, 1)})
        failed += status != "ok"
    if not args.no_table:
        print(render(results.read_text().splitlines()))
    return 1 if failed else 0


def child(args: argparse.Namespace, plan: Plan) -> int:
    import phases_models
    import phases_sampling
    from phases import PHASE_FUNCS, Recorder

    funcs = {**PHASE_FUNCS, **phases_sampling.PHASE_FUNCS, **phases_models.PHASE_FUNCS}
    rec = Recorder(Path(args.results), args.phase)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        funcs[args.phase](plan, rec, workdir)
    except Exception as e:  # noqa: BLE001 - recorded, and the bench goes on with the next phase
        import traceback

        traceback.print_exc()
        rec.emit("error", error=f"{type(e).__name__}: {e}"[:400])
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="the tiny CPU plan")
    ap.add_argument("--plan", choices=sorted(PLANS), default=None)
    ap.add_argument("--exact-packing", action="store_true", help="also B1/B2 with --exact-packing")
    ap.add_argument("--compiled", action="store_true",
                    help="also B2's and B3's shapes at the engine with --compile-passes (compiles first)")
    ap.add_argument("--sampler-graphs-off", action="store_true",
                    help="also S1-S3 with --sampler-cuda-graphs off")
    ap.add_argument("--budget-s", type=float, default=None, help="the whole bench's time (default: "
                    "380 s on the GPU plan, 600 s tiny; run.sh gives it what the tests left)")
    ap.add_argument("--only", default="", help="comma-separated phases: " + ",".join(PHASES))
    ap.add_argument("--results", default=None, help="JSON lines (default: $OUT/results.jsonl)")
    ap.add_argument("--workdir", default=None, help="server data and logs (default: a temp dir)")
    ap.add_argument("--no-table", action="store_true", help="leave the table to run.sh")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    plan = PLANS[args.plan or ("tiny" if args.tiny else "gpu")]
    if args.phase:
        return child(args, plan)
    if args.budget_s is None:
        args.budget_s = 600.0 if plan.name == "tiny" else 380.0
    return orchestrate(args, plan)


if __name__ == "__main__":
    sys.exit(main())
