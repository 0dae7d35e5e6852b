"""The memory planner (engine/plan.py, `tinsmith plan`) against models built for real.

What is measured, on the CPU in float32:
- weights and adapter state are counted exactly: the planner's figures, made from the config
  alone on the `meta` device, equal the bytes of the built model's parameters and buffers, and
  of K adapters' factors, gradients and AdamW moments after a step (byte for byte);
- a pass's activations are the peak of the live bytes torch's CPU allocator reports to the
  profiler (`torch.profiler` with profile_memory: each allocation's "Total Allocated", the CPU
  analogue of torch.cuda.max_memory_allocated) over one forward + backward of T tokens from K
  runs, started after an optimizer step so that the gradients it allocates are in it. The
  measured peak is weights + adapter state + that pass peak; the plan's total must be within
  15% of it. (The process's peak RSS is no measure of tensors: glibc keeps freed memory, and it
  measured up to 1.6x the allocator's peak on such passes.)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinsmith.cli import main as tinsmith_cli
from tinsmith.cli_plan import parse_bytes
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.plan import max_pass_tokens, model_facts, plan_memory
from tinsmith.engine.runner import ModelRunner
from tinsmith.models import synthetic
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import AdamSpec, DatumIn, LoraSpec

RUNS, RANK, WIDTH = 2, 8, 512
TOLERANCE = 0.15


# Small shapes whose layers, not the fixed per-token costs, dominate a pass; built here, seeded.
def _small(model_type: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return model_type, fields


SMALL = {
    "small-llama": _small(
        "llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "small-qwen3-moe": _small(
        "qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, vocab_size=512,
        tie_word_embeddings=False),
}


def _folder(name: str, root: Path) -> Path:
    if name not in SMALL:
        return resolve_model_dir(name)
    from transformers import AutoConfig

    model_type, fields = SMALL[name]
    out = root / name
    out.mkdir(exist_ok=True)
    AutoConfig.for_model(model_type, **fields).save_pretrained(out)
    (out / synthetic.MARKER).write_text(json.dumps({"seed": 0}))
    return out


def _state_bytes(adapters: list[Adapter]) -> int:
    """Factors, gradients and optimizer buffers (AdamW's scalar step counters left out)."""
    total = 0
    for a in adapters:
        for p in a.parameters():
            total += p.nbytes + (p.grad.nbytes if p.grad is not None else 0)
            total += sum(t.nbytes for k, t in a.optimizer_state(p).items() if k != "step")
    return total


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


class Pass:
    """A runner with K attached adapters, stepped once, and passes of T tokens over them."""

    def __init__(self, folder: Path) -> None:
        self.runner = ModelRunner(folder, folder.name)
        self.adapters = [Adapter.create(LoraSpec(rank=RANK, seed=i), self.runner.layers)
                         for i in range(RUNS)]
        self.slots = [self.runner.attach(a) for a in self.adapters]
        self.rng = np.random.default_rng(0)
        self.forward_backward(8 * RUNS)
        for a in self.adapters:
            a.optim_step(AdamSpec(learning_rate=1e-3))  # optimizer state made; gradients freed

    def forward_backward(self, tokens: int) -> None:
        vocab, rows = self.runner.vocab_size, []
        for slot in self.slots:
            left = tokens // RUNS
            while left > 0:
                n = min(WIDTH, left)
                left -= n
                rows.append((slot, DatumIn(self.rng.integers(3, vocab, n),
                                           {"target_tokens": self.rng.integers(3, vocab, n)})))
        lps = self.runner.target_logprobs(rows, grad=True)
        torch.stack([lp.sum() for lp in lps]).sum().backward()

    def peak_bytes(self, tokens: int) -> int:
        """The allocator's peak of live bytes allocated during one pass (see the docstring)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.forward_backward(tokens)
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        assert totals, "the profiler reported no memory events"
        return max(totals)


@pytest.mark.parametrize("name", ["tinsmith/tiny-test", "synthetic/tiny-qwen3-moe"])
def test_weights_and_adapters_are_counted_exactly(name: str) -> None:
    facts = model_facts(name, torch.float32)
    run = Pass(resolve_model_dir(name))
    run.forward_backward(64)  # gradients present beside the optimizer state: a run's peak
    assert facts.params == sum(p.numel() for p in run.runner.model.parameters())
    assert facts.weight_bytes == _weight_bytes(run.runner.model)
    plan = plan_memory(facts, pass_tokens=0, runs=RUNS, rank=RANK)
    assert plan.weights == facts.weight_bytes and plan.gathered == plan.activations == 0
    assert plan.adapters == _state_bytes(run.adapters)


@pytest.mark.parametrize(("name", "tokens"), [
    ("small-llama", 2048), ("small-qwen3-moe", 2048),
    ("synthetic/tiny-qwen3-moe", 4096),
    ("tinsmith/tiny-test", 2048),  # vocabulary 49152: two chunks of the unembedding
])
def test_plan_is_within_15_percent_of_a_measured_pass(name: str, tokens: int, tmp_path: Path) -> None:
    folder = _folder(name, tmp_path)
    from transformers import AutoConfig

    facts = model_facts(name, torch.float32, config=AutoConfig.from_pretrained(folder))
    run = Pass(folder)
    resident = _weight_bytes(run.runner.model) + _state_bytes(run.adapters)
    pass_peak = run.peak_bytes(tokens)
    measured = resident + pass_peak
    plan = plan_memory(facts, pass_tokens=tokens, runs=RUNS, rank=RANK)
    ratio = plan.total / measured
    print(f"{name} {tokens} tokens: planned {plan.total / 2**20:.1f} MiB (activations "
          f"{plan.activations / 2**20:.1f}, logits {plan.logits / 2**20:.1f}), measured "
          f"{measured / 2**20:.1f} MiB (pass {pass_peak / 2**20:.1f}): {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, ratio


def test_sharding_and_the_largest_pass() -> None:
    """FSDP2 over N devices: weights and adapters / N, activations of T / N tokens, two
    units gathered whole; the largest pass fits and one more token a device does not."""
    facts = model_facts("synthetic/tiny-qwen3-moe", torch.bfloat16)
    one = plan_memory(facts, pass_tokens=4096, runs=3, rank=16)
    eight = plan_memory(facts, pass_tokens=4096, devices=8, runs=3, rank=16)
    assert eight.weights == -(-one.weights // 8) and eight.adapters == -(-one.adapters // 8)
    assert eight.activations == one.activations // 8 and one.gathered == 0
    assert eight.gathered == sum(sorted(facts.unit_bytes)[-2:]) > 0
    assert facts.weight_bytes == sum(facts.unit_bytes)
    for devices in (1, 8):
        device = parse_bytes("96MiB")
        most = max_pass_tokens(facts, device, devices=devices, runs=3, rank=16)
        assert most > 0 and most % devices == 0
        fits = plan_memory(facts, pass_tokens=most, devices=devices, runs=3, rank=16)
        over = plan_memory(facts, pass_tokens=most + devices, devices=devices, runs=3, rank=16)
        assert fits.total <= device < over.total
    assert max_pass_tokens(facts, parse_bytes("1MiB")) == 0


def test_the_big_shapes_from_their_configs() -> None:
    """The 70B and 235B MoE shapes plan from their configs alone (meta device, no weights):
    their published parameter counts, one LoRA pair per expert."""
    llama = model_facts("synthetic/llama-3.1-70b")
    assert round(llama.params / 1e9, 1) == 70.6 and llama.weight_bytes > 2 * llama.params
    moe = model_facts("synthetic/qwen3-235b-a22b")
    assert round(moe.params / 1e9) == 235
    # Per layer: 4 attention pairs, 128 gate_up and 128 down pairs; and lm_head.
    assert len(moe.lora_shapes) == 94 * (4 + 2 * 128) + 1


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert tinsmith_cli(["plan", "--model", "synthetic/llama-3.1-8b", "synthetic/tiny-qwen3-moe",
                         "--devices", "8", "--runs", "4", "--pass-tokens", "16384",
                         "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "8 x 80.0 GiB" in out and "synthetic/llama-3.1-8b" in out and "8.03B" in out
    assert "tokens" in out and "synthetic/tiny-qwen3-moe" in out
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1.5 TiB") == 3 * 2**39
    assert parse_bytes("141e9") == 141 * 10**9
