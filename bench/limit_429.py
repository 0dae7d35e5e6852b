"""How long the SDK takes to surface a 429 (concurrent-request limit) to its caller.

A key with max_concurrent=1 holds one request pending (an optim_step sent ahead of its
run's seq order), then the SDK's TrainingClient, its SamplingClient and its low-level HTTP
client each send one request of that key. The script prints, for each, when it raised (or
that it was still waiting at --wait seconds), and releases the held request at the end.

    python bench/limit_429.py                 # about 5 minutes: the training client's retries
    python bench/limit_429.py --wait 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import httpx
import tinker
from tinker import types
from tinker._client import AsyncTinker

import tinsmith
from tinsmith.scheduler.access import ApiKeys
from tinsmith.storage.db import MetadataStore

TINY = "tinsmith/tiny-test"


def _timed(name: str, fn, wait: float, results: dict[str, str]) -> threading.Thread:
    def run() -> None:
        start = time.monotonic()
        try:
            fn()
            results[name] = f"succeeded after {time.monotonic() - start:.1f} s"
        except Exception as e:  # noqa: BLE001 - what it raised is the measurement
            results[name] = f"raised {type(e).__name__} after {time.monotonic() - start:.1f} s"

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wait", type=float, default=330.0, help="seconds to wait for the clients")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = MetadataStore(f"sqlite:///{Path(d) / 'tinsmith.db'}")
        key = ApiKeys(db).create("bench", max_concurrent=1).key
        db.close()
        with tinsmith.local(models=[TINY], data_dir=d) as url:
            sc = tinker.ServiceClient(base_url=url, api_key=key)
            tc = sc.create_lora_training_client(base_model=TINY, rank=2).result()
            holder = sc.create_lora_training_client(base_model=TINY, rank=2).result()
            sampler = tc.save_weights_and_get_sampling_client().result()
            http = httpx.Client(base_url=url, headers={"X-API-Key": key})
            hold = http.post("/api/v1/optim_step", json={
                "model_id": holder.model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}})
            assert hold.status_code == 200, hold.text

            async def low_level() -> None:
                client = AsyncTinker(base_url=url, api_key=key)  # default max_retries
                try:
                    await client.training.optim_step(request=types.OptimStepRequest(
                        model_id=holder.model_id, seq_id=3,
                        optim_params=types.AdamParams(learning_rate=1e-3)))
                finally:
                    await client.close()

            results: dict[str, str] = {}
            threads = [
                _timed("TrainingClient.optim_step", lambda: tc.optim_step(
                    types.AdamParams(learning_rate=1e-3)).result(), args.wait, results),
                _timed("SamplingClient.sample", lambda: sampler.sample(
                    types.ModelInput.from_ints([1, 2, 3]), 1,
                    types.SamplingParams(max_tokens=2)).result(), args.wait, results),
                _timed("low-level AsyncTinker (max_retries=10)",
                       lambda: asyncio.run(low_level()), args.wait, results),
            ]
            deadline = time.monotonic() + args.wait
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            for name in ("TrainingClient.optim_step", "SamplingClient.sample",
                         "low-level AsyncTinker (max_retries=10)"):
                print(f"{name:42s} {results.get(name, f'still waiting after {args.wait:.0f} s')}")
            http.post("/api/v1/optim_step", json={  # release the held request
                "model_id": holder.model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}})


if __name__ == "__main__":
    main()
