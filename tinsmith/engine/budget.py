"""Memory budgets of one model: the tokens a training pass may hold (and how a big request
splits into micro-batches), and how many training runs stay resident.

A forward/backward pass keeps every layer's saved activations until its backward, so its
memory grows with the tokens it holds (rows x padded width). The pass budget is derived
once per model from the model's shape and the memory free when it is loaded:

    budget = fraction * free_bytes / activation_bytes_per_token

The per-token estimate counts, in float32, three vocabulary-wide vectors for the
unembedding (logits, log-softmax and its gradient) and, per decoder layer, six
hidden-sized and three intermediate-sized vectors (norm inputs, attention q/k/v/output,
LoRA inputs, the MLP's gate/up/activation). On the bundled SmolLM2-135M it gives 1521 KiB a
token; a pass of 1024-2048 tokens measures about 1455 KiB a token, a small pass more, as it
carries a fixed ~100 MiB (`bench/pass_memory.py` prints both). A request bigger than the
budget is split into micro-batches by `micro_batches`; packing never puts more than the
budget in one pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

MIN_PASS_TOKENS = 256  # below this a pass is all overhead; a datum longer still runs alone
MAX_PASS_TOKENS = 65536  # beyond this nothing is gained, and one pass would hold the model long
# On a CPU a packed pass computes each request's products on its own block (bitwise equal to
# solo), so packing saves only per-pass overhead, which is spent by ~1k tokens; beyond that a
# bigger pass only holds more memory (bench/multi_tenant.py --large-runs 4: 1024-token requests
# of 4 runs packed 4 to a pass, `--server-args "--pass-tokens 4096"`, peaked at 7.5 GiB against
# 5.2 GiB one to a pass, and were no faster).
CPU_PASS_TOKENS = 1024


def activation_bytes_per_token(config, *, chunked_vocab: bool = False) -> int:
    """Upper estimate of one token's saved activations in a training pass (float32 bytes).
    `chunked_vocab`: the unembedding runs in chunks that are recomputed in the backward
    (runner.LOGIT_CHUNK_BYTES), so its vocabulary-wide vectors are a fixed cost, not a
    per-token one (a pass on a GPU; on a CPU a pass of the capped size is one chunk)."""
    text = getattr(config, "text_config", None) or config
    hidden = int(text.hidden_size)
    inter = int(getattr(text, "intermediate_size", 4 * hidden))
    layers = int(text.num_hidden_layers)
    vocab = 0 if chunked_vocab else int(text.vocab_size)
    return 4 * (3 * vocab + layers * (6 * hidden + 3 * inter))


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for activations now: the accelerator's free memory, or the host's
    MemAvailable (Linux) / physical memory elsewhere."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def pass_token_budget(config, free_bytes: int, fraction: float, device: str = "cpu") -> int:
    """Tokens a pass may hold so its activations take at most `fraction` of `free_bytes`,
    and on a CPU no more than CPU_PASS_TOKENS (where more gains no speed)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"pass memory fraction must be in (0, 1], got {fraction}")
    tokens = int(fraction * free_bytes // activation_bytes_per_token(config, chunked_vocab=device != "cpu"))
    cap = CPU_PASS_TOKENS if device == "cpu" else MAX_PASS_TOKENS
    return max(MIN_PASS_TOKENS, min(cap, tokens))


def padded_tokens(lengths: Sequence[int]) -> int:
    """What a batch of rows holds once right-padded: rows x longest row."""
    return len(lengths) * max(lengths) if lengths else 0


def micro_batches(lengths: Sequence[int], budget: int) -> list[range]:
    """Consecutive index ranges of the rows, each within `budget` padded tokens (a row
    longer than the budget gets a range of its own). Depends only on the lengths and the
    budget, so a request splits the same way whether it runs alone or beside others."""
    out: list[range] = []
    start, longest = 0, 0
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if i > start and (i - start + 1) * wider > budget:
            out.append(range(start, i))
            start, wider = i, n
        longest = wider
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def adapter_layer_shapes(layers: Iterable[object]) -> list[tuple[int, int]]:
    """The (in, out) of every LoRA pair a run's adapter holds on `layers` (a runner's adapted
    layers): one per layer, one per expert of a mixture-of-experts layer (engine/moe.py)."""
    return [(m.in_features, m.out_features)  # type: ignore[attr-defined]
            for m in layers for _ in range(getattr(m, "num_experts", 1))]


def resident_runs_budget(layer_shapes: Sequence[tuple[int, int]], free_bytes: int,
                         fraction: float, rank: int = 32) -> int:
    """Training runs kept in memory: a rank-`rank` adapter on every (in, out) layer costs
    its factors four times over (weights, gradients, two AdamW moments), float32; runs
    beyond this many are spilled to disk when idle (engine/pool.py). At least 2."""
    per_run = 4 * 4 * rank * sum(i + o for i, o in layer_shapes)
    return max(2, int(fraction * free_bytes // per_run))
