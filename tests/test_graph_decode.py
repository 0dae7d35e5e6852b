"""The static-shape decoding step (engine/graph_decode.py, engine/bgmv.py), run eagerly on the
CPU with `cuda_graphs="on"`: everything a CUDA graph would replay except the capture itself.
The captured graphs are checked against this eager step in tests/test_gpu.py.

Tolerance: the static step's logits differ from the eager slab step's by float rounding only
(attention over the whole masked slab instead of the [hi, W] view, GEMMs over rows padded to
a bucket, the LoRA delta through the concatenated slot table with the scale folded into B),
so tokens of greedy and seeded requests must be equal and logprobs agree within 1e-5
(absolute and relative; float32 on the CPU), as in tests/test_kv_cache.py.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

import numpy as np
import pytest
import tinker
import torch
from conftest import API_KEY, TINY, assert_same_samples, attach_random_adapter, token_array
from tinker import types
from transformers import AutoTokenizer

import tinsmith
from tinsmith.engine.decode import DecodeBatch
from tinsmith.engine.graph_decode import GraphDecoder, bucket_of, graphs_wanted
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import SampleOut, SampleSpec

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY)


@pytest.fixture(scope="module")
def tokenizer(runner: ModelRunner):
    return AutoTokenizer.from_pretrained(runner.model_dir)


@pytest.fixture(scope="module")
def slots(runner: ModelRunner):
    """Three adapters of different ranks (the table pads them to one rank)."""
    attached = [attach_random_adapter(runner, rank, seed) for rank, seed in ((4, 1), (8, 2), (2, 3))]
    yield attached
    for slot in attached:
        runner.detach(slot)


def _assert_same(got: SampleOut, want: SampleOut) -> None:
    assert_same_samples(got, want, TOL)


def _requests(tokenizer, slots: list[int]) -> list[tuple[int | None, SampleSpec]]:
    """Three adapters and the base model; greedy, seeded, top-k, top-p, stop strings, a stop
    token, top-k logprobs, prompt logprobs; rows that stop at different steps."""
    texts = ["Hello, how are you today? I am", "One", "The quick brown fox jumps over the lazy dog and",
             "Numbers: 1 2 3", "Once upon a time, in a land far away, there lived", "Why is the sky"]
    stop_token = int(token_array(tokenizer, " the")[-1])
    specs: list[dict] = [
        {"num_samples": 3, "max_tokens": 12, "temperature": 1.0, "seed": 11},
        {"num_samples": 1, "max_tokens": 3, "temperature": 0.0},
        {"num_samples": 2, "max_tokens": 9, "temperature": 0.7, "top_k": 20, "seed": 5, "topk_sample_logprobs": 3},
        {"num_samples": 2, "max_tokens": 14, "temperature": 1.0, "top_p": 0.9, "seed": 7, "stop_strings": ("e",)},
        {"num_samples": 1, "max_tokens": 10, "temperature": 0.0, "prompt_logprobs": True, "topk_prompt_logprobs": 2},
        {"num_samples": 4, "max_tokens": 16, "temperature": 1.2, "seed": 3, "stop_tokens": (stop_token,)},
    ]
    which = [slots[0], None, slots[1], slots[2], None, slots[1]]
    return [(slot, SampleSpec(prompt=token_array(tokenizer, t), **kw)) for slot, t, kw in zip(which, texts, specs)]


def _staggered(sampler: Sampler, requests: list[tuple[int | None, SampleSpec]]) -> list[SampleOut]:
    """Request i joins after i steps of the others; every output, in request order."""
    boxes: list[list] = [[] for _ in requests]
    for (slot, spec), box in zip(requests, boxes):
        sampler.admit(slot, spec, box.append)
        sampler.step()
    while sampler.pending:
        sampler.step()
    assert all(len(b) == 1 and isinstance(b[0], SampleOut) for b in boxes), boxes
    return [b[0] for b in boxes]


def _static(runner: ModelRunner, tokenizer, **kw) -> Sampler:
    sampler = Sampler(runner, tokenizer, cuda_graphs="on", **kw)
    assert isinstance(sampler.batch.graphs, GraphDecoder) and not sampler.batch.graphs.capture
    return sampler


def test_static_step_equals_eager_slab_step(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    requests = _requests(tokenizer, slots)
    static = _static(runner, tokenizer)
    eager = Sampler(runner, tokenizer, cuda_graphs="off")
    assert eager.batch.graphs is None
    got, want = _staggered(static, requests), _staggered(eager, requests)
    for g, w in zip(got, want):
        _assert_same(g, w)
    # Rows stopped at different steps: both stop reasons, and lengths that differ.
    reasons = {s.stop_reason for out in want for s in out.sequences}
    assert reasons == {"stop", "length"}, reasons
    graphs = static.batch.graphs
    assert graphs.steps >= 15 and graphs.table.n == 4  # three adapters at once: 4 table slots
    assert static.batch.cache is not None and static.live_rows == 0  # the slab stays for its graphs


def test_bucket_padding_does_not_change_results(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    """Every step padded to 32 rows (the padded rows write the scratch row) gives what the
    tightest buckets give."""
    requests = _requests(tokenizer, slots)
    tight = _static(runner, tokenizer)
    padded = _static(runner, tokenizer)
    padded.batch.graphs = GraphDecoder(runner, capture=False, min_bucket=32)
    for g, w in zip(_staggered(padded, requests), _staggered(tight, requests)):
        _assert_same(g, w)
    assert {bucket for bucket, _, _ in padded.batch.graphs._steps} == {32}
    assert len(tight.batch.graphs._steps) > 1  # several buckets were used
    assert [bucket_of(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]


def test_slab_growth_recaptures_and_results_hold(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    """12 rows outgrow the first 8 slab rows (plus the scratch row); a long row's tokens
    outgrow 256 columns while decoding: the steps are rebuilt for each new slab (and only
    then: C = 512 > 256 would defeat an identity check on ints), results unchanged."""
    specs = [(slots[i % 3] if i % 4 else None,
              SampleSpec(prompt=token_array(tokenizer, f"Request {i}"), max_tokens=2 + i, temperature=0.0))
             for i in range(11)]
    long_prompt = token_array(tokenizer, "tok " * 260)[:250]
    assert len(long_prompt) == 250  # 251 columns at the first step, 256 + 1 at the seventh
    last = (slots[0], SampleSpec(prompt=long_prompt, max_tokens=30, temperature=1.0, seed=2))
    outs = {}
    for name, sampler in (("static", _static(runner, tokenizer)), ("eager", Sampler(runner, tokenizer))):
        boxes: list[list] = [[] for _ in range(12)]
        for (slot, spec), box in zip([*specs, last], boxes):
            sampler.admit(slot, spec, box.append)
        if name == "static":
            assert sampler.batch.cache.capacity == (16, 256)
        while sampler.pending:
            sampler.step()
        outs[name] = [b[0] for b in boxes]
        if name == "static":
            graphs = sampler.batch.graphs
            assert sampler.batch.cache.capacity == (16, 512)
            assert graphs.steps == 29 and graphs.rebuilds == 2, (graphs.steps, graphs.rebuilds)
    for g, w in zip(outs["static"], outs["eager"]):
        _assert_same(g, w)


def test_table_slots_are_reused_and_follow_weight_updates(runner: ModelRunner, tokenizer) -> None:
    """A new adapter takes a freed table slot without reallocating the table; an in-place
    update of an adapter's factors (what an optimizer step does) reaches the next step."""
    a, b = attach_random_adapter(runner, 4, 7), attach_random_adapter(runner, 4, 8)
    try:
        spec = SampleSpec(prompt=token_array(tokenizer, "Tell me a story"), num_samples=2, max_tokens=6,
                          temperature=1.0, seed=4)
        static, eager = _static(runner, tokenizer), Sampler(runner, tokenizer)
        _assert_same(static.sample(a, spec), eager.sample(a, spec))
        generation = static.batch.graphs.table.generation
        _assert_same(static.sample(b, spec), eager.sample(b, spec))
        assert static.batch.graphs.table.generation == generation and static.batch.graphs.table.holder == [b]
        before = static.sample(b, spec)
        with torch.no_grad():
            for layer in runner.layers.values():
                if b in layer.adapters:
                    layer.adapters[b].B.mul_(3.0)  # in place, as an optimizer step updates them
        after = static.sample(b, spec)
        _assert_same(after, eager.sample(b, spec))
        assert not np.allclose(after.sequences[0].logprobs, before.sequences[0].logprobs)
    finally:
        runner.detach(a)
        runner.detach(b)


def test_parallel_token_choice_equals_sequential(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    """Requests choosing their tokens in pool threads (the CUDA default) draw exactly what
    they draw one after another: each touches only its own rows and generator."""
    requests = _requests(tokenizer, slots)
    threaded = Sampler(runner, tokenizer, cuda_graphs="on", pick_threads=4)
    assert threaded._pool is not None and Sampler(runner, tokenizer)._pool is None  # CPU default: none
    sequential = Sampler(runner, tokenizer, cuda_graphs="on", pick_threads=0)
    for got, want in zip(_staggered(threaded, requests), _staggered(sequential, requests)):
        for g, w in zip(got.sequences, want.sequences):
            np.testing.assert_array_equal(g.tokens, w.tokens)
            np.testing.assert_array_equal(g.logprobs, w.logprobs)
            if w.topk_ids is not None:
                np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
                np.testing.assert_array_equal(g.topk_logprobs, w.topk_logprobs)


def test_settings(runner: ModelRunner, tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="sampler_cuda_graphs"):
        Sampler(runner, tokenizer, cuda_graphs="always")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [graphs_wanted(m, cpu) for m in ("auto", "on", "off")] == [False, True, False]
    assert [graphs_wanted(m, cuda) for m in ("auto", "on", "off")] == [True, True, False]
    assert Sampler(runner, tokenizer).batch.graphs is None  # auto on a CPU: the eager step
    assert isinstance(Sampler(runner, tokenizer, kv_cache="dynamic", cuda_graphs="on").batch, DecodeBatch)
    from tinsmith.cli import _settings, build_parser

    parse = build_parser().parse_args
    assert _settings(parse(["serve", "--data-dir", str(tmp_path)])).sampler_cuda_graphs == "auto"
    args = parse(["serve", "--data-dir", str(tmp_path), "--sampler-cuda-graphs", "on"])
    assert _settings(args).sampler_cuda_graphs == "on"


def _sdk_samples(url: str) -> list[types.SampleResponse]:
    """Through the SDK: one LoRA run trained one step, its sampler and the base model's,
    sampled concurrently (greedy with prompt and top-k prompt logprobs, seeded, stop string)."""
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(TINY))
    training = service.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    ids = tok.encode("The graph replays the decoding step of every row")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(ids[1:], np.int64), "weights": np.ones(len(ids) - 1)},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    tuned = training.save_weights_and_get_sampling_client(name="graph").result()
    base = service.create_sampling_client(base_model=TINY)
    prompt = types.ModelInput.from_ints(tok.encode("Once upon a time"))
    futures: list[Future] = []
    for client in (tuned, base):
        futures.append(client.sample(prompt, 2, types.SamplingParams(max_tokens=10, temperature=0.0),
                                     include_prompt_logprobs=True, topk_prompt_logprobs=2))
        futures.append(client.sample(prompt, 3, types.SamplingParams(max_tokens=12, temperature=1.0, seed=17,
                                                                     top_k=50, stop=["e"]),
                                     topk_sample_logprobs=2))
    return [f.result() for f in futures]


def test_sdk_results_equal_with_static_steps(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Two real servers, the static step forced on and the default (off on a CPU): the SDK's
    samples agree (tokens equal, logprobs within 1e-5), and only the first used static steps."""
    caplog.set_level(logging.INFO, logger="tinsmith.graph_decode")
    results, used = {}, {}
    for mode in ("on", "auto"):
        caplog.clear()
        with tinsmith.local(models=[TINY], data_dir=tmp_path / mode, sampler_cuda_graphs=mode) as url:
            results[mode] = _sdk_samples(url)
        used[mode] = any("first static decode step (run eagerly)" in r.getMessage() for r in caplog.records)
    assert used == {"on": True, "auto": False}
    results["off"] = results.pop("auto")
    for got, want in zip(results["on"], results["off"], strict=True):
        assert len(got.sequences) == len(want.sequences)
        for g, w in zip(got.sequences, want.sequences):
            assert g.tokens == w.tokens and g.stop_reason == w.stop_reason
            np.testing.assert_allclose(g.logprobs, w.logprobs, **TOL)
        if want.prompt_logprobs is not None:  # from the prefill, which both share: equal
            assert got.prompt_logprobs == want.prompt_logprobs
            assert got.topk_prompt_logprobs == want.topk_prompt_logprobs
    # the tuned adapter changed something: its greedy tokens or logprobs differ from the base's
    tuned, base = results["off"][0].sequences[0], results["off"][2].sequences[0]
    assert tuned.tokens != base.tokens or not np.allclose(tuned.logprobs, base.logprobs)
