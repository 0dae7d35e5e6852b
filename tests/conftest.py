"""Shared fixtures: a real Tinsmith HTTP server on a loopback port, and SDK clients for it.

The server runs the tiny test model (`tinsmith/tiny-test`) and is shared by the whole
session; tests that need their own server (restart, bad input isolation) start one.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

import tinsmith

TINY = "tinsmith/tiny-test"
API_KEY = "tml-test"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tinsmith-data")


@pytest.fixture(scope="session")
def base_url(data_dir: Path) -> Iterator[str]:
    with tinsmith.local(models=[TINY], data_dir=data_dir) as url:
        yield url


@pytest.fixture(scope="session")
def service_client(base_url: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=base_url, api_key=API_KEY)


@pytest.fixture(scope="session")
def rest_client(base_url: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=base_url, api_key=API_KEY)


@pytest.fixture(scope="session")
def tokenizer(service_client: tinker.ServiceClient):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    return tc.get_tokenizer()


def text_datum(tokenizer, text: str, weight: float = 1.0) -> types.Datum:
    """A next-token-prediction datum over `text` with every target weighted `weight`."""
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [weight] * (len(ids) - 1)},
    )


def logprobs_of(out: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].to_numpy()) for o in out.loss_fn_outputs]


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tinsmiths shape sheet metal with hammers and snips.",
    "A LoRA adapter adds a low-rank update to each weight matrix.",
    "Lighthouses guide ships past dangerous rocks at night.",
]
