"""What the GPU check measures: models, shapes, step counts and time budgets, one `Plan`.

`GPU` is the real check (an H200, bf16); `TINY` runs the very same code on a CPU with tiny
shapes in a few minutes, so the CPU test suite can dry-run it (tests/test_gpu_check.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Shape = tuple[int, int]  # (datums, tokens per datum)


@dataclass(frozen=True)
class Plan:
    name: str
    device: str  # the `tinsmith serve --device` value, also where the plain arm runs
    dtype: str  # the `tinsmith serve --dtype` value, also the plain arm's base dtype
    small: str  # B1-B3
    big: str  # B4
    b1: Shape  # one run, SDK pipelined vs plain PEFT
    b2_runs: int  # concurrent vs sequential small runs
    b2: Shape
    b3_runs: int  # MFU of packed concurrent runs
    b3: Shape
    b4: Shape  # the big model's large batch (plain PEFT runs out of memory)
    b4_mem: Shape  # the big model's peak-memory comparison
    warmup: int  # untimed steps first (compilation, caches)
    steps: int  # timed steps
    big_steps: int  # timed steps on the big model
    matmul_n: int  # the bf16 matmul roofline's size
    rank: int = 32
    phase_budget_s: dict[str, float] = field(default_factory=dict)
    min_phase_s: float = 20.0  # a phase with less time left than this is skipped
    moe: str = "synthetic/tiny-qwen3-moe"  # the MoE LoRA step-time phase's model
    moe_shape: Shape = (2, 16)
    # S1-S3 (issue 14) on `small`: `sample_requests` concurrent requests of `sample_prompt`-token
    # prompts, `sample_tokens` new tokens each, temperature 1; S3 spreads them over
    # `sample_adapters` adapters. Arms alternate for `sample_rounds` rounds (medians).
    sample_requests: int = 4
    sample_prompt: int = 16
    sample_tokens: int = 8
    sample_adapters: int = 2
    sample_rounds: int = 1
    # The VL shape: `vl_shape` datums, each one `vl_image` (width, height) image and text up
    # to the datum's token count.
    vl: str = "synthetic/tiny-qwen3-vl"
    vl_shape: Shape = (2, 32)
    vl_image: tuple[int, int] = (64, 48)


GPU = Plan(
    name="gpu", device="cuda", dtype="bfloat16",
    small="synthetic/llama-3.2-1b", big="synthetic/llama-3.1-8b",
    b1=(8, 512), b2_runs=8, b2=(2, 64), b3_runs=4, b3=(8, 512), b4=(32, 512), b4_mem=(8, 512),
    warmup=2, steps=5, big_steps=3, matmul_n=8192,
    # Caps, not estimates: bench.py also stops at its whole budget (run.sh: what its 470 s
    # leave after the tests, ~340-400 s), so the last phases are the ones skipped when the
    # first run long (README.md: expected times).
    phase_budget_s={"matmul": 30, "plain-small": 45, "server-small": 100, "engine-packing": 60,
                    "server-big": 90,
                    "plain-big": 60, "plain-generate": 40, "server-sampling": 75, "server-group": 60,
                    "server-moe": 120, "plain-moe": 90, "server-vl": 70, "plain-vl": 50,
                    "server-small-exact": 60, "server-sampling-eager": 60,
                    "engine-compiled": 300},
    moe="synthetic/qwen3-30b-a3b", moe_shape=(4, 512),
    sample_requests=32, sample_prompt=128, sample_tokens=128, sample_adapters=8, sample_rounds=3,
    # 4 x (one 448x448 image: 196 tokens, its 2 vision markers and 314 text tokens).
    vl="synthetic/qwen3-vl-8b", vl_shape=(4, 512), vl_image=(448, 448),
)

TINY = Plan(
    name="tiny", device="cpu", dtype="float32",
    small="synthetic/tiny-llama", big="synthetic/tiny-llama",
    b1=(2, 16), b2_runs=4, b2=(2, 16), b3_runs=2, b3=(2, 16), b4=(4, 16), b4_mem=(2, 16),
    warmup=1, steps=2, big_steps=2, matmul_n=256, rank=8,
    # Generous: a dry run on a busy 2-core machine starts a server in up to ~30 s; it takes
    # about 80 s in all on a quiet one.
    phase_budget_s={"matmul": 60, "plain-small": 90, "server-small": 150, "engine-packing": 90,
                    "server-big": 150,
                    "plain-big": 90, "plain-generate": 90, "server-sampling": 150,
                    "server-group": 150, "server-moe": 150, "plain-moe": 90, "server-vl": 150,
                    "plain-vl": 90, "server-small-exact": 150, "server-sampling-eager": 150,
                    "engine-compiled": 300},
    min_phase_s=5.0,
)

PLANS = {p.name: p for p in (GPU, TINY)}

# The phases in order of importance: when time runs short the last ones are skipped.
# Each runs in its own process (bench.py), so GPU memory starts empty and a phase that
# overruns its budget is killed, server included.
PHASES = ("matmul", "plain-small", "server-small", "engine-packing", "server-big", "plain-big", "plain-generate",
          "server-sampling", "server-group", "server-vl", "plain-vl", "server-moe", "plain-moe",
          "server-small-exact", "server-sampling-eager", "engine-compiled")
# Phases run only when asked, each by a bench.py flag (the argparse dest named here).
OPTIONAL = {"server-small-exact": "exact_packing", "server-sampling-eager": "sampler_graphs_off",
            "engine-compiled": "compiled"}
