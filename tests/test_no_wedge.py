"""No training client ever wedges after a rejected request.

The server runs a run's requests in seq_id order, so a seq_id that never joins the run's
gate would hold every later request. Through the official SDK against real servers:
- every server-side rejection of every training endpoint consumes its seq_id, so the same
  client's next request is answered at once and gives the same result as before the
  rejection (server `strict`: gaps are never closed by time there, so only consumption
  can release the next request);
- a seq_id the SDK numbered but never sent (its own client-side validation error) is
  skipped after `seq_gap_timeout_s` (server `gappy`), counted in /metrics, and a late
  arrival for it gets a 400 that says so;
- a 429 is retried, not consumed, and its seq_id is not skipped while the SDK backs off;
- another API key cannot consume a run's seq_ids.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import SENTENCES, TINY, KeyedServer, logprobs_of, text_datum
from tinker import types

import tinsmith
from tinsmith.scheduler.access import ApiKeys
from tinsmith.storage.db import MetadataStore

GAP_S = 1.5  # gappy's seq_gap_timeout_s
WAIT_S = 30  # the longest any "next request" may take (strict never skips a gap)
MAX_TOKENS = 200  # strict's max_request_tokens (the 413 case)
SKIPPED = re.compile(r'^tinsmith_skipped_seq_ids_total\{model="tinsmith/tiny-test"\} (\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class Server:
    url: str
    keys: dict[str, str]  # "free": no limits; "busy": max_concurrent=BUSY

    def client(self, who: str = "free",
               optimizer: types.OptimizerConfig | None = None) -> tinker.TrainingClient:
        sc = tinker.ServiceClient(base_url=self.url, api_key=self.keys[who])
        return sc.create_lora_training_client(base_model=TINY, rank=4, seed=7,
                                              optimizer=optimizer).result()

    def http(self, who: str = "free") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.keys[who]}, timeout=30)


BUSY = 3  # the "busy" key's max_concurrent: its 429s never slow the other tests down


def _serve(d: Path, **settings: object) -> Iterator[Server]:
    db = MetadataStore(f"sqlite:///{d / 'tinsmith.db'}")
    keys = ApiKeys(db)
    made = {"free": keys.create("free").key, "busy": keys.create("busy", max_concurrent=BUSY).key}
    db.close()
    with tinsmith.local(models=[TINY], data_dir=d, **settings) as url:
        yield Server(url, made)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("strict"), seq_gap_timeout_s=600,
                      max_request_tokens=MAX_TOKENS, long_poll_s=2)


@pytest.fixture(scope="module")
def gappy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("gappy"), seq_gap_timeout_s=GAP_S,
                      long_poll_s=0.5, fwdbwd_max_chunk_len=2)


def _optim(http: httpx.Client, model_id: str, seq_id: int) -> httpx.Response:
    return http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq_id,
                                                 "adam_params": {"learning_rate": 1e-3}})


def _poll(http: httpx.Client, r: httpx.Response) -> dict[str, object]:
    assert r.status_code == 200, r.text
    return http.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]}).json()


def _same(a: types.ForwardBackwardOutput, b: types.ForwardBackwardOutput) -> None:
    for x, y in zip(logprobs_of(a), logprobs_of(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


@dataclass
class Case:
    tc: tinker.TrainingClient
    datum: types.Datum
    sampler_path: str  # a sampler checkpoint of another run: it holds no optimizer state


def _image(c: Case) -> types.Datum:
    chunks = [types.ImageChunk(data=b"\x89PNG\r\n", format="png"), *c.datum.model_input.chunks]
    n = sum(ch.length for ch in chunks if isinstance(ch, types.EncodedTextChunk)) + 1
    return types.Datum(model_input=types.ModelInput(chunks=chunks),
                       loss_fn_inputs={"target_tokens": [1] * n})


# Each raises a 4xx from the server; (how, what the error says).
SERVER_REJECTIONS: dict[str, tuple[Callable[[Case], object], str]] = {
    "forward with an image chunk": (
        lambda c: c.tc.forward([_image(c)], "cross_entropy"),
        "image inputs are not supported by this model: it is text-only"),
    "forward with an unknown loss": (
        lambda c: c.tc.forward([c.datum], "no_such_loss"), "no_such_loss"),
    "forward_backward with bad weights": (
        lambda c: c.tc.forward_backward([types.Datum(
            model_input=c.datum.model_input,
            loss_fn_inputs={"target_tokens": c.datum.loss_fn_inputs["target_tokens"],
                            "weights": [1.0]})], "cross_entropy"), "weights has shape"),
    "forward_backward over max_request_tokens (413)": (
        lambda c: c.tc.forward_backward([c.datum] * 30, "cross_entropy"), "max_request_tokens"),
    "optim_step DimuonParams": (
        lambda c: c.tc.optim_step(types.DimuonParams(learning_rate=1e-3)),
        "this run's optimizer is adamw"),
    "optim_step AdamParams on a Dimuon run": (
        lambda c: c.tc.optim_step(types.AdamParams(learning_rate=1e-3)),
        "this run's optimizer is dimuon"),
    "optim_step bad AdamParams": (
        lambda c: c.tc.optim_step(types.AdamParams(learning_rate=1e-3, beta1=1.5)), "beta1"),
    "save_state bad name": (lambda c: c.tc.save_state("../up"), "invalid checkpoint name"),
    "save_state bad ttl": (lambda c: c.tc.save_state("ttl", ttl_seconds=-5), "ttl_seconds"),
    "save_weights_for_sampler bad name": (
        lambda c: c.tc.save_weights_for_sampler("a/../../b"), "invalid checkpoint name"),
    "save_weights_external bad name": (
        lambda c: c.tc.save_weights_external(".."), "invalid checkpoint name"),
    "save_weights_external age_encryption_recipients": (
        lambda c: c.tc.save_weights_external("enc", age_encryption_recipients=["age1qqq"]),
        "age_encryption_recipients"),
    "load_state missing path": (
        lambda c: c.tc.load_state(f"tinker://{c.tc.model_id}/weights/missing"), "does not exist"),
    "load_state malformed path": (lambda c: c.tc.load_state("weights/oops"), "tinker://"),
    "load_state_with_optimizer of sampler weights": (
        lambda c: c.tc.load_state_with_optimizer(c.sampler_path), "no optimizer state"),
}


ON_DIMUON_RUN = {"optim_step AdamParams on a Dimuon run"}  # the rest run on AdamW runs


@pytest.fixture(scope="module")
def sampler_path(strict: Server) -> str:
    return strict.client().save_weights_for_sampler("shared").result().path


@pytest.mark.parametrize("case", sorted(SERVER_REJECTIONS))
def test_server_rejection_consumes_its_seq_id(case: str, strict: Server, sampler_path: str) -> None:
    tc = strict.client(optimizer=types.DimuonOptimizerConfig() if case in ON_DIMUON_RUN else None)
    c = Case(tc, text_datum(tc.get_tokenizer(), SENTENCES[0]), sampler_path)
    before = tc.forward([c.datum], "cross_entropy").result(timeout=WAIT_S)
    send, message = SERVER_REJECTIONS[case]
    with pytest.raises(tinker.APIStatusError) as err:
        send(c).result(timeout=WAIT_S)
    assert 400 <= err.value.status_code < 500 and message in str(err.value), err.value
    _same(tc.forward([c.datum], "cross_entropy").result(timeout=WAIT_S), before)


def test_training_after_rejections_matches_a_clean_twin(strict: Server) -> None:
    """Rejections (several in a row, of several endpoints) change nothing: forward_backward,
    optim_step and save_weights_and_get_sampling_client afterwards give what a twin run that
    never saw them gives."""
    clean, hit = strict.client(), strict.client()
    tokenizer = hit.get_tokenizer()
    batch = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
    c = Case(hit, batch[0], "")
    for name in ("optim_step DimuonParams", "forward with an image chunk",
                 "save_weights_external age_encryption_recipients", "load_state missing path"):
        with pytest.raises(tinker.APIStatusError):
            SERVER_REJECTIONS[name][0](c).result(timeout=WAIT_S)
    adam = types.AdamParams(learning_rate=1e-2)
    for tc in (clean, hit):
        tc.forward_backward(batch, "cross_entropy").result(timeout=WAIT_S)
        tc.optim_step(adam).result(timeout=WAIT_S)
    _same(hit.forward(batch, "cross_entropy").result(timeout=WAIT_S),
          clean.forward(batch, "cross_entropy").result(timeout=WAIT_S))
    prompt = types.ModelInput.from_ints(tokenizer.encode(SENTENCES[1])[:5])
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    a, b = (tc.save_weights_and_get_sampling_client().result(timeout=WAIT_S)
            .sample(prompt, 1, params).result(timeout=WAIT_S) for tc in (hit, clean))
    assert a.sequences[0].tokens == b.sequences[0].tokens


def test_raw_rejections_consume_their_seq_id(strict: Server) -> None:
    """Rejections the SDK never provokes: a schema error (422) and a request the route
    refuses, with model_id and seq_id readable; each consumes its seq_id."""
    model_id = strict.client().model_id
    bad = [
        ("/api/v1/optim_step", {"model_id": model_id, "adam_params": {"learning_rate": "fast"}}),
        ("/api/v1/save_weights", {"model_id": model_id, "path": 7, "ttl_seconds": "soon"}),
        ("/api/v1/save_weights_for_sampler", {"model_id": model_id}),  # no name, no session seq
        ("/api/v1/save_weights_for_sampler", {"model_id": model_id, "path": "n", "kind": "inflight"}),
        ("/api/v1/load_weights", {"model_id": model_id, "path": "x", "optimizer": "maybe"}),
    ]
    with strict.http() as http:
        seq = 1
        for path, body in bad:
            r = http.post(path, json=body | {"seq_id": seq})
            assert r.status_code in (400, 422), r.text
            r = _optim(http, model_id, seq + 1)
            assert _poll(http, r).get("type") == "optim_step", (path, r.text)
            seq += 2
        # A request with a rejected seq_id is told so, not "already executed".
        r = _optim(http, model_id, 5)
        assert r.status_code == 400 and "seq_id 5" in r.text and "rejected" in r.text, r.text


def test_zstd_bomb_consumes_its_seq_id(strict: Server) -> None:
    """A zstd /forward_backward body that decompresses past max_body_bytes gets a 413; its
    model_id and seq_id are read from the start of the decompressed body and consumed."""
    import zstandard
    from tinker.proto import tinker_public_pb2 as pb

    from tinsmith.config import ServerSettings

    model_id = strict.client().model_id
    huge = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1,
                                     loss_fn="x" * (ServerSettings().max_body_bytes + 1))
    bomb = zstandard.ZstdCompressor().compress(huge.SerializeToString())
    with strict.http() as http:
        r = http.post("/api/v1/forward_backward", content=bomb,
                      headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"})
        assert r.status_code == 413 and "decompresses to more than" in r.text, r.text
        assert _poll(http, _optim(http, model_id, 2)).get("type") == "optim_step"


def test_429_is_retried_not_consumed(strict: Server) -> None:
    """Over max_concurrent the SDK gets 429 and retries the same seq_id; it then runs, in
    order, and the client's next request follows."""
    tc, holder = strict.client("busy"), strict.client("busy")
    datum = text_datum(tc.get_tokenizer(), SENTENCES[2])
    before = tc.forward([datum], "cross_entropy").result(timeout=WAIT_S)
    with strict.http("busy") as http:  # BUSY requests that wait for holder's seq_id 1
        held = [_optim(http, holder.model_id, seq) for seq in range(2, 2 + BUSY)]
        pending = tc.forward([datum], "cross_entropy")
        with pytest.raises(TimeoutError):  # 429, retried with back-off
            pending.result(timeout=1.5)
        first = _optim(http, holder.model_id, 1)
        for r in (first, *held):
            assert _poll(http, r).get("type") == "optim_step"
    _same(pending.result(timeout=WAIT_S), before)
    _same(tc.forward([datum], "cross_entropy").result(timeout=WAIT_S), before)


def _skipped(url: str) -> float:
    m = SKIPPED.search(httpx.get(f"{url}/metrics").text)
    return float(m.group(1)) if m else 0.0


# The SDK reserves a seq_id, then fails building or encoding the request: nothing is sent.
LOCAL_ERRORS: dict[str, Callable[[tinker.TrainingClient], object]] = {
    "save_weights_and_get_sampling_client bad kind":
        lambda tc: tc.save_weights_and_get_sampling_client(kind="bogus").result(),  # type: ignore[arg-type]
    "save_weights_external without a name": lambda tc: tc.save_weights_external(None).result(),  # type: ignore[arg-type]
    "save_weights_for_sampler non-string metadata":
        lambda tc: tc.save_weights_for_sampler("m", user_metadata={"k": 1}).result(),  # type: ignore[dict-item]
    "load_state without a path": lambda tc: tc.load_state(None).result(),  # type: ignore[arg-type]
    "forward with an image asset pointer": lambda tc: tc.forward([types.Datum(
        model_input=types.ModelInput(chunks=[types.ImageAssetPointerChunk(format="png",
                                                                           location="a.png")]),
        loss_fn_inputs={"target_tokens": [1]})], "cross_entropy").result(),
}


@pytest.mark.parametrize("case", sorted(LOCAL_ERRORS))
def test_client_side_error_gap_is_skipped(case: str, gappy: Server) -> None:
    tc = gappy.client()
    datum = text_datum(tc.get_tokenizer(), SENTENCES[3])
    before = tc.forward([datum], "cross_entropy").result(timeout=WAIT_S)  # seq_id 1
    skipped = _skipped(gappy.url)
    with pytest.raises(Exception) as err:  # seq_id 2: never sent
        LOCAL_ERRORS[case](tc)
    assert not isinstance(err.value, tinker.APIStatusError), err.value
    start = time.monotonic()
    after = tc.forward([datum], "cross_entropy").result(timeout=GAP_S + WAIT_S)  # seq_id 3
    took = time.monotonic() - start
    assert GAP_S * 0.9 <= took < GAP_S + 10, took
    _same(after, before)
    assert _skipped(gappy.url) == skipped + 1
    with gappy.http() as http:  # seq_id 2 turns up after all
        r = _optim(http, tc.model_id, 2)
    assert r.status_code == 400 and "seq_id 2" in r.text and "was skipped" in r.text, r.text
    assert "seq_gap_timeout_s" in r.text


def test_parallel_chunks_are_not_skipped(gappy: Server) -> None:
    """4 chunks posted concurrently, the first one last: reordered, nothing skipped."""
    tc = gappy.client()
    tokenizer = tc.get_tokenizer()
    batch = [text_datum(tokenizer, s, weight=1.0 + i) for i, s in enumerate(SENTENCES * 2)]
    skipped = _skipped(gappy.url)
    out = tc.forward_backward(batch, "cross_entropy").result(timeout=WAIT_S)
    singles = [tc.forward([d], "cross_entropy").result(timeout=WAIT_S) for d in batch]
    for x, one in zip(logprobs_of(out), singles, strict=True):
        np.testing.assert_allclose(x, logprobs_of(one)[0], atol=1e-5)
    assert _skipped(gappy.url) == skipped


def test_seq_refused_with_429_is_not_skipped_while_retried(gappy: Server) -> None:
    """A seq_id the server answered 429 is in flight (the SDK retries it): the requests
    behind it wait past seq_gap_timeout_s, and it runs when it comes again."""
    run, other = gappy.client("busy").model_id, gappy.client("busy").model_id
    with gappy.http("busy") as http:
        held = [_optim(http, run, 3), _optim(http, other, 2), _optim(http, other, 3)]
        assert _optim(http, run, 2).status_code == 429  # over max_concurrent=BUSY=3
        first = _optim(http, run, 1)  # the seq_id the held ones wait for always passes
        assert _poll(http, first).get("type") == "optim_step"
        time.sleep(3 * GAP_S)  # `other`'s gap (its seq_id 1 never came) is skipped meanwhile
        assert _poll(http, held[1]).get("type") == "optim_step"
        assert _poll(http, held[0]).get("type") == "try_again"  # still waits for seq_id 2
        second = _optim(http, run, 2)
        for r in (second, held[0]):
            assert _poll(http, r).get("type") == "optim_step"


def test_another_key_cannot_consume_a_runs_seq_ids(keyed_server: KeyedServer) -> None:
    a = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    tc = a.create_lora_training_client(base_model=TINY, rank=2).result()
    with httpx.Client(base_url=keyed_server.url, headers=keyed_server.headers("b")) as b:
        r = b.post("/api/v1/optim_step", json={"model_id": tc.model_id, "seq_id": 1,
                                               "adam_params": {"learning_rate": "fast"}})
        assert r.status_code == 422
        r = b.post("/api/v1/save_weights_external", json={
            "model_id": tc.model_id, "seq_id": 1, "path": "x", "age_encryption_recipients": ["k"]})
        assert r.status_code == 400
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=WAIT_S) is not None
