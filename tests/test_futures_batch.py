"""Batched completion polling (/retrieve_futures), cancel_future and join_sampling_session.

Through the official SDK where it can say it (its sampling clients poll /retrieve_futures,
unpickled ones join their session, abandoned samples are cancelled; the wire calls are read
from httpx's request log); raw HTTP for what the SDK never sends on its own (cursors and
acknowledgements, cancelling a training request).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, KeyedServer
from tinker import types

import tinsmith

WAIT_S = 60
STRIDE = 1_000_000_000  # a SamplingClient's seq_ids: STRIDE * clone id + k


def _calls(caplog: pytest.LogCaptureFixture, path: str) -> list[str]:
    """The status lines httpx logged for POST <path> (e.g. 'HTTP/1.1 200 OK')."""
    pattern = re.compile(rf'POST \S+/api/v1/{path} "([^"]+)"')
    return [m.group(1) for r in caplog.records if (m := pattern.search(r.getMessage()))]


@pytest.fixture
def http(base_url: str):
    with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


@pytest.fixture
def sampler(service_client: tinker.ServiceClient) -> tinker.SamplingClient:
    return service_client.create_sampling_client(base_model=TINY).result()


def test_sdk_samples_complete_through_retrieve_futures(
    sampler: tinker.SamplingClient, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    prompts = [types.ModelInput.from_ints(tokenizer.encode(s)) for s in SENTENCES]
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3, stop=[])
    futures = [sampler.sample(p, 2, params) for p in prompts * 2]
    results = [f.result(timeout=WAIT_S) for f in futures]
    assert all(len(r.sequences) == 2 and len(r.sequences[0].tokens) == 8 for r in results)
    for a, b in zip(results[:4], results[4:]):  # same prompt, same seed: same tokens
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    polls = _calls(caplog, "retrieve_futures")
    assert polls and all(p.endswith("200 OK") for p in polls), polls


def test_retrieve_futures_reports_per_clone_and_forgets_acknowledged(http: httpx.Client) -> None:
    sid = http.post("/api/v1/create_session", json={
        "tags": [], "user_metadata": None, "sdk_version": "0.38.0"}).json()["session_id"]
    sampler = http.post("/api/v1/create_sampling_session", json={
        "session_id": sid, "sampling_session_seq_id": 0, "base_model": TINY}).json()["sampling_session_id"]

    def asample(seq_id: int) -> str:
        r = http.post("/api/v1/asample", json={
            "sampling_session_id": sampler, "seq_id": seq_id, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 2}})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def poll(clone: int, cursor: int = 0, acks: list[str] | None = None, timeout: float | None = None):
        body: dict[str, object] = {"target": {"type": "sampling_session", "sampling_session_id": sampler,
                                              "cloned_sampler_id": clone},
                                   "prev_cursor": cursor, "retrieved_request_ids": acks or []}
        if timeout is not None:
            body["timeout"] = timeout
        r = http.post("/api/v1/retrieve_futures", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    mine, other = asample(0), asample(3 * STRIDE)
    seen: list[dict[str, object]] = []
    cursor = 0
    deadline = time.monotonic() + WAIT_S
    while not seen and time.monotonic() < deadline:  # a long poll: returns once one completes
        got = poll(0, cursor)
        seen, cursor = got["completions"], got["cursor"]
    assert [c["request_id"] for c in seen] == [mine] and seen[0]["state"] == "finished", seen
    assert [c["request_id"] for c in poll(3, 0)["completions"]] == [other]
    payload = http.post("/api/v1/retrieve_future", json={"request_id": mine},
                        headers={"Accept": "application/x-protobuf"})
    assert payload.headers["content-type"].startswith("application/x-protobuf")
    # Acknowledged: the event is trimmed, and the payload released.
    started = time.monotonic()
    again = poll(0, cursor, acks=[mine], timeout=0)
    assert again == {"completions": [], "cursor": cursor} and time.monotonic() - started < 5
    assert http.post("/api/v1/retrieve_future", json={"request_id": mine}).status_code == 404
    # An unknown sampling session: a 404 that says so.
    r = http.post("/api/v1/retrieve_futures", json={"target": {"sampling_session_id": "nope:sample:0"}})
    assert r.status_code == 404 and "nope:sample:0" in r.text


def test_cancel_a_held_training_request_consumes_its_seq_id(
    service_client: tinker.ServiceClient, http: httpx.Client
) -> None:
    """seq_id 2 waits for 1; cancelled, it fails at once with "cancelled" and never runs;
    1 and then 3 run in order as if 2 had been consumed. Cancelling again: "done"."""
    model_id = service_client.create_lora_training_client(base_model=TINY, rank=2).result().model_id

    def optim(seq: int) -> str:
        r = http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq,
                                                  "adam_params": {"learning_rate": 1e-3}})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    held = optim(2)
    r = http.post("/api/v1/cancel_future", json={"request_id": held})
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    result = http.post("/api/v1/retrieve_future", json={"request_id": held}).json()
    assert result["category"] == "user" and "cancelled" in result["error"], result
    first, third = optim(1), optim(3)
    for rid in (first, third):
        assert http.post("/api/v1/retrieve_future", json={"request_id": rid}).json()["type"] == "optim_step"
    for rid in (held, first):
        assert http.post("/api/v1/cancel_future", json={"request_id": rid}).json()["state"] == "done"
    r = http.post("/api/v1/cancel_future", json={"request_id": "req-0-1"})
    assert r.status_code == 404 and "req-0-1" in r.text


@pytest.fixture
def own_sampler(tmp_path) -> Iterator[tinker.SamplingClient]:
    """A sampler on a server of its own: an abandoned request may decode on after the test
    (a running sample is not aborted), which must not share batches with other tests."""
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        yield tinker.ServiceClient(base_url=url, api_key=API_KEY).create_sampling_client(
            base_model=TINY).result()


def test_sdk_cancels_an_abandoned_sample(
    own_sampler: tinker.SamplingClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A sample future cancelled on the client sends cancel_future (sample_cancel_enabled),
    which the server answers 200 whether the request was still queued or already running."""
    sampler = own_sampler
    caplog.set_level(logging.INFO, logger="httpx")
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    params = types.SamplingParams(max_tokens=1500, temperature=1.0, stop=[])

    async def abandon() -> None:
        task = asyncio.ensure_future(sampler.sample_async(prompt, 8, params))
        deadline = time.monotonic() + WAIT_S
        while not _calls(caplog, "asample") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    deadline = time.monotonic() + WAIT_S
    while not _calls(caplog, "cancel_future") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _calls(caplog, "cancel_future") == ["HTTP/1.1 200 OK"]
    # The sampler still works afterwards.
    out = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3)).result(timeout=WAIT_S)
    assert len(out.sequences[0].tokens) == 3


def test_unpickled_clients_join_with_their_own_clone_ids(
    sampler: tinker.SamplingClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    prompt = types.ModelInput.from_ints([5, 6, 7])
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=9, stop=[])
    clones = [pickle.loads(pickle.dumps(sampler)),
              tinker.SamplingClient.from_sampler_handle(sampler.get_sampler_handle(), api_key=API_KEY)]
    outs = [c.sample(prompt, 1, params).result(timeout=WAIT_S) for c in [sampler, *clones]]
    assert len(_calls(caplog, "join_sampling_session")) == 2
    ids = [int(o.sequences[0].sequence_id.split(":")[-2]) for o in outs]
    clone_ids = [i // STRIDE for i in ids]
    assert clone_ids[0] == 0 and len(set(clone_ids)) == 3 and min(clone_ids[1:]) >= 1, ids
    for o in outs[1:]:  # same sampler, same seed
        np.testing.assert_array_equal(o.sequences[0].tokens, outs[0].sequences[0].tokens)


def test_another_key_can_neither_poll_nor_cancel(keyed_server: KeyedServer) -> None:
    a = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    sampler = a.create_sampling_client(base_model=TINY).result()
    model_id = a.create_lora_training_client(base_model=TINY, rank=2).result().model_id
    with httpx.Client(base_url=keyed_server.url, headers=keyed_server.headers("a"), timeout=30) as mine, \
            httpx.Client(base_url=keyed_server.url, headers=keyed_server.headers("b"), timeout=30) as theirs:
        held = mine.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2,
                                                     "adam_params": {"learning_rate": 1e-3}}).json()
        r = theirs.post("/api/v1/cancel_future", json={"request_id": held["request_id"]})
        assert r.status_code == 404, r.text
        target = {"sampling_session_id": sampler._sampling_session_id}
        r = theirs.post("/api/v1/retrieve_futures", json={"target": target, "timeout": 0})
        assert r.status_code == 404, r.text
        r = theirs.post("/api/v1/join_sampling_session", json={"sampling_session_id": target["sampling_session_id"]})
        assert r.status_code == 404, r.text
        r = mine.post("/api/v1/cancel_future", json={"request_id": held["request_id"]})
        assert r.json()["state"] == "cancelled", r.text
