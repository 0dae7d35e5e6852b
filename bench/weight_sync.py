"""Weight sync and GRPO-shaped sampling through the SDK: Tinsmith's own sampler against the
vLLM sampler (`--sampler vllm`), side by side in one run (docs/sampling.md, "vLLM as the
sampler").

Two Tinsmith servers on loopback serve the same base model: one samples natively, the other
through a vLLM server it starts from vLLM's own environment (scripts/setup_vllm.sh), or the
one at --vllm-url. On each, one seeded LoRA run (rank 32) trains and:

  sync   save_weights_and_get_sampling_client -> the first sampled token (max_tokens=1),
         after an optim_step each time, so every round is a new snapshot. Natively the
         snapshot stays in memory (in-process, no disk); with vLLM it is written as a PEFT
         folder and loaded by name on its first request (a disk round trip).
  S4     a GRPO-shaped load under the newest snapshot: P prompts x S samples x T new tokens
         (temperature 1, no stops), all submitted at once; generated tokens / wall seconds.
         The issue's shape is 64 x 8 x 256 on a GPU; the CPU default is 8 x 4 x 32.
         --base samples the base model instead (no LoRA in the batch).

Arms alternate for --repeats rounds; medians are printed with the vLLM / native ratio.

    .venv/bin/python bench/weight_sync.py                        # bundled SmolLM2-135M, CPU
    .venv/bin/python bench/weight_sync.py --prompts 64 --samples 8 --max-tokens 256  # a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tinker
from tinker import types

import tinsmith
from tinsmith.config import DEFAULT_MODEL

API_KEY = "tml-bench"


def progress(msg: str) -> None:
    print(f"\r[bench] {msg:<70}", end="", file=sys.stderr, flush=True)


class Arm:
    """One server's training run and what it measures."""

    def __init__(self, name: str, url: str, model: str, tokenizer_text: str) -> None:
        self.name = name
        self.client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        self.tc = self.client.create_lora_training_client(base_model=model, rank=32, seed=5).result()
        tok = self.tc.get_tokenizer()
        ids = tok.encode(tokenizer_text)
        self.datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                 loss_fn_inputs={"target_tokens": ids[1:],
                                                 "weights": [1.0] * (len(ids) - 1)})
        self.prompts = [types.ModelInput.from_ints(tok.encode(f"Question {i}: what is {i} + {i}?"))
                        for i in range(256)]
        self.sampler: tinker.SamplingClient | None = None
        self.sync_s: list[float] = []
        self.tps: list[float] = []

    def sync(self) -> None:
        """One optim step, then save_weights_and_get_sampling_client -> first sampled token."""
        self.tc.forward_backward([self.datum], "cross_entropy").result()
        self.tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        start = time.perf_counter()
        self.sampler = self.tc.save_weights_and_get_sampling_client().result()
        out = self.sampler.sample(self.prompts[0], 1,
                                  types.SamplingParams(max_tokens=1, temperature=0.0, stop=[])).result()
        self.sync_s.append(time.perf_counter() - start)
        assert len(out.sequences[0].tokens) == 1

    def s4(self, prompts: int, samples: int, max_tokens: int, seed: int, base: str | None) -> None:
        sampler = (self.client.create_sampling_client(base_model=base).result() if base
                   else self.sampler)
        assert sampler is not None
        params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop=[])
        start = time.perf_counter()
        futs = [sampler.sample(p, samples, params) for p in self.prompts[:prompts]]
        outs = [f.result() for f in futs]
        wall = time.perf_counter() - start
        tokens = sum(len(s.tokens) for o in outs for s in o.sequences)
        assert tokens == prompts * samples * max_tokens, tokens
        self.tps.append(tokens / wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-url", default=None, help="a running vLLM server (default: start one)")
    ap.add_argument("--vllm-python", default=None, help="vLLM's Python (default .venv-vllm/bin/python)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--base", action="store_true", help="S4 on the base model, not the snapshot")
    args = ap.parse_args()
    text = "Tinsmiths shape sheet metal with hammers and snips."
    base = args.model if args.base else None
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tinsmith-bench-")))
        progress("starting the native server")
        native_url = stack.enter_context(tinsmith.local(
            models=[args.model], data_dir=tmp / "native", device=args.device))
        progress("starting the vLLM-backed server (vLLM itself takes ~35 s or more)")
        vllm_url = stack.enter_context(tinsmith.local(
            models=[args.model], data_dir=tmp / "vllm", device=args.device, sampler="vllm",
            vllm_url=args.vllm_url,
            vllm_python=Path(args.vllm_python) if args.vllm_python else None))
        arms = [Arm("native", native_url, args.model, text), Arm("vllm", vllm_url, args.model, text)]
        for arm in arms:  # warm-up: first requests, first adapter load
            progress(f"warm-up {arm.name}")
            arm.sync()
            arm.s4(min(2, args.prompts), args.samples, min(4, args.max_tokens), 0, base)
            arm.sync_s.clear()
            arm.tps.clear()
        for r in range(args.repeats):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                progress(f"round {r + 1}/{args.repeats}: {arm.name}")
                arm.sync()
                arm.s4(args.prompts, args.samples, args.max_tokens, r + 1, base)
    print(file=sys.stderr)
    print(f"model {args.model}; S4 shape {args.prompts} prompts x {args.samples} samples x "
          f"{args.max_tokens} tokens under {'the base model' if base else 'the snapshot'}; "
          f"medians of {args.repeats} rounds")
    print(f"{'arm':<8} {'sync -> first token (s)':>24} {'S4 tokens/s':>12}")
    med = {a.name: (statistics.median(a.sync_s), statistics.median(a.tps)) for a in arms}
    for name, (sync, tps) in med.items():
        print(f"{name:<8} {sync:>24.3f} {tps:>12.1f}")
    (ns, nt), (vs, vt) = med["native"], med["vllm"]
    print(f"{'vllm/native':<8} {vs / ns:>24.2f} {vt / nt:>12.2f}")


if __name__ == "__main__":
    main()
