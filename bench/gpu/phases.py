"""The measurements of the GPU check, one function per phase; bench.py runs each in its own
process. Every figure is written at once as a JSON line (`Recorder.emit`), so a phase cut
short by its budget still leaves what it finished.

- matmul        the bf16 matmul roofline of this GPU, and the software versions
- plain-small   plain transformers + PEFT eager loop (as shared/gpu/anchor.py) on the B1 shape
- server-small  `tinsmith serve` + the official SDK: B1 (one run, pipelined steps), B2 (N small
                runs concurrent vs one after another, fairness), B3 (MFU of packed runs)
- server-big    a fresh server on the big model: peak GPU memory at the B4 memory shape
                (the server's tinsmith_device_memory_peak_bytes), then the large B4 batch
- plain-big     plain PEFT on the big model: its peak at the memory shape, then the large batch
                (out of memory on an H200 at 8B x 32 x 512, which is the point)
- server-moe    a fresh server on the MoE model (MoE LoRA on the experts): the median
                forward_backward + optim_step time of one run, pipelined (its plain-PEFT
                baseline: phases_models.py's plain-moe)
- engine-packing  B2's shape at the engine, no API: the 8 runs' forward+backward as one
                shared pass, as exact packing, one after another and as plain PEFT steps, with
                each arm's kernel launches (bench/packing.py), to tell the engine's share of B2
                from the API's
- engine-compiled B2's and B3's shapes at the engine, the shared pass eager and with
                `--compile-passes` (only with bench.py --compiled)
- server-small-exact   B1 and B2 again with `--exact-packing`

The sampling phases (S1-S3) are in phases_sampling.py; the 1-rank group, plain MoE and the
VL phases in phases_models.py. bench.py merges the three modules' PHASE_FUNCS.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # step_overhead.py, multi_tenant.py, packing.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import torch
from plan import Plan, Shape

if TYPE_CHECKING:
    import tinker
    from tinker import types

# The SDK, the server launcher and the bench helpers are imported by the server phases only:
# a process start costs seconds, and the plain phases need none of them.

PEAK_METRIC = "tinsmith_device_memory_peak_bytes"
API_KEY = "tml-bench"
LR = 1e-4


class Recorder:
    """Appends one JSON object per line to the results file and prints a progress line with
    the time since the whole bench started ($TINSMITH_BENCH_T0)."""

    def __init__(self, path: Path, phase: str) -> None:
        self.path, self.phase = path, phase
        self.t0 = float(os.environ.get("TINSMITH_BENCH_T0") or time.time())

    def say(self, msg: str) -> None:
        print(f"[bench +{time.time() - self.t0:6.1f}s] {self.phase}: {msg}", flush=True)

    def emit(self, kind: str, **fields: Any) -> None:
        row = {"kind": kind, "phase": self.phase, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        brief = {k: v for k, v in fields.items() if k != "losses"}
        self.say(f"{kind} {json.dumps(brief)}")
        if "losses" in fields:
            self.say("  losses " + " ".join(f"{x:.4f}" for x in fields["losses"]))


# --- shared pieces -------------------------------------------------------------------------

def model_config(name: str):
    """The transformers config of a served model: synthetic ones from their shape table (the
    very config the server builds), others from their prepared folder."""
    from tinsmith.models.synthetic import PREFIX, config_for

    if name.startswith(PREFIX):
        return config_for(name[len(PREFIX):])
    from transformers import AutoConfig

    from tinsmith.models import resolve_model_dir

    return AutoConfig.from_pretrained(resolve_model_dir(name))


def matmul_params(cfg) -> int:
    """N of the 4N-FLOPs-per-token count: every Linear weight, the lm_head included (a tied
    lm_head is a Linear module too, so it is counted once; anchor.py added the embedding
    again for tied models, which overstates a 1B Llama's N by 21%). Counted on the meta
    device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return int(sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)))


def torch_dtype(plan: Plan) -> torch.dtype:
    return getattr(torch, plan.dtype)


def sync(plan: Plan) -> None:
    if plan.device.startswith("cuda"):
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def finite(xs: list[float]) -> bool:
    return all(math.isfinite(x) for x in xs)


def serve_args(plan: Plan, exact: bool, extra: Sequence[str] = ()) -> list[str]:
    """`tinsmith serve` flags; $TINSMITH_BENCH_SERVE_ARGS adds any (e.g. --pass-tokens 16384)."""
    args = ["--device", plan.device, "--dtype", plan.dtype, *extra]
    if exact:
        args.append("--exact-packing")
    return args + shlex.split(os.environ.get("TINSMITH_BENCH_SERVE_ARGS", ""))


@contextmanager
def server(plan: Plan, model: str, workdir: Path, rec: Recorder, exact: bool = False,
           extra: Sequence[str] = ()) -> Iterator[str]:
    """A fresh `tinsmith serve` on `model` (with `extra` flags), its output in
    <workdir>/server.log; stopped after."""
    from step_overhead import start_server

    workdir.mkdir(parents=True, exist_ok=True)
    args = serve_args(plan, exact, extra)
    rec.say(f"starting tinsmith serve --models {model} {' '.join(args)}")
    t = time.perf_counter()
    proc, url = start_server(model, workdir / "data", args, log=workdir / "server.log", timeout_s=600)
    rec.emit("server_start", model=model, args=args, start_s=round(time.perf_counter() - t, 2))
    try:
        yield url
    finally:  # nothing of it is kept: a short grace, then killed
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_peak(url: str, model: str) -> int | None:
    """The server's tinsmith_device_memory_peak_bytes for `model` (None if it has none)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == PEAK_METRIC and s.labels.get("model") == model:
                return int(s.value)
    return None


def clients(sc: tinker.ServiceClient, model: str, rank: int, seeds: range) -> list[tinker.TrainingClient]:
    return [sc.create_lora_training_client(base_model=model, rank=rank, seed=s).result() for s in seeds]


def shape_fields(shape: Shape) -> dict[str, int]:
    return {"batch": shape[0], "seq": shape[1]}


# --- phases --------------------------------------------------------------------------------

def phase_matmul(plan: Plan, rec: Recorder, workdir: Path) -> None:
    from importlib.metadata import version

    cuda = plan.device.startswith("cuda")
    rec.emit("env", device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
             cuda=torch.version.cuda, transformers=version("transformers"), peft=version("peft"),
             tinker=version("tinker"), python=sys.version.split()[0])
    dt = torch.bfloat16 if cuda else torch.float32
    n = plan.matmul_n
    a = torch.randn(n, n, device=plan.device, dtype=dt)
    b = torch.randn(n, n, device=plan.device, dtype=dt)
    for _ in range(3):
        a @ b
    sync(plan)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(plan)
    s = (time.perf_counter() - t) / reps
    rec.emit("matmul", n=n, dtype=str(dt).removeprefix("torch."), tflops=float(f"{2 * n**3 / s / 1e12:.4g}"))


def train_steps(plan: Plan, model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: dict[str, Any],
                steps: int) -> tuple[list[float], list[float], bool]:
    """The plain eager loop: `plan.warmup` untimed then `steps` timed steps of forward (HF's
    own causal-LM loss from `inputs`' labels), backward, AdamW. (step seconds, losses, out of
    memory); after an OOM the gradients and the CUDA cache are freed."""
    times: list[float] = []
    losses: list[float] = []
    oom = False
    try:
        for i in range(plan.warmup + steps):
            t0 = time.perf_counter()
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            sync(plan)
            if i >= plan.warmup:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        oom = True  # freed below, once the exception (its frames hold activations) is gone
    if oom:
        loss = None
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return times, losses, oom


def plain_train(plan: Plan, rec: Recorder, model_name: str, shapes: list[tuple[str, Shape, int]]) -> None:
    """The plain transformers + PEFT eager loop of anchor.py (LoRA on all linear layers,
    AdamW, HF's own causal-LM loss) on random weights built on the device; one "plain" record
    per shape: median step time, losses, and the process's peak GPU memory so far."""
    from packing import plain_peft

    cuda = plan.device.startswith("cuda")
    cfg = model_config(model_name)
    rec.say(f"building {model_name} ({plan.dtype}) on {plan.device}")
    torch.manual_seed(0)
    model = plain_peft(cfg, plan.device, torch_dtype(plan), plan.rank, alpha=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    g = torch.Generator(device="cpu").manual_seed(0)
    for tag, (b, t), steps in shapes:
        ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(plan.device)
        times, losses, oom = train_steps(plan, model, opt, {"input_ids": ids, "labels": ids}, steps)
        rec.emit("plain", tag=tag, model=model_name, **shape_fields((b, t)), oom=oom,
                 median_s=None if oom else round(median(times), 5), losses=losses,
                 peak_bytes=int(torch.cuda.max_memory_allocated()) if cuda else 0)


def phase_plain_small(plan: Plan, rec: Recorder, workdir: Path) -> None:
    plain_train(plan, rec, plan.small, [("b1", plan.b1, plan.steps)])


def phase_plain_big(plan: Plan, rec: Recorder, workdir: Path) -> None:
    plain_train(plan, rec, plan.big, [("b4-mem", plan.b4_mem, plan.big_steps), ("b4", plan.b4, plan.big_steps)])


def concurrent_vs_sequential(plan: Plan, rec: Recorder, tcs: list[tinker.TrainingClient],
                             data: list[types.Datum], shape: Shape, tag: str) -> None:
    """B2: the same runs' steps one run after another, then all at once (one thread each)."""
    from multi_tenant import FAIRNESS, train_arm

    rec.say(f"{tag}: warming {len(tcs)} runs")
    train_arm(tcs, data, 1, False)
    train_arm(tcs, data, plan.warmup, True)
    t_seq, seq_losses = train_arm(tcs, data, plan.steps, False)
    t_conc, conc_losses = train_arm(tcs, data, plan.steps, True)
    tokens = len(tcs) * plan.steps * shape[0] * shape[1]
    rec.emit("concurrent", tag=tag, runs=len(tcs), **shape_fields(shape), steps=plan.steps,
             tokens=tokens, sequential_s=round(t_seq, 4), concurrent_s=round(t_conc, 4),
             fairness=round(FAIRNESS[len(tcs)][-1], 4), losses=conc_losses[0],
             finite=finite([x for ls in seq_losses + conc_losses for x in ls]))


def server_small(plan: Plan, rec: Recorder, workdir: Path, exact: bool) -> None:
    import tinker
    from multi_tenant import train_arm
    from step_overhead import make_batch, sdk_arm
    from tinker import types

    suffix = "-exact" if exact else ""
    vocab = int(model_config(plan.small).vocab_size)
    adam = types.AdamParams(learning_rate=LR)
    with server(plan, plan.small, workdir, rec, exact) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        # B1: one run, forward_backward and optim_step both sent before waiting.
        (tc,) = clients(sc, plan.small, plan.rank, range(1))
        times, losses = sdk_arm(tc, make_batch(vocab, *plan.b1), adam, plan.steps, plan.warmup, pipelined=True)
        rec.emit("server", tag="b1" + suffix, model=plan.small, **shape_fields(plan.b1),
                 median_s=round(median(times), 5), losses=losses, finite=finite(losses))
        # B2: many small runs.
        tcs = clients(sc, plan.small, plan.rank, range(10, 10 + plan.b2_runs))
        concurrent_vs_sequential(plan, rec, tcs, make_batch(vocab, *plan.b2), plan.b2, "b2" + suffix)
        if exact:
            return
        # B3: packed concurrent runs of a larger batch; MFU against this run's matmul peak.
        tcs = clients(sc, plan.small, plan.rank, range(100, 100 + plan.b3_runs))
        data = make_batch(vocab, *plan.b3)
        rec.say(f"b3: warming {len(tcs)} runs")
        train_arm(tcs, data, plan.warmup, True)
        wall, losses3 = train_arm(tcs, data, plan.steps, True)
        tokens = len(tcs) * plan.steps * plan.b3[0] * plan.b3[1]
        rec.emit("mfu", tag="b3", model=plan.small, runs=len(tcs), **shape_fields(plan.b3),
                 steps=plan.steps, tokens=tokens, wall_s=round(wall, 4),
                 matmul_params=matmul_params(model_config(plan.small)), losses=losses3[0],
                 finite=finite([x for ls in losses3 for x in ls]))


def phase_server_small(plan: Plan, rec: Recorder, workdir: Path) -> None:
    server_small(plan, rec, workdir, exact=False)


def phase_server_small_exact(plan: Plan, rec: Recorder, workdir: Path) -> None:
    server_small(plan, rec, workdir, exact=True)


def engine_arms(plan: Plan, rec: Recorder, tag: str, runs: int, shape: Shape, arms: Sequence[str],
                **fields: Any) -> None:
    """One "engine" record: bench/packing.py's `arms` (forward+backward at the engine, no API)
    for `runs` runs of `shape` on the small model, medians and kernel launches."""
    from packing import measure

    from tinsmith.engine.device import placement
    from tinsmith.models import resolve_model_dir

    t = time.perf_counter()
    out = measure(resolve_model_dir(plan.small), plan.small, placement(plan.device, plan.dtype),
                  runs=runs, rows=shape[0], tokens=shape[1], rank=plan.rank, repeats=plan.steps,
                  arms=arms, progress=rec.say)
    rec.emit("engine", tag=tag, model=plan.small, runs=runs, **shape_fields(shape),
             wall_s=round(time.perf_counter() - t, 1), **fields,
             arms={name: {"median_s": round(m, 5), "launches": n} for name, (m, n) in out.items()})


def phase_engine_packing(plan: Plan, rec: Recorder, workdir: Path) -> None:
    from packing import ARMS

    engine_arms(plan, rec, "b2-engine", plan.b2_runs, plan.b2,
                [a for a in ARMS if a != "shared packed, compiled"])


def phase_engine_compiled(plan: Plan, rec: Recorder, workdir: Path) -> None:
    """B2's and B3's shapes at the engine, forward+backward: the shared pass eager and with
    `--compile-passes` (inductor; its warm-up compiles, a fresh compilation per shape)."""
    n = matmul_params(model_config(plan.small))
    for tag, runs, shape in (("b2-compiled", plan.b2_runs, plan.b2), ("b3-compiled", plan.b3_runs, plan.b3)):
        torch._dynamo.reset()
        engine_arms(plan, rec, tag, runs, shape, ("shared packed", "shared packed, compiled"), matmul_params=n)


def phase_server_big(plan: Plan, rec: Recorder, workdir: Path) -> None:
    import tinker
    from step_overhead import make_batch, sdk_arm
    from tinker import types

    vocab = int(model_config(plan.big).vocab_size)
    adam = types.AdamParams(learning_rate=LR)
    with server(plan, plan.big, workdir, rec) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        (tc,) = clients(sc, plan.big, plan.rank, range(1))
        for tag, shape in (("b4-mem", plan.b4_mem), ("b4", plan.b4)):
            times, losses = sdk_arm(tc, make_batch(vocab, *shape), adam, plan.big_steps, 1, pipelined=True)
            # The peak so far: after the memory shape it is that shape's (the server is fresh).
            rec.emit("server", tag=tag, model=plan.big, **shape_fields(shape),
                     median_s=round(median(times), 5), losses=losses, finite=finite(losses),
                     peak_bytes=read_peak(url, plan.big))


def phase_server_moe(plan: Plan, rec: Recorder, workdir: Path) -> None:
    import tinker
    from step_overhead import make_batch, sdk_arm
    from tinker import types

    vocab = int(model_config(plan.moe).vocab_size)
    adam = types.AdamParams(learning_rate=LR)
    with server(plan, plan.moe, workdir, rec) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        (tc,) = clients(sc, plan.moe, plan.rank, range(1))
        times, losses = sdk_arm(tc, make_batch(vocab, *plan.moe_shape), adam, plan.big_steps, plan.warmup,
                                pipelined=True)
        rec.emit("server", tag="moe", model=plan.moe, **shape_fields(plan.moe_shape),
                 median_s=round(median(times), 5), losses=losses, finite=finite(losses),
                 peak_bytes=read_peak(url, plan.moe))


PHASE_FUNCS = {
    "matmul": phase_matmul,
    "plain-small": phase_plain_small,
    "server-small": phase_server_small,
    "engine-packing": phase_engine_packing,
    "engine-compiled": phase_engine_compiled,
    "server-big": phase_server_big,
    "plain-big": phase_plain_big,
    "server-moe": phase_server_moe,
    "server-small-exact": phase_server_small_exact,
}
