"""Server-side `dpo` (one pass) against the SDK's two-pass client-side DPO
(`forward_backward_custom`), on the same preference pairs and model, in one run.

Arms (steps interleaved, so both see the same machine state):
  server   forward_backward(pairs, "dpo", {"beta": b}) then optim_step: one forward+backward
  client   forward_backward_custom(pairs, dpo_fn) then optim_step: a forward pass, the DPO
           loss and its gradient on the client, then a second forward+backward pass
Both runs start from the same weights (same LoRA seed) and take the same steps, so their
losses must agree; the script checks that (1e-3) before printing the ratio. Reference
logprobs are computed once, before timing (a real loop caches them the same way).
The server is a separate `tinsmith serve` process.

    python bench/dpo_one_pass.py                          # bundled SmolLM2-135M
    python bench/dpo_one_pass.py --model tinsmith/tiny-test --steps 20
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np
import tinker
from step_overhead import start_server, summary
from tinker import types

from tinsmith.config import DEFAULT_MODEL
from tinsmith.recipes.dpo import client_dpo


def make_pairs(vocab: int, pairs: int, prompt_len: int, response_len: int) -> list[types.Datum]:
    """Datum 2i = prompt + chosen, 2i+1 = prompt + rejected; weights 1 on the response."""
    rng = np.random.default_rng(0)
    data = []
    for _ in range(pairs):
        prompt = rng.integers(3, vocab, size=prompt_len).tolist()
        for _ in range(2):
            ids = prompt + rng.integers(3, vocab, size=response_len).tolist()
            w = np.r_[np.zeros(prompt_len - 1), np.ones(response_len)].astype(np.float32)
            data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                    loss_fn_inputs={"target_tokens": ids[1:], "weights": w}))
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    from tinsmith.models import resolve_model_dir

    vocab = int(__import__("json").loads((resolve_model_dir(args.model) / "config.json").read_text())["vocab_size"])
    data = make_pairs(vocab, args.pairs, args.prompt_len, args.response_len)
    adam = types.AdamParams(learning_rate=1e-4)
    print(f"model {args.model}, {args.pairs} pairs of {args.prompt_len}-token prompts with "
          f"{args.response_len}-token responses, LoRA rank {args.rank}, {args.steps} timed steps "
          f"after {args.warmup} warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model, Path(tmp))
        try:
            sc = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            server, client = (sc.create_lora_training_client(base_model=args.model, rank=args.rank, seed=0).result()
                              for _ in range(2))
            refs = server.forward(data, "cross_entropy").result().loss_fn_outputs
            data = [types.Datum(model_input=d.model_input,
                                loss_fn_inputs={**d.loss_fn_inputs, "ref_logprobs": r["logprobs"]})
                    for d, r in zip(data, refs)]
            loss_fn = client_dpo(args.beta, 0.0)
            times: dict[str, list[float]] = {"server": [], "client": []}
            losses: dict[str, list[float]] = {"server": [], "client": []}
            for i in range(args.warmup + args.steps):
                for arm in ("server", "client"):
                    t0 = time.perf_counter()
                    if arm == "server":
                        out = server.forward_backward(data, "dpo", {"beta": args.beta}).result()
                        server.optim_step(adam).result()
                    else:
                        out = client.forward_backward_custom(data, loss_fn).result()
                        client.optim_step(adam).result()
                    losses[arm].append(out.metrics["loss:sum"])
                    if i >= args.warmup:
                        times[arm].append(time.perf_counter() - t0)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)

    np.testing.assert_allclose(losses["server"], losses["client"], rtol=1e-3,
                               err_msg="server-side dpo and client-side DPO disagree")
    print("losses agree (rtol 1e-3):", " ".join(f"{x:.4f}" for x in losses["server"][:4]), "...")
    print(f"server-side dpo, one pass        {summary(times['server'])}")
    print(f"client-side DPO, two passes      {summary(times['client'])}")
    ratio = statistics.median(times["client"]) / statistics.median(times["server"])
    print(f"speed-up server / client: {ratio:.2f}x   (goal >= 1.6x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
