"""The GPU check (bench/gpu/) dry-runs on the CPU: `run.sh` with TINSMITH_GPU_CHECK_DRY=1
runs the GPU tests with TINSMITH_TEST_DEVICE=cpu and the bench with tiny shapes, through the
same code as on the GPU machine, and must print the table with every row; the ratio rows
(S1-S3 sampling, the 1-rank group of `serve --sharded`, MoE and VL against plain PEFT) with
finite, positive figures, the group server really training through one rank process, and
plain PEFT really adapting the MoE's fused experts. Also: the wheel
collector's shell is valid and its package picker leaves the image's packages behind
(nothing is downloaded here).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"
ROWS = ("GPU tests", "B1 1 run", "B2 ", "B2 fairness", "B2 engine only", "B3 MFU", "B4 ", "peak GPU memory",
        "S1 ", "S2 ", "S3 ", "G 1-rank group", "MoE ", "VL ", "B1-exact", "B2-exact", "B2 engine 4 runs",
        "B3 engine")
# The rows that are ratios of two figures this run measured (B2 at the engine, S1-S3, the
# group, MoE and VL).
RATIO_ROWS = ("B2 engine only", "S1 ", "S2 ", "S3 ", "G 1-rank group", "MoE ", "VL ")


@pytest.mark.parametrize("script", ["collect_wheels.sh", "run.sh"])
def test_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(GPU / script)], check=True)


def test_pick_wheels_skips_the_image(tmp_path: Path) -> None:
    """tinker needs httpx[http2] and transformers: httpx and transformers are in the image and
    stay there, but h2 (only the extra needs it) travels, and transformers' needs do not."""
    def item(name: str, version: str, *requires: str) -> dict:
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    report = {"install": [
        item("tinker", "0.38.0", "httpx[http2]<1,>=0.23.0", "transformers", "pydantic<3"),
        item("httpx", "0.28.1", "anyio", "h2<5,>=3; extra == 'http2'"),
        item("h2", "4.3.0", "hpack<5,>=4.1"),
        item("hpack", "4.1.0"),
        item("anyio", "4.9.0"),
        item("transformers", "5.23.0", "kernels", "tokenizers"),
        item("kernels", "0.9.0"), item("tokenizers", "0.22.0"),
        item("pydantic", "2.14.4", "typing-extensions>=4.16", "tomli; python_version < '3.11'"),
        item("typing_extensions", "4.16.0"), item("tomli", "2.0.0"),
        item("psycopg", "3.2.0"),
    ]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "top.txt").write_text("tinker==0.38.*\npsycopg\n")
    env = {**os.environ, "FORCE_CARRY": "typing-extensions", "SKIP": "torch psycopg"}
    subprocess.run([sys.executable, str(GPU / "pick_wheels.py"), str(tmp_path / "report.json"),
                    str(tmp_path / "top.txt"), str(tmp_path / "pins.txt")], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    pins = (tmp_path / "pins.txt").read_text().split()
    assert sorted(pins) == ["h2==4.3.0", "hpack==4.1.0", "pydantic==2.14.4", "tinker==0.38.0",
                            "typing_extensions==4.16.0"]


def test_run_sh_dry_run_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "TINSMITH_GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "OUT": str(out),
           "TMPDIR": str(tmp_path)}
    env.pop("TINSMITH_TEST_DEVICE", None)
    proc = subprocess.run(["bash", str(GPU / "run.sh")], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1000)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    table = (out / "table.txt").read_text()
    assert table in proc.stdout
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    for row in ROWS:
        assert any(row in line for line in lines), f"no {row!r} row in:\n{table}"
    assert len(lines) == 1 + len(ROWS), table  # header + rows
    # Every figure measured, but the GPU's memory and the optional --exact-packing phase.
    for line in lines:
        assert "n/a" not in line or "no GPU" in line or "not asked" in line, table
    assert " passed" in lines[1] and "| met" in lines[1], table
    for row in RATIO_ROWS:
        cells = [c.strip() for c in next(line for line in lines if row in line).split("|")[1:-1]]
        ratio = float(cells[3].removesuffix("x"))
        assert math.isfinite(ratio) and ratio > 0, table
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in records if r["kind"] == "phase"), records
    # The new phases' raw figures: positive and finite, every generated token counted.
    speeds = [r for r in records if r["kind"] in ("generate", "sampling")]
    assert {r["tag"] for r in speeds} == {"batch4", "batch1", "s1", "s2", "s3"}, speeds
    for r in speeds:
        assert r["tokens"] > 0 and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        assert r["tokens"] <= r["batch" if r["kind"] == "generate" else "requests"] * r["new_tokens"], r
    steps = {(r["kind"], r["tag"]): r for r in records if r.get("tag") in ("b1-group", "moe", "vl")}
    assert set(steps) == {("server", "b1-group"), ("server", "moe"), ("plain", "moe"), ("server", "vl"),
                          ("plain", "vl")}, steps
    for r in steps.values():
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0 and all(map(math.isfinite, r["losses"])), r
    assert steps["plain", "moe"]["lora"] == "attention + experts"  # PEFT targets the fused experts
    # `serve --sharded` trained through a 1-rank group; the B1 server through the local engine.
    logs = {p: next(tmp_path.glob(f"tinsmith-gpu-check.*/bench/{p}/server.log")).read_text()
            for p in ("server-small", "server-group")}
    assert "sharded engine: 1 ranks up" in logs["server-group"], logs["server-group"][-3000:]
    assert "sharded engine" not in logs["server-small"] and "runs stay resident" in logs["server-small"]
    assert {p.name for p in out.iterdir()} == {"run.log", "table.txt", "results.jsonl", "servers.log"}
