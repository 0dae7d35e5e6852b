"""Protocol rules at the wire: long-poll (never a hot loop), chunked forward_backward calls
whose chunks arrive out of order, and retried submissions de-duplicated by seq_id."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, logprobs_of, text_datum
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

import tinsmith

LONG_POLL_S = 0.5


@pytest.fixture(scope="module")
def chunky_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that makes the SDK split forward_backward calls into 2-datum chunks."""
    with tinsmith.local(models=[TINY], data_dir=tmp_path_factory.mktemp("chunky"),
                        long_poll_s=LONG_POLL_S, fwdbwd_max_chunk_len=2) as url:
        yield url


def test_chunked_calls_equal_one_call(chunky_url, service_client, tokenizer) -> None:
    batch = [text_datum(tokenizer, s, weight=0.5 + i) for i, s in enumerate(SENTENCES * 2)]  # 8 datums
    chunked = tinker.ServiceClient(base_url=chunky_url, api_key=API_KEY)
    a = chunked.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    b = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    adam = types.AdamParams(learning_rate=1e-2)
    for _ in range(2):  # 4 chunks per call, posted concurrently with the first one last
        fa, fb = a.forward_backward(batch, "cross_entropy"), b.forward_backward(batch, "cross_entropy")
        oa, ob = a.optim_step(adam), b.optim_step(adam)
        ra, rb = fa.result(), fb.result()
        oa.result(), ob.result()
        assert ra.metrics["loss:sum"] == pytest.approx(rb.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(logprobs_of(ra), logprobs_of(rb)):  # per-datum outputs in datum order
            np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(logprobs_of(a.forward(batch, "cross_entropy").result()),
                    logprobs_of(b.forward(batch, "cross_entropy").result())):
        np.testing.assert_allclose(x, y, atol=1e-5)


def _proto(model_id: str, seq_id: int, tokenizer) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[text_datum(tokenizer, SENTENCES[0])], loss_fn="cross_entropy"),
        model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


def test_wire_long_poll_ordering_and_dedup(chunky_url, tokenizer) -> None:
    proto_headers = {"content-type": "application/x-protobuf"}
    with httpx.Client(base_url=chunky_url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        assert http.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).status_code == 200
        sid = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": None,
                                                        "sdk_version": "0.38.0"}).json()["session_id"]
        created = http.post("/api/v1/create_model", json={
            "session_id": sid, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 2}}).json()
        model_id = created["model_id"]
        assert model_id == f"{sid}:train:0"
        done = http.post("/api/v1/retrieve_future", json={"request_id": created["request_id"]}).json()
        assert done == {"model_id": model_id, "type": "create_model"}

        # seq 2 arrives before seq 1: it waits, and a poll on it long-polls, then says try_again.
        second = http.post("/api/v1/forward_backward", content=_proto(model_id, 2, tokenizer),
                           headers=proto_headers).json()
        t0 = time.perf_counter()
        r = http.post("/api/v1/retrieve_future", json={"request_id": second["request_id"]})
        assert time.perf_counter() - t0 >= LONG_POLL_S * 0.9  # held, not a hot loop
        assert r.json()["type"] == "try_again"
        # A retried submission of seq 2 is the same request.
        again = http.post("/api/v1/forward_backward", content=_proto(model_id, 2, tokenizer),
                          headers=proto_headers).json()
        assert again["request_id"] == second["request_id"]
        # seq 1 fills the gap: both run, in order, and seq 2's result is protobuf.
        first = http.post("/api/v1/forward_backward", content=_proto(model_id, 1, tokenizer),
                          headers=proto_headers).json()
        for rid in (first["request_id"], second["request_id"]):
            r = http.post("/api/v1/retrieve_future", json={"request_id": rid},
                          headers={"accept": "application/x-protobuf"})
            assert r.headers["content-type"] == "application/x-protobuf"
        # Results stay readable for repeated polls (retries after a client time-out).
        r2 = http.post("/api/v1/retrieve_future", json={"request_id": second["request_id"]})
        assert r2.content == r.content
        # An already executed seq_id that was never issued is refused with a body.
        r = http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 0,
                                                  "adam_params": {"learning_rate": 0.1}})
        assert r.status_code == 400 and "seq_id" in r.json()["detail"]
