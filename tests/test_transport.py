"""The SDK's optional transport features that /client/config switches (docs/operating.md,
"Client transport options"), and SamplingClient.get_tokenizer offline.

- zstd request bodies (proto_compress_fwdbwd): the SDK's forward_backward bodies arrive
  compressed and are decompressed under the body limit, which applies to the decompressed
  size, so a zstd bomb gets a 413 (raw HTTP: the SDK never sends one); other encodings and
  corrupt frames get a 415 / 400 that says why;
- server-side custom losses stay off: /create_custom_loss answers a 400 that says so, and
  the SDK's create_custom_loss + forward_backward_custom run the loss on the client.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
import zstandard
from conftest import API_KEY, SENTENCES, TINY, logprobs_of, text_datum
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

import tinsmith

WAIT_S = 60
LIMIT = 32 * 1024  # the small server's max_body_bytes


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with a 32 KiB body limit that never skips a seq_id gap by time."""
    with tinsmith.local(models=[TINY], data_dir=tmp_path_factory.mktemp("small"),
                        max_body_bytes=LIMIT, seq_gap_timeout_s=600, long_poll_s=2) as url:
        yield url


def _long_data() -> list[types.Datum]:
    """Two 2000-token datums: about 64 KiB as protobuf, a few hundred bytes as zstd."""
    ids = [7, 8, 9, 10] * 500
    return [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
            for _ in range(2)]


def _proto(model_id: str, seq_id: int, data: list[types.Datum], **extra: object) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model_id, seq_id=seq_id)
    msg = forward_backward_request_to_proto(req)
    for k, v in extra.items():
        setattr(msg, k, v)
    return msg.SerializeToString()


def _post(url: str, body: bytes, encoding: str | None) -> httpx.Response:
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/x-protobuf"}
    if encoding:
        headers["Content-Encoding"] = encoding
    return httpx.post(f"{url}/api/v1/forward_backward", content=body, headers=headers, timeout=60)


def test_sdk_forward_backward_bodies_arrive_zstd_compressed(small: str, tokenizer) -> None:
    """The limit is on the decompressed size: an SDK request over it gets the 413 of a zstd
    body (so the SDK compressed it), which consumes its seq_id (the next request runs at
    once); requests under it round-trip."""
    tc = tinker.ServiceClient(base_url=small, api_key=API_KEY).create_lora_training_client(
        base_model=TINY, rank=2).result()
    data = _long_data()
    assert len(_proto(tc.model_id, 1, data)) > LIMIT
    with pytest.raises(tinker.APIStatusError) as err:
        tc.forward_backward(data, "cross_entropy").result(timeout=WAIT_S)  # seq_id 1
    assert err.value.status_code == 413 and "zstd-compressed request body" in str(err.value)
    small_data = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
    out = tc.forward(small_data, "cross_entropy").result(timeout=10)  # seq_id 2
    assert [len(x) for x in logprobs_of(out)] == [len(d.loss_fn_inputs["target_tokens"].data)
                                                   for d in small_data]
    r = _post(small, _proto(tc.model_id, 3, data), None)  # the same body, plain
    assert r.status_code == 413 and "over this server's limit" in r.text, r.text


def test_a_zstd_bomb_gets_a_413(small: str) -> None:
    """(That its seq_id is consumed: tests/test_no_wedge.py.)"""
    # A request whose loss_fn name alone is 4 MiB: a few hundred bytes compressed.
    bomb = zstandard.ZstdCompressor().compress(
        _proto("any:train:0", 1, _long_data()[:1], loss_fn="x" * (4 << 20)))
    assert len(bomb) < LIMIT
    r = _post(small, bomb, "zstd")
    assert r.status_code == 413 and "decompresses to more than" in r.text and str(LIMIT) in r.text, r.text


def test_other_encodings_and_corrupt_zstd_are_refused_clearly(small: str) -> None:
    r = _post(small, b"\x1f\x8b not really gzip", "gzip")
    assert r.status_code == 415 and "gzip" in r.text, r.text
    r = _post(small, b"\x28\xb5\x2f\xfd garbage", "zstd")
    assert r.status_code == 400 and "zstd" in r.text, r.text


def test_a_zstd_json_body_is_decompressed_too(small: str) -> None:
    body = zstandard.ZstdCompressor().compress(
        b'{"tags": [], "user_metadata": null, "sdk_version": "0.38.0"}')
    r = httpx.post(f"{small}/api/v1/create_session", content=body, timeout=30,
                   headers={"X-API-Key": API_KEY, "Content-Type": "application/json",
                            "Content-Encoding": "zstd"})
    assert r.status_code == 200 and r.json()["session_id"], r.text


def test_server_side_custom_losses_are_off_and_client_side_ones_work(
    base_url: str, service_client: tinker.ServiceClient, tokenizer
) -> None:
    r = httpx.post(f"{base_url}/api/v1/create_custom_loss", headers={"X-API-Key": API_KEY},
                   json={"session_id": "s", "custom_loss_seq_id": 0, "name": "f", "inputs": [],
                         "graph": {"format": 1, "nodes": []}})
    assert r.status_code == 400 and "forward_backward_custom" in r.text, r.text

    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    own = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)  # a loss is made once a session
    handle = own.create_custom_loss(neg_ll, {"logprobs": 1, "weights": 1}).result()
    assert handle.loss_id is None  # it runs on the client
    tc = own.create_lora_training_client(base_model=TINY, rank=2, seed=1).result()
    data = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
    custom = tc.forward_backward_custom(data, handle).result(timeout=WAIT_S)
    plain = tc.forward(data, "cross_entropy").result(timeout=WAIT_S)
    assert custom.metrics["custom/neg_ll:sum"] == pytest.approx(
        -sum(float((lp * np.asarray(d.loss_fn_inputs["weights"].data)).sum())
             for lp, d in zip(logprobs_of(plain), data)), rel=1e-4)


def test_sampling_client_tokenizer_offline(service_client: tinker.ServiceClient, tokenizer) -> None:
    """SamplingClient.get_tokenizer() asks the Hugging Face hub by model name (the SDK never
    asks the server), so offline it fails; the documented one-line workaround gives the
    server's tokenizer, for a base-model sampling client and for one over sampler weights."""
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    path = tc.save_weights_for_sampler("tok").result(timeout=WAIT_S).path
    text = SENTENCES[1]
    for sc in (service_client.create_sampling_client(base_model=TINY).result(),
               service_client.create_sampling_client(model_path=path).result()):
        with pytest.raises(OSError):
            sc.get_tokenizer()
        # The workaround (docs/operating.md, "Client transport options"):
        tok = service_client.create_lora_training_client(
            base_model=sc.get_base_model(), rank=1).result().get_tokenizer()
        assert tok.encode(text) == tokenizer.encode(text)
