"""The sampling phases of the GPU check (issue 14), on the plan's small model:

- plain-generate    plain Hugging Face `generate` on the same synthetic model (the plan's
                    dtype, sdpa attention, temperature 1, no top-k/top-p, every row forced to
                    `sample_tokens` new tokens): tokens/s at batch `sample_requests` and at
                    batch 1, median of `sample_rounds`
- server-sampling   `tinsmith serve` + the official SDK, the server's default sampler:
                    S1 `sample_requests` concurrent requests on one adapter, S2 one request
                    alone, S3 the S1 requests spread over `sample_adapters` adapters; arms
                    alternate for `sample_rounds` rounds after one untimed round each
- server-sampling-eager   the same with `--sampler-cuda-graphs off` (only with bench.py
                    --sampler-graphs-off): what the graphs bring

Both draw the same seeded prompts (`prompts`), of exactly `sample_prompt` tokens, and count
the tokens actually generated (a request may stop early at an end-of-sequence token; HF's
rows cannot). The table (table.py) divides S1 by generate at batch N, S2 by generate at batch
1, and S3 by S1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from phases import API_KEY, Recorder, median, model_config, server, sync, torch_dtype
from plan import Plan


def prompts(vocab: int, n: int, length: int) -> np.ndarray:
    """[n, length] seeded token ids, the same for both phases (ids 0-2 are left out: the
    synthetic tokenizers' specials sit above the 256 bytes, so low ids are ordinary bytes)."""
    return np.random.default_rng(0).integers(3, min(vocab, 256), size=(n, length))


def phase_plain_generate(plan: Plan, rec: Recorder, workdir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = model_config(plan.small)
    rec.say(f"building {plan.small} ({plan.dtype}) on {plan.device}")
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(plan), attn_implementation="sdpa").eval()
    rows = torch.as_tensor(prompts(cfg.vocab_size, plan.sample_requests, plan.sample_prompt), device=plan.device)

    def generate(batch: int, new_tokens: int) -> tuple[float, int]:
        """(seconds, tokens generated) of one `generate` call on the first `batch` prompts."""
        ids = rows[:batch]
        sync(plan)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)
        sync(plan)
        return time.perf_counter() - t0, int(out[:, ids.shape[1]:].numel())

    batches = (plan.sample_requests, 1)
    for b in batches:  # untimed: kernels, caches, lazy initialisation
        generate(b, 4)
    times: dict[int, list[float]] = {b: [] for b in batches}
    tokens: dict[int, int] = {}
    for r in range(plan.sample_rounds):
        for b in batches:
            s, tokens[b] = generate(b, plan.sample_tokens)
            times[b].append(s)
            rec.say(f"round {r + 1}: batch {b} {s:.3f} s")
    for b in batches:
        s = median(times[b])
        rec.emit("generate", tag=f"batch{b}", model=plan.small, batch=b, prompt=plan.sample_prompt,
                 new_tokens=plan.sample_tokens, median_s=round(s, 5), tokens=tokens[b],
                 tokens_per_s=round(tokens[b] / s, 2))


def server_sampling(plan: Plan, rec: Recorder, workdir: Path, suffix: str = "",
                    extra: Sequence[str] = ()) -> None:
    """S1-S3 on a fresh server started with `extra` flags; records tagged s1<suffix>..."""
    import tinker
    from multi_tenant import Call, concurrent, trained_samplers
    from tinker import types

    vocab = int(model_config(plan.small).vocab_size)
    rows = prompts(vocab, plan.sample_requests, plan.sample_prompt)
    with server(plan, plan.small, workdir, rec, extra=extra) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        rec.say(f"training {plan.sample_adapters} adapters one step each")
        samplers = trained_samplers(sc, plan.small, vocab, plan.sample_adapters)

        def calls(n: int, spread: int) -> list[Call]:
            """The first n prompts, request i on adapter i % spread, seeded by i."""
            return [(samplers[i % spread], types.ModelInput.from_ints(rows[i].tolist()),
                     types.SamplingParams(max_tokens=plan.sample_tokens, temperature=1.0, seed=i, stop=[]))
                    for i in range(n)]

        arms = {"s1": calls(plan.sample_requests, 1), "s2": calls(1, 1),
                "s3": calls(plan.sample_requests, plan.sample_adapters)}
        for arm, cs in arms.items():  # untimed: adapters loaded, kernels (and any graphs) ready
            rec.say(f"warming {arm}")
            concurrent(cs)
        times: dict[str, list[float]] = {a: [] for a in arms}
        tokens: dict[str, int] = {}
        for r in range(plan.sample_rounds):
            for arm, cs in arms.items():
                s, out = concurrent(cs)
                times[arm].append(s)
                tokens[arm] = sum(len(t) for t in out)
                rec.say(f"round {r + 1}: {arm} {s:.3f} s, {tokens[arm]} tokens")
        for arm, cs in arms.items():
            s = median(times[arm])
            rec.emit("sampling", tag=arm + suffix, model=plan.small, requests=len(cs), prompt=plan.sample_prompt,
                     new_tokens=plan.sample_tokens, adapters=len({id(c[0]) for c in cs}),
                     median_s=round(s, 5), tokens=tokens[arm], tokens_per_s=round(tokens[arm] / s, 2))


def phase_server_sampling(plan: Plan, rec: Recorder, workdir: Path) -> None:
    server_sampling(plan, rec, workdir)


def phase_server_sampling_eager(plan: Plan, rec: Recorder, workdir: Path) -> None:
    """S1-S3 again with the sampler's CUDA graphs off (bench.py --sampler-graphs-off)."""
    server_sampling(plan, rec, workdir, "-eager", ["--sampler-cuda-graphs", "off"])


PHASE_FUNCS = {
    "plain-generate": phase_plain_generate,
    "server-sampling": phase_server_sampling,
    "server-sampling-eager": phase_server_sampling_eager,
}
