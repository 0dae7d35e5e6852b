"""Images of vision-language prompts in sampling records and in token counts, on
`synthetic/tiny-qwen3-vl` served on loopback, through the official SDK and raw HTTP:

- a sample made with record_stability_info records its prompt's images: the record read back
  (GET /api/v1/sampling_records/{sequence_id}) names each image by SHA-256, and its bytes
  (.../images/{k}) are the bytes sent; another API key's record reads as missing (404);
- the record store keeps an image once however many records name it, and frees it with the
  last one (StabilityRecords itself, the object the server uses);
- an image sent without expected_tokens counts the tokens it decodes to toward a key's
  max_request_tokens (the request's 413 gives the count, image tokens included) and its usage;
- stable_reinforce: a prompt provenance span over an image's positions checks the image.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from test_accounting import _totals, _usage
from test_vision import KEY, NAME, VISION_END, VISION_START, image_tokens, png
from tinker import types

import tinsmith
from tinsmith.models import synthetic
from tinsmith.scheduler.access import ApiKeys, NewKey
from tinsmith.scheduler.sampling_records import StabilityRecords
from tinsmith.storage.db import MetadataStore
from tinsmith.types import IMAGE_SLOT, ImageIn, SampledSeq, SampleOut

TOKEN_LIMIT = 24  # the "small" key's max_request_tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl-rec") / KEY
    out.mkdir()
    synthetic.write_folder(KEY, out)
    return out


@dataclass(frozen=True)
class Server:
    url: str
    keys: dict[str, NewKey]

    def client(self, who: str) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.url, api_key=self.keys[who].key)

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.keys[who].key}, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("vl-rec-server")
    db = MetadataStore(f"sqlite:///{d / 'tinsmith.db'}")
    keys = ApiKeys(db)
    made = {"a": keys.create("a"), "b": keys.create("b"),
            "small": keys.create("small", max_request_tokens=TOKEN_LIMIT)}
    db.close()
    with tinsmith.local(models=[NAME], data_dir=d, seq_gap_timeout_s=600) as url:
        yield Server(url, made)


def prompt(folder: Path, pictures: list[bytes], sizes: list[tuple[int, int]], *,
           expected: bool = True) -> types.ModelInput:
    """Text, then each picture wrapped in <|vision_start|> ... <|vision_end|>, then text."""
    chunks: list = [types.EncodedTextChunk(tokens=[10, 11, 12])]
    for data, (w, h) in zip(pictures, sizes):
        n = image_tokens(folder, w, h) if expected else None
        chunks += [types.EncodedTextChunk(tokens=[VISION_START]),
                   types.ImageChunk(data=data, format="png", expected_tokens=n),
                   types.EncodedTextChunk(tokens=[VISION_END])]
    chunks.append(types.EncodedTextChunk(tokens=[20, 21]))
    return types.ModelInput(chunks=chunks)


def test_sampling_record_returns_the_prompts_images(server: Server, folder: Path) -> None:
    cat, dog = png(64, 48, 1), png(96, 64, 2)
    sampler = server.client("a").create_sampling_client(base_model=NAME, record_stability_info=True)
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=4)
    one = prompt(folder, [cat], [(64, 48)])
    two = prompt(folder, [dog, cat], [(96, 64), (64, 48)])
    res1 = sampler.sample(one, 2, params).result(timeout=120)
    res2 = sampler.sample(two, 1, params).result(timeout=120)
    http = server.http("a")
    sent = {hashlib.sha256(b).hexdigest(): b for b in (cat, dog)}
    records = []
    for mi, seq in [(one, s) for s in res1.sequences] + [(two, res2.sequences[0])]:
        r = http.get(f"/api/v1/sampling_records/{seq.sequence_id}")
        assert r.status_code == 200, r.text
        rec = r.json()
        records.append(rec)
        assert rec["tokens"] == list(seq.tokens)
        np.testing.assert_allclose(rec["logprobs"], seq.logprobs, rtol=0, atol=1e-6)
        # The prompt as sent: text ids, IMAGE_SLOT over each image's expected_tokens.
        want: list[int] = []
        for c in mi.chunks:
            want += [IMAGE_SLOT] * c.expected_tokens if c.type == "image" else list(c.tokens)
        assert rec["prompt_tokens"] == want
        images = [c for c in mi.chunks if c.type == "image"]
        assert len(rec["images"]) == len(images)
        for k, (meta, chunk) in enumerate(zip(rec["images"], images)):
            assert meta["sha256"] == hashlib.sha256(chunk.data).hexdigest()
            assert meta["format"] == "png" and meta["size_bytes"] == len(chunk.data)
            assert meta["expected_tokens"] == chunk.expected_tokens
            assert want[meta["offset"] : meta["offset"] + chunk.expected_tokens] == [IMAGE_SLOT] * chunk.expected_tokens
            got = http.get(meta["url"])
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            assert got.content == chunk.data == sent[meta["sha256"]]
            assert got.headers["x-content-sha256"] == meta["sha256"]
            assert http.get(f"/api/v1/sampling_records/{seq.sequence_id}/images/{k + 5}").status_code == 404
    # The same picture in three records (two samples, two requests) names one stored image.
    assert records[0]["images"][0]["sha256"] == records[1]["images"][0]["sha256"] == records[2]["images"][1]["sha256"]
    # Another key's record reads as missing; so does a sequence never recorded.
    sid = res1.sequences[0].sequence_id
    assert server.http("b").get(f"/api/v1/sampling_records/{sid}").status_code == 404
    assert server.http("b").get(f"/api/v1/sampling_records/{sid}/images/0").status_code == 404
    plain = server.client("a").create_sampling_client(base_model=NAME)
    unrecorded = plain.sample(one, 1, params).result(timeout=120).sequences[0].sequence_id
    r = http.get(f"/api/v1/sampling_records/{unrecorded}")
    assert r.status_code == 404 and "record_stability_info=True" in r.text


def _out(n: int, seed: int) -> SampleOut:
    rng = np.random.default_rng(seed)
    return SampleOut([SampledSeq(rng.integers(0, 256, 3).astype(np.int32),
                                 rng.normal(size=3).astype(np.float32), "length") for _ in range(n)])


def test_records_store_each_image_once_and_free_it_with_the_last_record() -> None:
    records = StabilityRecords(max_tokens=1000, max_image_bytes=100_000)
    cat, dog = png(64, 48, 1), png(40, 40, 2)
    tokens = np.asarray([1, IMAGE_SLOT, IMAGE_SLOT, 2], np.int64)
    at_cat = ImageIn(cat, "png", 1, 2, 2)
    records.record(["s:0:0", "s:0:1"], tokens, _out(2, 0), [at_cat])
    records.record(["s:1:0"], tokens, _out(1, 1), [ImageIn(cat, "png", 1, 2, 2)])
    assert len(records.images) == 1 and records.images.bytes == len(cat)
    records.record(["s:2:0"], tokens, _out(1, 2), [ImageIn(dog, "png", 1, 2, 2)])
    assert len(records.images) == 2 and records.images.bytes == len(cat) + len(dog)
    view = records.read("s:0:1")
    assert view.images[0].sha256 == hashlib.sha256(cat).hexdigest()
    assert records.image("s:1:0", 0)[1] == cat and records.image("s:2:0", 0)[1] == dog
    # Re-recording the ids that named the cat with a text-only prompt: its last reference goes.
    records.record(["s:0:0", "s:0:1", "s:1:0"], np.asarray([1, 2], np.int64), _out(3, 3))
    assert len(records.images) == 1 and records.images.bytes == len(dog)
    # Past max_image_bytes, the oldest records (and the images only they name) go first.
    big = png(48, 48, 7)
    small = StabilityRecords(max_image_bytes=len(big) + len(cat) - 1)
    small.record(["x:0:0"], tokens, _out(1, 4), [ImageIn(big, "png", 1, 2, 2)])
    small.record(["x:1:0"], tokens, _out(1, 5), [ImageIn(cat, "png", 1, 2, 2)])
    assert len(small) == 1 and small.images.bytes == len(cat)
    with pytest.raises(Exception, match="no sampling record 'x:0:0'"):
        small.read("x:0:0")


def test_image_without_expected_tokens_counts_toward_the_token_limit(server: Server, folder: Path) -> None:
    """6 text tokens + max_tokens 4 fit the limit of 24; the 128x128 image's 16 tokens do
    not: the 413 counts them although the chunk did not say how many there are."""
    n_image = image_tokens(folder, 128, 128)
    assert n_image == 16
    pic = png(128, 128, 3)
    sampler = server.client("small").create_sampling_client(base_model=NAME)
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(tinker.APIStatusError) as err:
        sampler.sample(prompt(folder, [pic], [(128, 128)], expected=False), 1, params).result(timeout=120)
    total = 7 + n_image + 4  # 3 + 1 + 1 + 2 text tokens, the image, max_tokens
    assert err.value.status_code == 413 and f"is {total} tokens" in str(err.value), err.value
    # A smaller image (4 tokens) fits: 7 + 4 + 4 = 15, and it samples.
    ok = sampler.sample(prompt(folder, [png(64, 48, 3)], [(64, 48)], expected=False), 1, params).result(timeout=120)
    assert len(ok.sequences[0].tokens) == 4
    # Usage counts the image's tokens in the prefill too (the refused request counts nothing).
    usage = _totals(_usage(server.url, server.keys["small"].key))
    assert usage == Counter(sampling_prefill=7 + image_tokens(folder, 64, 48), sampling_sample=4), usage


def _rl_datum(mi: types.ModelInput, seq, image_chunk: types.ImageChunk | None = None) -> types.Datum:
    """The cookbook's RL layout over an image prompt, with provenance spans naming `seq`:
    targets are the model input shifted by one (0 where the next position is an image's),
    the loss on the sampled tokens only. `image_chunk` replaces the prompt's image."""
    chunks = [image_chunk if (c.type == "image" and image_chunk is not None) else c for c in mi.chunks]
    prompt_in = types.ModelInput(chunks=chunks)
    flat: list[int] = []
    for c in chunks:
        flat += [0] * c.expected_tokens if c.type == "image" else list(c.tokens)
    full, n_prompt = flat + list(seq.tokens), mi.length - 1
    d = types.Datum(
        model_input=prompt_in.append(types.EncodedTextChunk(tokens=list(seq.tokens[:-1]))),
        loss_fn_inputs={"target_tokens": full[1:], "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                        "advantages": [0.0] * n_prompt + [1.0] * len(seq.tokens)})
    sid = seq.sequence_id
    return d.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=mi.length),
                     types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens) - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt),
                        types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens))])


def test_stable_reinforce_checks_the_recorded_image(server: Server, folder: Path) -> None:
    """A prompt span over an image's positions matches when the datum holds the recorded image
    there (whatever its targets say at those positions), and is a 400 naming the image when
    the datum holds another picture."""
    tc = server.client("a").create_lora_training_client(base_model=NAME, rank=4, seed=2)
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True)
    mi = prompt(folder, [png(64, 48, 5)], [(64, 48)])
    seq = sampler.sample(mi, 1, types.SamplingParams(max_tokens=4, temperature=1.0, seed=1)).result(
        timeout=120).sequences[0]
    good = _rl_datum(mi, seq)
    out = tc.forward([good], "stable_reinforce").result(timeout=120)
    assert np.isfinite(out.metrics["loss:sum"]) and out.metrics["loss:sum"] != 0.0
    n = image_tokens(folder, 64, 48)
    other = types.ImageChunk(data=png(64, 48, 6), format="png", expected_tokens=n)
    with pytest.raises(tinker.APIStatusError) as err:
        tc.forward([_rl_datum(mi, seq, other)], "stable_reinforce").result(timeout=120)
    assert err.value.status_code == 400 and "covers its image 0" in str(err.value), err.value
    assert "the datum's model input must hold that same image at positions [4, 8)" in str(err.value)
