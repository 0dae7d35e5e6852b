"""Per-step time of a LoRA training step through the tinker SDK over HTTP, against a plain
in-process transformers + PEFT loop doing the same math on the same model and batch.

Arms (all in one run, one after another, so they never share the CPU):
  plain      transformers + PEFT in this process: forward, -sum(w * logprob), backward, AdamW
  waiting    SDK over loopback HTTP: forward_backward(...).result(), then optim_step(...).result()
  pipelined  SDK: forward_backward and optim_step both sent, then both awaited
The server is a separate `tinsmith serve` process. The plain loop starts from the very
adapter the server initialised (its saved checkpoint), so the losses of all arms must agree;
the script checks that before it prints the ratios.

    python bench/step_overhead.py                       # bundled SmolLM2-135M, 8 x 128 tokens
    python bench/step_overhead.py --model tinsmith/tiny-test --steps 20
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import httpx
import numpy as np
import tinker
import torch
from tinker import types

from tinsmith.config import DEFAULT_MODEL
from tinsmith.models import resolve_model_dir


def start_server(model: str, data_dir: Path, extra: Sequence[str] = (), log: Path | None = None,
                 timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """`tinsmith serve` on a free loopback port, once it answers; its output to `log` if given
    (else discarded). Raises RuntimeError if it exits or is not up within `timeout_s`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "ab") if log is not None else nullcontext(subprocess.DEVNULL) as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tinsmith.cli", "serve", "--port", str(port), "--data-dir",
             str(data_dir), "--models", model, *extra],
            stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}"
                               + (f" (its output: {log})" if log is not None else ""))
        try:
            if httpx.get(f"{url}/api/v1/healthz").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not start")


def make_batch(vocab: int, batch: int, seq_len: int) -> list[types.Datum]:
    rng = np.random.default_rng(0)
    data = []
    for _ in range(batch):
        ids = rng.integers(3, vocab, size=seq_len + 1).tolist()
        w = [1.0 / seq_len] * seq_len  # mean NLL per sequence, as the cookbook's SFT does
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": w}))
    return data


def sdk_arm(tc, data, adam, steps: int, warmup: int, pipelined: bool) -> tuple[list[float], list[float]]:
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if pipelined:
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(adam)
            loss = fb.result().metrics["loss:sum"]
            opt.result()
        else:
            loss = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
            tc.optim_step(adam).result()
        losses.append(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def plain_arm(model_dir: Path, adapter_dir: Path, data, lr: float, steps: int, warmup: int):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    model.eval()  # no dropout, as the server
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=True)
    ids = torch.tensor([d.model_input.to_ints() for d in data])
    targets = torch.tensor([d.loss_fn_inputs["target_tokens"].tolist() for d in data])
    weights = torch.tensor([d.loss_fn_inputs["weights"].tolist() for d in data])
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        loss = -(weights * lp).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def summary(times: list[float]) -> str:
    p90 = sorted(times)[max(0, int(round(0.9 * len(times))) - 1)]
    return f"median {statistics.median(times):7.3f} s   p90 {p90:7.3f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    model_dir = resolve_model_dir(args.model)
    vocab = int(__import__("json").loads((model_dir / "config.json").read_text())["vocab_size"])
    data = make_batch(vocab, args.batch, args.seq_len)
    adam = types.AdamParams(learning_rate=args.lr, beta1=0.9, beta2=0.95, eps=1e-8)
    print(f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, LoRA rank {args.rank}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model, Path(tmp))
        try:
            sc = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            clients = [sc.create_lora_training_client(base_model=args.model, rank=args.rank, seed=0).result()
                       for _ in range(2)]
            init = clients[0].save_state("init").result().path
            run_id = init.split("/")[2]
            adapter_dir = Path(tmp) / "checkpoints" / run_id / "weights" / "init"
            waiting = sdk_arm(clients[0], data, adam, args.steps, args.warmup, pipelined=False)
            pipelined = sdk_arm(clients[1], data, adam, args.steps, args.warmup, pipelined=True)
            # The plain loop runs while the server idles (its model stays loaded but unused).
            plain = plain_arm(model_dir, adapter_dir, data, args.lr, args.steps, args.warmup)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)

    for name, (_, losses) in (("waiting", waiting), ("pipelined", pipelined)):
        np.testing.assert_allclose(losses, plain[1], rtol=1e-3, err_msg=f"{name} arm diverged from the plain loop")
    print("losses agree across arms (rtol 1e-3):", " ".join(f"{x:.4f}" for x in plain[1][:4]), "...")
    print(f"plain loop (transformers + PEFT)  {summary(plain[0])}")
    print(f"SDK over HTTP, waiting            {summary(waiting[0])}")
    print(f"SDK over HTTP, pipelined          {summary(pipelined[0])}")
    base = statistics.median(plain[0])
    print(f"ratio waiting   / plain: {statistics.median(waiting[0]) / base:.3f}")
    print(f"ratio pipelined / plain: {statistics.median(pipelined[0]) / base:.3f}   (goal <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
