"""Continuous batching on the tiny test model: requests that join a decoding batch at
different steps, with different prompts, adapters (and the base model) and settings, return
what each returns alone; short requests leave early; slots in use survive eviction.

"Alone" is `Sampler.sample` on an idle sampler (no padding, no companions). Batched rows are
left-padded, so logprobs may differ by float rounding only (the issue's 1e-5); tokens of
seeded and greedy requests must be equal.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import SENTENCES, TINY, text_datum
from tinker import types
from transformers import AutoTokenizer

import tinsmith.engine.sampler as sampler_module
from tinsmith.engine.adapter import Adapter
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import LoraSpec, SampleOut, SampleSpec

NAME = TINY


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(NAME), NAME)


@pytest.fixture(scope="module")
def tokenizer(runner: ModelRunner):
    return AutoTokenizer.from_pretrained(runner.model_dir)


def _random_adapter(runner: ModelRunner, seed: int) -> Adapter:
    adapter = Adapter.create(LoraSpec(rank=4, seed=seed), runner.layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in adapter.weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.2)
    return adapter


@pytest.fixture(scope="module")
def slots(runner: ModelRunner):
    attached = [runner.attach(_random_adapter(runner, seed)) for seed in (1, 2)]
    yield attached
    for slot in attached:
        runner.detach(slot)


def _requests(tokenizer, slots: list[int]) -> list[tuple[int | None, SampleSpec]]:
    """Six requests: different prompt lengths, samplers, lengths, stops and extras."""
    texts = ["Hello, how are you today? I am", "One", "The quick brown fox jumps over the lazy dog and",
             "Numbers: 1 2 3", "A", "Once upon a time, in a land far away, there lived"]
    specs = [
        dict(num_samples=3, max_tokens=12, temperature=1.0, seed=11),
        dict(num_samples=1, max_tokens=3, temperature=0.0),
        dict(num_samples=2, max_tokens=9, temperature=0.7, top_k=20, seed=5, topk_sample_logprobs=3),
        dict(num_samples=2, max_tokens=14, temperature=1.0, top_p=0.9, seed=7, stop_strings=("e",)),
        dict(num_samples=4, max_tokens=6, temperature=1.0, seed=3, prompt_logprobs=True),
        dict(num_samples=1, max_tokens=10, temperature=0.0, topk_sample_logprobs=2),
    ]
    which = [slots[0], None, slots[1], slots[0], None, slots[1]]
    return [
        (slot, SampleSpec(prompt=np.asarray(tokenizer.encode(t), np.int64), **kw))
        for slot, t, kw in zip(which, texts, specs)
    ]


def _assert_same(got: SampleOut, want: SampleOut) -> None:
    assert len(got.sequences) == len(want.sequences)
    for g, w in zip(got.sequences, want.sequences):
        np.testing.assert_array_equal(g.tokens, w.tokens)
        assert g.stop_reason == w.stop_reason
        np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=1e-5, atol=1e-5)
        if w.topk_ids is not None:
            np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
            np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, rtol=1e-5, atol=1e-5)
    if want.prompt_logprobs is not None:
        np.testing.assert_array_equal(got.prompt_logprobs, want.prompt_logprobs)  # same prefill


def test_staggered_joins_equal_solo(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    requests = _requests(tokenizer, slots)
    solo = [Sampler(runner, tokenizer).sample(slot, spec) for slot, spec in requests]

    sampler = Sampler(runner, tokenizer)
    done: dict[int, SampleOut] = {}
    finish_order: list[int] = []

    def on_done(i: int):
        def record(out: SampleOut | BaseException) -> None:
            assert isinstance(out, SampleOut), out
            done[i] = out
            finish_order.append(i)
        return record

    widest = 0
    # Request i joins after i steps of the others, so rows of different lengths share the cache.
    for i, (slot, spec) in enumerate(requests):
        sampler.admit(slot, spec, on_done(i))
        sampler.step()
        widest = max(widest, sampler.live_rows)
    while sampler.pending:
        sampler.step()
    assert sampler.live_rows == 0 and sampler.batch.cache is None  # every row left
    assert widest >= 6, f"at most {widest} rows decoded together: requests were not batched"
    assert sorted(done) == list(range(len(requests)))
    for i in range(len(requests)):
        _assert_same(done[i], solo[i])
    # The 3-token greedy request (admitted second) finished before the 12-token one it joined.
    assert finish_order.index(1) < finish_order.index(0)


def test_all_admitted_at_once_equal_solo(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    requests = _requests(tokenizer, slots)
    solo = [Sampler(runner, tokenizer).sample(slot, spec) for slot, spec in requests]
    sampler = Sampler(runner, tokenizer)
    boxes: list[list[SampleOut | BaseException]] = [[] for _ in requests]
    for (slot, spec), box in zip(requests, boxes):
        sampler.admit(slot, spec, box.append)
    # Rows are grouped by adapter slot, base model last, whatever the admission order.
    assert sampler.batch.slots == sorted(sampler.batch.slots, key=sampler_module._slot_order)
    while sampler.pending:
        sampler.step()
    for box, want in zip(boxes, solo):
        (got,) = box
        assert isinstance(got, SampleOut)
        _assert_same(got, want)


def test_unseeded_requests_are_independent_and_first_step_stops(runner: ModelRunner, tokenizer) -> None:
    """A request whose every sample stops at its first token never joins the batch."""
    prompt = np.asarray(tokenizer.encode("Hello there"), np.int64)
    probe = Sampler(runner, tokenizer).sample(None, SampleSpec(prompt=prompt, max_tokens=1, temperature=0.0))
    first = int(probe.sequences[0].tokens[0])
    sampler = Sampler(runner, tokenizer)
    box: list[SampleOut | BaseException] = []
    sampler.admit(None, SampleSpec(prompt=prompt, num_samples=2, max_tokens=8, temperature=0.0,
                                   stop_tokens=(first,)), box.append)
    assert len(box) == 1 and not sampler.pending  # completed at admission
    (out,) = box
    assert isinstance(out, SampleOut)
    assert all(s.stop_reason == "stop" and list(s.tokens) == [first] for s in out.sequences)


def test_unmergeable_cache_decodes_one_request_at_a_time(
    runner: ModelRunner, tokenizer, slots: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models whose cache rows cannot be merged (sliding-window layers) queue requests."""
    monkeypatch.setattr(sampler_module, "mergeable", lambda cache: False)
    requests = _requests(tokenizer, slots)[:3]
    solo = [Sampler(runner, tokenizer).sample(slot, spec) for slot, spec in requests]
    sampler = Sampler(runner, tokenizer)
    boxes: list[list[SampleOut | BaseException]] = [[] for _ in requests]
    for (slot, spec), box in zip(requests, boxes):
        sampler.admit(slot, spec, box.append)
    widest = 0
    while sampler.pending:
        sampler.step()
        widest = max(widest, sampler.live_rows)
    assert widest <= 3  # never more than one request's rows
    for box, want in zip(boxes, solo):
        (got,) = box
        _assert_same(got, want)  # type: ignore[arg-type]


def test_pinned_sampler_slot_outlives_eviction(runner: ModelRunner, tokenizer) -> None:
    """A sampler adapter evicted from the sampling backend's cache while a request decodes with it
    stays attached until that request ends, then is detached."""
    _, engine = local_backends(runner, tokenizer, LossRegistry.load(()), max_sampler_adapters=1)
    engine._put_sampler("first", _random_adapter(runner, 3))
    slot = engine._samplers["first"][1]
    prompt = np.asarray(tokenizer.encode("Hello, how are you"), np.int64)
    spec = SampleSpec(prompt=prompt, num_samples=2, max_tokens=8, temperature=1.0, seed=4)
    want = Sampler(runner, tokenizer).sample(slot, spec)

    box: list[SampleOut | BaseException] = []
    engine.start_sample("first", spec, None, box.append)
    engine.step()
    engine._put_sampler("second", _random_adapter(runner, 4))  # evicts "first" from the cache
    assert "first" not in engine._samplers and runner.attached(slot)
    while engine.pending:
        engine.step()
    (got,) = box
    assert isinstance(got, SampleOut)
    _assert_same(got, want)  # decoded with its own adapter to the end, not the base model
    assert not runner.attached(slot)
    engine._release(engine._samplers.pop("second")[1])


def test_detached_slot_fails_the_batch_loudly(runner: ModelRunner, tokenizer) -> None:
    """A row whose adapter disappears never silently decodes with the base model."""
    slot = runner.attach(_random_adapter(runner, 5))
    sampler = Sampler(runner, tokenizer)
    prompt = np.asarray(tokenizer.encode("Hello"), np.int64)
    box: list[SampleOut | BaseException] = []
    sampler.admit(slot, SampleSpec(prompt=prompt, max_tokens=5, temperature=0.0), box.append)
    runner.detach(slot)
    with pytest.raises(RuntimeError, match="detached"):
        sampler.step()
    (err,) = box
    assert isinstance(err, RuntimeError) and not sampler.pending


def test_batch_keeps_only_live_columns(runner: ModelRunner, tokenizer) -> None:
    """When the long-prompt row leaves, the cache shrinks to the longest remaining row."""
    sampler = Sampler(runner, tokenizer)
    long = np.asarray(tokenizer.encode("word " * 40), np.int64)
    short = np.asarray(tokenizer.encode("Hi"), np.int64)
    sampler.admit(None, SampleSpec(prompt=long, max_tokens=2, temperature=0.0), lambda out: None)
    sampler.admit(None, SampleSpec(prompt=short, max_tokens=6, temperature=0.0), lambda out: None)
    assert sampler.batch.width == len(long)
    sampler.step()  # the long request takes its second and last token and leaves
    assert sampler.live_rows == 1
    assert sampler.batch.width == len(short) + 1
    assert all(layer.keys.shape[2] == len(short) + 1 for layer in sampler.batch.cache.layers)
    want = Sampler(runner, tokenizer).sample(None, SampleSpec(prompt=short, max_tokens=6, temperature=0.0))
    box: list[SampleOut | BaseException] = []
    sampler2 = Sampler(runner, tokenizer)
    sampler2.admit(None, SampleSpec(prompt=long, max_tokens=2, temperature=0.0), lambda out: None)
    sampler2.admit(None, SampleSpec(prompt=short, max_tokens=6, temperature=0.0), box.append)
    while sampler2.pending:
        sampler2.step()
    _assert_same(box[0], want)  # type: ignore[arg-type]


def test_concurrent_sdk_requests_equal_one_at_a_time(service_client, tokenizer) -> None:
    """Through the SDK and HTTP: requests on two trained samplers and the base model, all
    in flight at once, return what each returns when sent alone (the worker batches them)."""
    samplers = [service_client.create_sampling_client(base_model=TINY)]
    for k in range(2):
        tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=k).result()
        tc.forward_backward([text_datum(tokenizer, s) for s in SENTENCES[:2]], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
        samplers.append(tc.save_weights_and_get_sampling_client().result())
    prompts = ["The quick brown", "Hello", "Once upon a time there was", "1 2 3 4"]
    calls = [
        (samplers[i % 3], types.ModelInput.from_ints(tokenizer.encode(prompts[i % 4])),
         types.SamplingParams(max_tokens=4 + i, temperature=0.0 if i % 2 else 1.0, seed=i, stop=[]))
        for i in range(12)
    ]

    def send(sampler, prompt, params):
        return sampler.sample(prompt, 2, params, include_prompt_logprobs=False)

    together = [f.result() for f in [send(*c) for c in calls]]
    alone = [send(*c).result() for c in calls]
    for got, want in zip(together, alone):
        for g, w in zip(got.sequences, want.sequences):
            assert g.tokens == w.tokens
            np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=1e-5, atol=1e-5)
    assert len({tuple(r.sequences[0].tokens) for r in together}) > 3  # the requests differ
