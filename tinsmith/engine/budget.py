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

The memory planner (engine/plan.py, `tinsmith plan`) counts a pass's activations tensor by
tensor instead (`saved_bytes_per_token`, in the model's dtype), and a run's resident state
with `adapter_bytes`, the same figure the resident-runs budget uses.
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
    layers = int(text.num_hidden_layers)
    vocab = 0 if chunked_vocab else int(text.vocab_size)
    return 4 * (3 * vocab + layers * (6 * hidden + 3 * mlp_width(text)))


# Model types whose attention normalises q and k per head (q_norm, k_norm): those keep q, k.
_QK_NORM = {"qwen3", "qwen3_moe", "qwen3_vl_text", "olmo2", "olmo3", "gemma3_text"}


def saved_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """One token's activations saved for the backward of a training pass, counted tensor by
    tensor, the unembedding left out (its chunk is a fixed cost: engine/plan.py). Bytes.

    Per decoder layer, in `dtype` but for the norms' float32 inputs:
    - each of the two RMSNorms keeps its input in float32 and its output (the LoRA input);
    - attention keeps v, rotated q and k, its output and o_proj's input (3 x hidden + 2 x kv
      width); with per-head q/k norms (Qwen3) also q and k before them;
    - a dense MLP keeps gate, up, the activation and the product (4 x intermediate); a MoE
      layer the same for each of its k experts, plus three hidden-sized vectors for each
      (token, expert) pair (its sorted input and outputs in moe_kernels.py, counted with
      saved-tensor hooks) and the router's probabilities.
    After the last layer: the final norm and the positions gathered for the unembedding.
    Checked against the CPU allocator's peak in tests/test_plan.py. `activation_bytes_per_
    token` stays the pass budget's estimate (calibrated on an H200, see its docstring).
    """
    text = getattr(config, "text_config", None) or config
    e = torch.empty((), dtype=dtype).element_size()
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    norm = 4 * hidden + e * hidden  # float32 input, output in dtype
    attn = e * (3 * q + 2 * kv)
    if str(text.model_type) in _QK_NORM:
        attn += 4 * (q + kv)  # q and k before their norms, in float32
    experts = int(getattr(text, "num_experts", 0) or getattr(text, "num_local_experts", 0) or 0)
    k = int(getattr(text, "num_experts_per_tok", 0) or 0)
    mlp = e * 4 * mlp_width(text)
    if experts and k:
        mlp += e * 3 * k * hidden + 4 * 2 * experts
    layers = int(text.num_hidden_layers)
    return layers * (2 * norm + attn + mlp) + norm + e * hidden


def mlp_width(config) -> int:
    """The MLP width one token passes through: `intermediate_size`, or in a mixture of
    experts its k experts' widths (Qwen3-MoE: `moe_intermediate_size` each; Mixtral, whose
    experts are `num_local_experts`: `intermediate_size` each)."""
    width = int(getattr(config, "intermediate_size", 4 * int(config.hidden_size)))
    k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if k and getattr(config, "num_experts", None) and getattr(config, "moe_intermediate_size", None):
        return k * int(config.moe_intermediate_size)
    if k and getattr(config, "num_local_experts", None):
        return k * width
    return width


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
    return max(2, int(fraction * free_bytes // adapter_bytes(layer_shapes, rank)))


def adapter_bytes(layer_shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Bytes one resident training run holds: a rank-`rank` pair A [r, in], B [out, r] on
    every (in, out) of `layer_shapes`, four times over (factors, gradients, AdamW's two
    moments), all float32; AdamW's per-factor step counters (4 bytes each) left out."""
    return 4 * 4 * rank * sum(i + o for i, o in layer_shapes)
