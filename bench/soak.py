"""Soak test: many concurrent SDK clients train, sample and save against one server for a fixed
time, then stop by themselves; checks that no future is lost and prints future latencies.

Each client (a thread with its own ServiceClient and LoRA training run) loops: forward_backward
and optim_step sent back to back, then both awaited; every `--sample-every` steps a sample from
a sampler snapshot of its run; every `--save-every` steps a save_state. Latency is the time from
the SDK call to its `.result()` returning. At the end every submitted future must have resolved
with a result: the script exits 1 if one raised, timed out, or was never answered.

    python bench/soak.py                                  # 16 clients, 180 s, tinsmith/tiny-test
    python bench/soak.py --clients 32 --duration 600 --model HuggingFaceTB/SmolLM2-135M-Instruct
    python bench/soak.py --url http://127.0.0.1:8000      # against a running server

Without --url it starts `tinsmith serve` in a subprocess on a temporary data dir.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import numpy as np
import tinker
from tinker import types

TINY = "tinsmith/tiny-test"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tinsmiths shape sheet metal with hammers and snips.",
    "A LoRA adapter adds a low-rank update to each weight matrix.",
    "Lighthouses guide ships past dangerous rocks at night.",
]


@dataclass
class SoakResult:
    clients: int
    duration_s: float
    submitted: int = 0
    resolved: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def table(self) -> str:
        rows = [f"{'kind':18s} {'count':>7s} {'p50 ms':>9s} {'p99 ms':>9s} {'max ms':>9s}"]
        for kind in sorted(self.latencies):
            ms = np.asarray(self.latencies[kind]) * 1000
            rows.append(f"{kind:18s} {len(ms):7d} {np.percentile(ms, 50):9.1f} "
                        f"{np.percentile(ms, 99):9.1f} {ms.max():9.1f}")
        rows.append(f"{self.clients} clients, {self.duration_s:.0f} s: {self.submitted} futures "
                    f"submitted, {self.resolved} resolved with a result, "
                    f"{len(self.errors)} failed, "
                    f"{self.submitted - self.resolved - len(self.errors)} never answered "
                    f"({self.resolved / self.duration_s:.1f} results/s)")
        return "\n".join(rows)


class _Tally:
    """What every client thread adds to: counts and latencies under one lock."""

    def __init__(self, result: SoakResult, result_timeout_s: float,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.result = result
        self.result_timeout_s = result_timeout_s  # a future not answered by then is lost
        self.on_lost = on_lost  # called at once with the error line of a future not answered
        self.lock = threading.Lock()
        self.start = time.monotonic()

    def submit(self) -> float:
        with self.lock:
            self.result.submitted += 1
        return time.monotonic()

    def wait(self, kind: str, started: float, future: Any) -> Any:
        try:
            value = future.result(timeout=self.result_timeout_s)
        except TimeoutError:  # concurrent.futures' (the same class since Python 3.11)
            line = (f"{kind}: no result {self.result_timeout_s:.0f} s after it was sent "
                    f"(at +{started - self.start:.1f} s)")
            with self.lock:
                self.result.errors.append(line)
            if self.on_lost is not None:
                self.on_lost(line)  # while the server still holds whatever it holds
            return None
        except Exception as e:  # noqa: BLE001 - a failed future is what this script counts
            with self.lock:
                self.result.errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])
            return None
        with self.lock:
            self.result.resolved += 1
            self.result.latencies[kind].append(time.monotonic() - started)
        return value


def _client(url: str, api_key: str, model: str, index: int, deadline: float, tally: _Tally,
            sample_every: int, save_every: int) -> None:
    try:
        _loop(url, api_key, model, index, deadline, tally, sample_every, save_every)
    except Exception as e:  # noqa: BLE001 - outside any future (e.g. the tokenizer): counted too
        with tally.lock:
            tally.result.errors.append(f"client {index}: {type(e).__name__}: {e}"[:300])


def _loop(url: str, api_key: str, model: str, index: int, deadline: float, tally: _Tally,
          sample_every: int, save_every: int) -> None:
    sc = tinker.ServiceClient(base_url=url, api_key=api_key)
    t = tally.submit()
    tc = tally.wait("create_model", t,
                    sc.create_lora_training_client(base_model=model, rank=4, seed=index))
    if tc is None:
        return
    tok = tc.get_tokenizer()
    data = []
    for text in TEXTS:
        ids = tok.encode(text)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:],
                                                "weights": [1.0] * (len(ids) - 1)}))
    prompt = types.ModelInput.from_ints(tok.encode("Tinsmiths"))
    adam = types.AdamParams(learning_rate=1e-3)
    sampler = None
    step = 0
    while time.monotonic() < deadline:
        batch = [data[(step + index) % len(data)], data[(step + index + 1) % len(data)]]
        t_fb, fb = tally.submit(), tc.forward_backward(batch, "cross_entropy")
        t_opt, opt = tally.submit(), tc.optim_step(adam)
        tally.wait("forward_backward", t_fb, fb)
        tally.wait("optim_step", t_opt, opt)
        step += 1
        if sample_every and step % sample_every == 0:
            if sampler is None:
                t = tally.submit()
                sampler = tally.wait("sampler_snapshot", t,
                                     tc.save_weights_and_get_sampling_client())
            if sampler is not None:
                t = tally.submit()
                params = types.SamplingParams(max_tokens=8, seed=step)
                tally.wait("sample", t, sampler.sample(prompt, 1, params))
        if save_every and step % save_every == 0:
            t = tally.submit()
            tally.wait("save_state", t, tc.save_state(f"soak-{step}"))


def run_soak(url: str, *, clients: int, duration_s: float, model: str = TINY,
             api_key: str = "tml-soak", sample_every: int = 4, save_every: int = 10,
             progress_every_s: float = 0.0, result_timeout_s: float = 300.0,
             on_lost: Callable[[str], None] | None = None) -> SoakResult:
    """Run the soak against `url`; returns when every client has stopped and been answered.
    `on_lost` is called with its line as soon as a future is not answered in time."""
    result = SoakResult(clients, duration_s)
    tally = _Tally(result, result_timeout_s, on_lost)
    start = tally.start
    deadline = start + duration_s
    threads = [threading.Thread(target=_client, name=f"soak-{i}", daemon=True,
                                args=(url, api_key, model, i, deadline, tally, sample_every,
                                      save_every))
               for i in range(clients)]
    for th in threads:
        th.start()
    next_report = start + progress_every_s
    for th in threads:
        while th.is_alive():
            th.join(max(0.0, next_report - time.monotonic()) if progress_every_s else None)
            if progress_every_s and time.monotonic() >= next_report:
                next_report += progress_every_s
                elapsed = time.monotonic() - start
                with tally.lock:
                    done, failed = result.resolved, len(result.errors)
                print(f"[{elapsed:5.0f} s] {done} results ({done / elapsed:.1f}/s), "
                      f"{failed} failed, "
                      f"ETA {max(0.0, deadline - time.monotonic()):.0f} s", flush=True)
    result.duration_s = time.monotonic() - start
    return result


def main() -> int:
    from step_overhead import start_server  # a sibling script; tests import this module alone

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of submitting")
    ap.add_argument("--model", default=TINY)
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--api-key", default="tml-soak")
    ap.add_argument("--sample-every", type=int, default=4, help="steps between samples (0: none)")
    ap.add_argument("--save-every", type=int, default=10, help="steps between save_state (0: none)")
    ap.add_argument("--progress-every", type=float, default=15.0,
                    help="seconds between progress lines")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinsmith-soak-") as tmp:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(args.model, Path(tmp))
        try:
            result = run_soak(url, clients=args.clients, duration_s=args.duration, model=args.model,
                              api_key=args.api_key, sample_every=args.sample_every,
                              save_every=args.save_every, progress_every_s=args.progress_every)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
    print(result.table())
    for e in result.errors[:10]:
        print("failed:", e)
    return 0 if result.resolved == result.submitted else 1


if __name__ == "__main__":
    sys.exit(main())
