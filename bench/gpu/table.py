"""The GPU check's one table, from bench.py's JSON lines (and run.sh's test result).

Every row is always printed; a figure that was not measured says why (its phase was cut at
its budget, failed, or was skipped for time). Columns: figure, baseline, Tinsmith, ratio,
goal, met/missed.

    python bench/gpu/table.py results.jsonl [--tests tests.json] [--out table.txt]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str, str, str]
Rec = dict[str, Any]
HEADER: Row = ("figure", "baseline", "Tinsmith", "ratio", "goal", "met/missed")


class Results:
    def __init__(self, lines: Iterable[str], tests: Rec | None) -> None:
        self.records = [json.loads(line) for line in lines if line.strip()]
        self.tests = tests
        self.plan = self.first("plan") or {}

    def first(self, kind: str, tag: str | None = None) -> Rec | None:
        for r in self.records:
            if r["kind"] == kind and (tag is None or r.get("tag") == tag):
                return r
        return None

    def why_missing(self, *phases: str) -> str:
        """Why a figure of these phases is absent: the first phase that did not finish."""
        for p in phases:
            err = next((r for r in self.records if r["kind"] == "error" and r["phase"] == p), None)
            if err:
                return f"n/a: {p} failed ({err['error'][:60]})"
            st = next((r for r in self.records if r["kind"] == "phase" and r["phase"] == p), None)
            if st is None:
                return f"n/a: {p} not run" + ("" if p in self.plan.get("phases", [p]) else " (not asked)")
            if st["status"] != "ok":
                return f"n/a: {p} {st['status']} ({st['detail']})"
        return "n/a: not measured"


def fmt_s(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f} s"


def gib(b: int | None) -> str:
    return "-" if not b else f"{b / 2**30:.1f} GiB"


def verdict(ok: bool, stretch: bool = False) -> str:
    return ("met (stretch)" if stretch else "met") if ok else "missed"


def shape(r: Rec | None, plan: Rec, key: str) -> str:
    b, t = (r["batch"], r["seq"]) if r else plan.get(key, ("?", "?"))
    return f"{b}x{t}"


def short(model: str) -> str:
    return model.split("/")[-1]


def tests_row(res: Results) -> Row:
    t = res.tests
    if t is None:
        return ("GPU tests (tests/test_gpu.py)", "-", "-", "-", "all pass", "n/a: not run")
    ok = t.get("rc") == 0
    return ("GPU tests (tests/test_gpu.py)", "-", t.get("summary", "?"), "-", "all pass",
            "met" if ok else f"missed (exit {t.get('rc')})")


def loss_note(*recs: Rec | None) -> str:
    return "" if all(r is None or r.get("finite", True) for r in recs) else " (non-finite loss!)"


def b1_row(res: Results, suffix: str = "") -> Row:
    p = res.plan
    plain, srv = res.first("plain", "b1"), res.first("server", "b1" + suffix)
    fig = (f"B1{suffix} 1 run {short(p.get('small', '?'))} {shape(srv, p, 'b1')}: step time, "
           f"SDK pipelined / plain PEFT")
    goal = "<= 1.0x (stretch 0.75x)"
    if not plain or not srv or plain.get("median_s") is None or srv.get("median_s") is None:
        phases = ["plain-small", "server-small" + suffix]
        return (fig, fmt_s(plain and plain.get("median_s")), fmt_s(srv and srv.get("median_s")), "-",
                goal, res.why_missing(*phases))
    r = srv["median_s"] / plain["median_s"]
    return (fig, fmt_s(plain["median_s"]), fmt_s(srv["median_s"]), f"{r:.2f}x", goal,
            verdict(r <= 1.0 and srv["finite"], r <= 0.75) + loss_note(srv))


def b2_rows(res: Results, suffix: str = "", fairness: bool = True) -> list[Row]:
    p = res.plan
    c = res.first("concurrent", "b2" + suffix)
    n = c["runs"] if c else p.get("b2_runs", "?")
    fig = f"B2{suffix} {n} runs x {shape(c, p, 'b2')}: tokens/s, concurrent / sequential"
    rows: list[Row]
    if not c:
        why = res.why_missing("server-small" + suffix)
        rows = [(fig, "-", "-", "-", ">= 5x", why)]
        if fairness:
            rows.append((f"B2{suffix} fairness: slowest/fastest run throughput", "-", "-", "-",
                         ">= 0.8", why))
        return rows
    seq_tps, conc_tps = c["tokens"] / c["sequential_s"], c["tokens"] / c["concurrent_s"]
    r = conc_tps / seq_tps
    rows = [(fig, f"{seq_tps:,.0f} tok/s", f"{conc_tps:,.0f} tok/s", f"{r:.2f}x", ">= 5x",
             verdict(r >= 5 and c["finite"]) + loss_note(c))]
    if fairness:
        rows.append((f"B2{suffix} fairness: slowest/fastest run throughput", "1.00 (ideal)",
                     f"{c['fairness']:.2f}", f"{c['fairness']:.2f}", ">= 0.8",
                     verdict(c["fairness"] >= 0.8)))
    return rows


def tflop_per_s(tokens: float, seconds: float, matmul_params: int) -> float:
    """Training TFLOP/s by the 4N FLOPs-per-token count (forward 2N, backward 2N: a LoRA
    backward skips the base weights' gradients), N the model's matmul parameters."""
    return tokens / seconds * 4 * matmul_params / 1e12


def engine_row(res: Results) -> Row:
    """B2's shape at the engine (no API): shared packed vs one after another, forward+backward,
    with kernel launches; plain PEFT's time and launches for the same steps in the goal cell."""
    p = res.plan
    e = res.first("engine", "b2-engine")
    n = e["runs"] if e else p.get("b2_runs", "?")
    fig = f"B2 engine only {n} runs x {shape(e, p, 'b2')}: fwd+bwd time, one after another / packed"
    if not e:
        return (fig, "-", "-", "-", "reported", res.why_missing("engine-packing"))
    seq, packed = e["arms"]["one after another"], e["arms"]["shared packed"]
    peft = e["arms"].get("plain PEFT, one after another")
    launches = f"launches {seq['launches']:,} / {packed['launches']:,}"
    if peft:
        launches += f"; plain PEFT {fmt_s(peft['median_s'])}, {peft['launches']:,}"
    return (fig, fmt_s(seq["median_s"]), fmt_s(packed["median_s"]),
            f"{seq['median_s'] / packed['median_s']:.2f}x", "reported", f"measured; {launches}")


def compiled_rows(res: Results) -> list[Row]:
    """B2's and B3's shapes at the engine (forward+backward), eager / `--compile-passes`; B3's
    as MFU (4N FLOPs per token over the matmul peak)."""
    p, mm = res.plan, res.first("matmul")
    rows: list[Row] = []
    for tag, key in (("b2-compiled", "b2"), ("b3-compiled", "b3")):
        e = res.first("engine", tag)
        n = e["runs"] if e else p.get(f"{key}_runs", "?")
        fig = f"{key.upper()} engine {n} runs x {shape(e, p, key)}: fwd+bwd, eager / --compile-passes"
        if not e:
            rows.append((fig, "-", "-", "-", "reported", res.why_missing("engine-compiled")))
            continue
        eager, comp = e["arms"]["shared packed"], e["arms"]["shared packed, compiled"]
        base, mine = fmt_s(eager["median_s"]), fmt_s(comp["median_s"])
        if key == "b3" and mm and mm["tflops"] > 0:
            tokens = e["runs"] * e["batch"] * e["seq"]
            base, mine = (f"{cell} ({tflop_per_s(tokens, arm['median_s'], e['matmul_params']) / mm['tflops']:.1%} MFU)"
                          for cell, arm in ((base, eager), (mine, comp)))
        launches = "" if comp.get("launches") is None else f"; launches {eager['launches']:,} / {comp['launches']:,}"
        rows.append((fig, base, mine, f"{eager['median_s'] / comp['median_s']:.2f}x", "reported",
                     f"measured (with compiling: {e['wall_s']:.0f} s){launches}"))
    return rows


def b3_row(res: Results) -> Row:
    p = res.plan
    m, mm = res.first("mfu", "b3"), res.first("matmul")
    n = m["runs"] if m else p.get("b3_runs", "?")
    fig = f"B3 MFU, {n} concurrent runs x {shape(m, p, 'b3')}: 4N FLOPs/token / matmul peak"
    if not m or not mm:
        return (fig, "-", "-", "-", ">= 45%", res.why_missing("matmul", "server-small"))
    tflops = tflop_per_s(m["tokens"], m["wall_s"], m["matmul_params"])
    mfu = tflops / mm["tflops"] if mm["tflops"] > 0 else float("nan")
    return (fig, f"peak {mm['tflops']:.3g} TFLOP/s", f"{tflops:.3g} TFLOP/s", f"{mfu:.1%}", ">= 45%",
            verdict(mfu >= 0.45 and m["finite"]) + loss_note(m))


def b4_rows(res: Results) -> list[Row]:
    p = res.plan
    big = short(p.get("big", "?"))
    srv, plain = res.first("server", "b4"), res.first("plain", "b4")
    fig = f"B4 {big} {shape(srv, p, 'b4')} trains: step time, server / plain PEFT"
    if plain is None:
        base = res.why_missing("plain-big").removeprefix("n/a: ")
    else:
        base = "out of memory" if plain["oom"] else fmt_s(plain["median_s"])
    if srv is None:
        row1: Row = (fig, base, "-", "-", "trains", res.why_missing("server-big"))
    else:
        ratio = (f"{srv['median_s'] / plain['median_s']:.2f}x"
                 if plain and not plain["oom"] and plain.get("median_s") else "-")
        row1 = (fig, base, fmt_s(srv["median_s"]), ratio, "trains",
                verdict(bool(srv["finite"])) + loss_note(srv))
    srv_m, plain_m = res.first("server", "b4-mem"), res.first("plain", "b4-mem")
    fig2 = f"B4 {big} {shape(srv_m, p, 'b4_mem')}: peak GPU memory, server / plain PEFT"
    if not srv_m or not plain_m:
        why = res.why_missing("server-big", "plain-big")
        row2: Row = (fig2, gib(plain_m and plain_m.get("peak_bytes")),
                     gib(srv_m and srv_m.get("peak_bytes")), "-", "<= 1.0x", why)
    elif plain_m.get("oom"):
        row2 = (fig2, "out of memory", gib(srv_m.get("peak_bytes")), "-", "<= 1.0x",
                verdict(bool(srv_m["finite"])) + " (plain PEFT out of memory)")
    elif not srv_m.get("peak_bytes") or not plain_m.get("peak_bytes"):
        why = ("n/a: no GPU (peak 0)" if srv_m.get("peak_bytes") == 0 or not plain_m.get("peak_bytes")
               else "n/a: the server has no tinsmith_device_memory_peak_bytes")
        row2 = (fig2, gib(plain_m.get("peak_bytes")), gib(srv_m.get("peak_bytes")), "-", "<= 1.0x", why)
    else:
        r = srv_m["peak_bytes"] / plain_m["peak_bytes"]
        row2 = (fig2, gib(plain_m["peak_bytes"]), gib(srv_m["peak_bytes"]), f"{r:.2f}x", "<= 1.0x",
                verdict(r <= 1.0))
    return [row1, row2]


def tps(r: Rec) -> str:
    return f"{r['tokens_per_s']:,.0f} tok/s"


def sampling_rows(res: Results) -> list[Row]:
    """S1-S3 (issue 14): the server's tokens/s through the SDK against plain HF generate at
    the same batch (S1, S2), and S3 (many adapters) against S1."""
    p = res.plan
    n, a = p.get("sample_requests", "?"), p.get("sample_adapters", "?")
    lengths = f"{p.get('sample_prompt', '?')}+{p.get('sample_tokens', '?')} tokens"
    s1 = (f"S1 {n} requests x {lengths} {short(p.get('small', '?'))}, 1 adapter: tokens/s, "
          f"server (SDK) / HF generate batch {n}")
    specs = [
        (s1, ("generate", f"batch{n}"), "s1", 3.0, "plain-generate"),
        ("S2 1 request alone: tokens/s, server / HF generate batch 1", ("generate", "batch1"), "s2", 4.0,
         "plain-generate"),
        (f"S3 the S1 requests over {a} adapters: tokens/s, S3 / S1", ("sampling", "s1"), "s3", 0.8,
         "server-sampling"),
    ]
    rows: list[Row] = []
    for fig, (kind, tag), mine_tag, goal, base_phase in specs:
        base, mine = res.first(kind, tag), res.first("sampling", mine_tag)
        goal_s = f">= {goal:g}x"
        if not base or not mine:
            rows.append((fig, tps(base) if base else "-", tps(mine) if mine else "-", "-", goal_s,
                         res.why_missing(base_phase, "server-sampling")))
            continue
        r = mine["tokens_per_s"] / base["tokens_per_s"]
        rows.append((fig, tps(base), tps(mine), f"{r:.2f}x", goal_s, verdict(r >= goal)))
    return rows


def group_row(res: Results) -> Row:
    """Issue 15: the 1-rank group (serve --sharded) against the single-process engine's B1."""
    p = res.plan
    single, group = res.first("server", "b1"), res.first("server", "b1-group")
    fig = (f"G 1-rank group (serve --sharded) {short(p.get('small', '?'))} {shape(group, p, 'b1')}: "
           "step time, group / single-process B1")
    goal = "<= 1.05x"
    if not single or not group:
        return (fig, fmt_s(single and single.get("median_s")), fmt_s(group and group.get("median_s")), "-",
                goal, res.why_missing("server-small", "server-group"))
    r = group["median_s"] / single["median_s"]
    return (fig, fmt_s(single["median_s"]), fmt_s(group["median_s"]), f"{r:.2f}x", goal,
            verdict(r <= 1.05 and group["finite"]) + loss_note(group))


def step_tps(r: Rec) -> str:
    """A step time and the tokens/s it makes, e.g. "0.412 s (4,971 tok/s)"."""
    return f"{fmt_s(r['median_s'])} ({r['batch'] * r['seq'] / r['median_s']:,.0f} tok/s)"


def model_rows(res: Results) -> list[Row]:
    """Issue 16: MoE and VL step time (and tokens/s), server against plain PEFT; no goal set."""
    p = res.plan
    rows: list[Row] = []
    for label, model_key, shape_key, tag in (("MoE", "moe", "moe_shape", "moe"), ("VL", "vl", "vl_shape", "vl")):
        srv, plain = res.first("server", tag), res.first("plain", tag)
        oom = res.first("plain", f"{tag}-oom")
        b, t = (srv["batch"], srv["seq"]) if srv else p.get(shape_key, ("?", "?"))
        image = p.get("vl_image") if tag == "vl" else None
        fig = (f"{label} {short(p.get(model_key, '?'))} {b}x{t}" + (f" (one {image[0]}x{image[1]} image each)"
               if image else "") + ": step time (tokens/s), server / plain PEFT")
        phases = [f"server-{tag}", f"plain-{tag}"]
        if plain is None and oom is not None:
            base = "out of memory"
        elif plain is None:
            base = "-"
        else:
            base = step_tps(plain)
        if srv is None or plain is None:
            rows.append((fig, base, step_tps(srv) if srv else "-", "-", "reported",
                         res.why_missing(*phases) if base != "out of memory" or srv is None
                         else "measured (plain PEFT out of memory)"))
            continue
        note = "" if not plain.get("lora") or plain["lora"] == "attention + experts" else \
            f" (plain PEFT: LoRA on {plain['lora']})"
        rows.append((fig, base, step_tps(srv), f"{srv['median_s'] / plain['median_s']:.2f}x", "reported",
                     ("measured" if srv["finite"] else "measured, loss not finite!") + note))
    return rows


ROW_BUILDERS: list[Callable[[Results], list[Row]]] = [
    lambda r: [tests_row(r)],
    lambda r: [b1_row(r)],
    lambda r: b2_rows(r),
    lambda r: [engine_row(r)],
    lambda r: [b3_row(r)],
    b4_rows,
    sampling_rows,
    lambda r: [group_row(r)],
    model_rows,
    lambda r: [b1_row(r, "-exact")],
    lambda r: b2_rows(r, "-exact", fairness=False),
    compiled_rows,
]


def footer(res: Results) -> list[str]:
    env, mm = res.first("env"), res.first("matmul")
    lines = []
    if env:
        lines.append(f"device {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
                     f"{env['transformers']}, peft {env['peft']}, tinker {env['tinker']}, python {env['python']}")
    if mm:
        lines.append(f"{mm['dtype']} matmul {mm['n']}^3: {mm['tflops']} TFLOP/s")
    eager = [(r["tag"].removesuffix("-eager"), r) for r in res.records
             if r["kind"] == "sampling" and r["tag"].endswith("-eager")]
    if eager:
        lines.append("S1-S3 with --sampler-cuda-graphs off: " + ", ".join(
            f"{tag.upper()} {tps(r)}" + (f" (default: {tps(d)})" if (d := res.first("sampling", tag)) else "")
            for tag, r in eager))
    peaks = [f"{r['phase']} {gib(r['peak_bytes'])}" + (" (out of memory)" if r.get("oom") else "")
             for r in res.records
             if r["kind"] in ("server", "plain") and r.get("tag") in ("moe", "moe-oom", "vl")
             and r.get("peak_bytes")]
    if peaks:
        lines.append("MoE/VL peak GPU memory: " + ", ".join(peaks))
    phases = [r for r in res.records if r["kind"] == "phase"]
    if phases:
        lines.append("phases: " + ", ".join(
            f"{r['phase']} {r['status']} {r['elapsed_s']:.0f}/{r['budget_s']:.0f} s" for r in phases))
    for r in res.records:
        if r["kind"] == "error":
            lines.append(f"error in {r['phase']}: {r['error']}")
    return lines


def render(lines: Iterable[str], tests: Rec | None = None) -> str:
    res = Results(lines, tests)
    rows = [HEADER] + [row for build in ROW_BUILDERS for row in build(res)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    out = ["", "Tinsmith GPU check" + (f" ({res.plan['name']} plan)" if res.plan else "")]
    for k, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += footer(res)
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--tests", default=None, help="JSON: {rc, summary} of the GPU tests")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    path = Path(a.results)
    lines = path.read_text().splitlines() if path.is_file() else []
    tests = json.loads(Path(a.tests).read_text()) if a.tests and Path(a.tests).is_file() else None
    text = render(lines, tests)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
