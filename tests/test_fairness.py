"""Fairness through the SDK: a run that queues many requests cannot keep a run that sends one
waiting behind all of them; the small run's request shares one of the first passes.
"""

from __future__ import annotations

import threading
import time

import tinker
from conftest import TINY, text_datum

import tinsmith


def test_a_busy_run_cannot_starve_a_light_one(tmp_path) -> None:
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        service = tinker.ServiceClient(base_url=url, api_key="tml-local")
        busy = service.create_lora_training_client(base_model=TINY, rank=4, seed=1)
        light = service.create_lora_training_client(base_model=TINY, rank=4, seed=2)
        tok = busy.get_tokenizer()
        data = [text_datum(tok, f"Sentence number {i} of a long and busy queue.") for i in range(8)]
        light.forward_backward(data[:1], "cross_entropy").result()  # warm both paths
        done: list[tuple[float, str]] = []
        lock = threading.Lock()

        def wait(fut, label: str) -> None:
            fut.result()
            with lock:
                done.append((time.monotonic(), label))

        futures = [busy.forward_backward(data, "cross_entropy") for _ in range(16)]
        waiters = [threading.Thread(target=wait, args=(f, f"busy{i}")) for i, f in enumerate(futures)]
        for t in waiters:
            t.start()
        time.sleep(0.2)  # the busy run's requests are queued before the light one arrives
        sent = time.monotonic()
        wait(light.forward_backward(data[:1], "cross_entropy"), "light")
        for t in waiters:
            t.join()
        order = [label for _, label in sorted(done)]
        light_done = next(t for t, label in done if label == "light")
        ahead = [label for t, label in done if label != "light" and sent < t < light_done]
        behind = [label for t, label in done if t > light_done]
        # In arrival order the light request would finish after every queued busy one. Taking
        # turns, only the busy pass under way when it was sent (and, if that one ended while
        # the request was on its way, the next) finish before the pass it shares.
        assert len(ahead) <= 3, order
        assert len(behind) >= 3, order  # it really arrived with busy work still queued
