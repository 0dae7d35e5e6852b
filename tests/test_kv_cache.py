"""The native sampler's preallocated KV slab (engine/kv_cache.py, engine/slab_batch.py),
prefix sharing and chunked prefill, on the tiny test model.

Tolerance: the slab path's logits differ from the DynamicCache path's, from `generate`'s and
from a request decoded alone by float rounding only (a wider masked attention view, matmuls
over more rows), so tokens of greedy and seeded requests must be equal and logprobs agree
within 1e-5 (absolute and relative; float32 on the CPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_same_samples, attach_random_adapter, token_array
from transformers import AutoTokenizer

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.decode import DecodeBatch
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.engine.slab_batch import SlabBatch
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import LoraSpec, SampleOut, SampleSpec

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY)


@pytest.fixture(scope="module")
def tokenizer(runner: ModelRunner):
    return AutoTokenizer.from_pretrained(runner.model_dir)


@pytest.fixture(scope="module")
def slots(runner: ModelRunner):
    attached = [attach_random_adapter(runner, 4, seed) for seed in (1, 2)]
    yield attached
    for slot in attached:
        runner.detach(slot)


def _assert_same(got: SampleOut, want: SampleOut) -> None:
    assert_same_samples(got, want, TOL)


def _requests(tokenizer, slots: list[int]) -> list[tuple[int | None, SampleSpec]]:
    texts = ["Hello, how are you today? I am", "One", "The quick brown fox jumps over the lazy dog and",
             "Numbers: 1 2 3", "Once upon a time, in a land far away, there lived"]
    specs: list[dict] = [
        {"num_samples": 3, "max_tokens": 12, "temperature": 1.0, "seed": 11},
        {"num_samples": 1, "max_tokens": 3, "temperature": 0.0},
        {"num_samples": 2, "max_tokens": 9, "temperature": 0.7, "top_k": 20, "seed": 5, "topk_sample_logprobs": 3},
        {"num_samples": 2, "max_tokens": 14, "temperature": 1.0, "top_p": 0.9, "seed": 7, "stop_strings": ("e",)},
        {"num_samples": 1, "max_tokens": 10, "temperature": 0.0, "prompt_logprobs": True, "topk_prompt_logprobs": 2},
    ]
    which = [slots[0], None, slots[1], slots[0], None]
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


def test_slab_equals_dynamic_cache_path(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    requests = _requests(tokenizer, slots)
    slab = Sampler(runner, tokenizer, kv_cache="slab")
    dynamic = Sampler(runner, tokenizer, kv_cache="dynamic")
    assert isinstance(slab.batch, SlabBatch) and isinstance(dynamic.batch, DecodeBatch)
    for got, want in zip(_staggered(slab, requests), _staggered(dynamic, requests)):
        _assert_same(got, want)
    assert slab.batch.cache is None and slab.live_rows == 0  # the slab went with the last row


def test_greedy_equals_generate(runner: ModelRunner, tokenizer) -> None:
    prompts = [token_array(tokenizer, t) for t in ("Hello there, my friend", "The cat sat on the mat and then")]
    sampler = Sampler(runner, tokenizer)
    boxes: list[list] = [[], []]
    for p, box in zip(prompts, boxes):  # both decode together, with different lengths
        sampler.admit(None, SampleSpec(prompt=p, max_tokens=12, temperature=0.0), box.append)
    while sampler.pending:
        sampler.step()
    for p, box in zip(prompts, boxes):
        ids = torch.as_tensor(p)[None]
        with torch.inference_mode():
            out = runner.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=12, min_new_tokens=12, pad_token_id=0,
                                        output_scores=True, return_dict_in_generate=True)
        want = out.sequences[0, len(p):]
        lps = torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.scores, want)])
        seq = box[0].sequences[0]
        assert seq.tokens.tolist() == want.tolist()
        np.testing.assert_allclose(seq.logprobs, lps.numpy(), **TOL)


def test_rows_joining_and_leaving_leave_others_unchanged(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    long = SampleSpec(prompt=token_array(tokenizer, "A long story begins"), max_tokens=20, temperature=1.0, seed=3)
    want = Sampler(runner, tokenizer).sample(slots[0], long)
    sampler = Sampler(runner, tokenizer)
    box: list = []
    sampler.admit(slots[0], long, box.append)
    row = sampler.batch.slab_rows[0]
    others = [SampleSpec(prompt=token_array(tokenizer, t), num_samples=n, max_tokens=m, temperature=0.0)
              for t, n, m in (("Hi", 2, 3), ("Good morning to you", 3, 5), ("x", 1, 2), ("Bye now", 2, 4))]
    seen_rows: set[int] = set()
    for step in range(19):
        if step in (1, 3, 6, 8):
            spec = others[(1, 3, 6, 8).index(step)]
            sampler.admit(slots[1] if step % 2 else None, spec, lambda out: None)
            seen_rows.update(sampler.batch.slab_rows)
        assert sampler.batch.slab_rows[sampler.batch.slots.index(slots[0])] == row  # never moved
        sampler.step()
    assert not sampler.pending
    _assert_same(box[0], want)
    assert max(seen_rows) < 1 + 2 + 3  # departed rows' slab rows were reused, not appended


def test_prefix_shared_rows_equal_unshared(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    prompt = token_array(tokenizer, "Sharing a prompt between samples")
    one = SampleSpec(prompt=prompt, num_samples=1, max_tokens=10, temperature=0.0, topk_sample_logprobs=2)
    four = SampleSpec(prompt=prompt, num_samples=4, max_tokens=10, temperature=0.0, topk_sample_logprobs=2)
    want = Sampler(runner, tokenizer).sample(slots[1], one).sequences[0]
    sampler = Sampler(runner, tokenizer)
    box: list = []
    sampler.admit(slots[1], four, box.append)
    layer = sampler.batch.cache.layers[0]
    keys = layer.keys[:, :, : len(prompt)]  # [4, Hkv, P, D]: one prefill, copied per sample
    assert keys.shape[0] == 4 and all(torch.equal(keys[0], keys[i]) for i in range(1, 4))
    while sampler.pending:
        sampler.step()
    for seq in box[0].sequences:
        np.testing.assert_array_equal(seq.tokens, want.tokens)
        np.testing.assert_allclose(seq.logprobs, want.logprobs, **TOL)
        np.testing.assert_array_equal(seq.topk_ids, want.topk_ids)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_equals_one_shot(runner: ModelRunner, tokenizer, slots: list[int], chunk: int) -> None:
    prompt = token_array(tokenizer, "word " * 12 + "and then the story went on and on until the end")
    targets = np.full((len(prompt) - 1, 1), -1, np.int64)  # [P - 1, 1]: three positions asked
    targets[[2, 9, 17], 0] = (5, 7, 9)
    spec = SampleSpec(prompt=prompt, num_samples=2, max_tokens=8, temperature=1.0, seed=9, prompt_logprobs=True,
                      topk_prompt_logprobs=3, prompt_logprobs_last_n=12, target_ids=targets.reshape(-1),
                      target_shape=targets.shape)
    want = Sampler(runner, tokenizer, prefill_chunk=0).sample(slots[0], spec)
    got = Sampler(runner, tokenizer, prefill_chunk=chunk).sample(slots[0], spec)
    _assert_same(got, want)
    np.testing.assert_array_equal(got.topk_prompt_ids, want.topk_prompt_ids)
    np.testing.assert_allclose(got.topk_prompt_logprobs, want.topk_prompt_logprobs, **TOL)
    np.testing.assert_allclose(got.target_logprobs, want.target_logprobs, **TOL)


def test_chunked_prefill_interleaves_with_decoding(runner: ModelRunner, tokenizer) -> None:
    short = SampleSpec(prompt=token_array(tokenizer, "Hi"), max_tokens=12, temperature=0.0)
    long = SampleSpec(prompt=token_array(tokenizer, "word " * 40), max_tokens=4, temperature=0.0)
    want = [Sampler(runner, tokenizer).sample(None, s) for s in (short, long)]
    sampler = Sampler(runner, tokenizer, prefill_chunk=8)
    boxes: list[list] = [[], []]
    sampler.admit(None, short, boxes[0].append)
    sampler.admit(None, long, boxes[1].append)  # 41 tokens: one chunk now, five more later
    assert sampler.live_rows == 1 and len(sampler._prefilling) == 1
    steps_while_prefilling = 0
    while sampler._prefilling:
        before = sampler._live[0].steps
        sampler.step()
        assert sampler._live[0].steps == before + 1  # the decoding row advanced meanwhile
        steps_while_prefilling += 1
    assert steps_while_prefilling == 5 and sampler.live_rows == 2
    while sampler.pending:
        sampler.step()
    for box, w in zip(boxes, want):
        _assert_same(box[0], w)


def test_detached_slot_fails_a_chunked_prefill_alone(runner: ModelRunner, tokenizer, slots: list[int]) -> None:
    adapter = Adapter.create(LoraSpec(rank=2, seed=4), runner.layers)
    slot = runner.attach(adapter)
    sampler = Sampler(runner, tokenizer, prefill_chunk=4)
    ok: list = []
    bad: list = []
    sampler.admit(None, SampleSpec(prompt=token_array(tokenizer, "Hi"), max_tokens=5, temperature=0.0), ok.append)
    sampler.admit(slot, SampleSpec(prompt=token_array(tokenizer, "word " * 10), max_tokens=5), bad.append)
    runner.detach(slot)
    while sampler.pending:
        sampler.step()
    assert isinstance(bad[0], RuntimeError) and "detached" in str(bad[0])
    assert isinstance(ok[0], SampleOut)


def test_slab_grows_and_compacts(runner: ModelRunner, tokenizer) -> None:
    """12 rows outgrow the first 8 slab rows, a 70-token prompt the first 64 columns; when
    all but the last-admitted row leave, it moves down to slab row 0 and decodes on."""
    specs = [SampleSpec(prompt=token_array(tokenizer, f"Request {i}"), max_tokens=2, temperature=0.0) for i in range(11)]
    last = SampleSpec(prompt=token_array(tokenizer, "tok " * 69), max_tokens=10, temperature=1.0, seed=2)
    want = Sampler(runner, tokenizer).sample(None, last)
    sampler = Sampler(runner, tokenizer)
    box: list = []
    for spec in specs:
        sampler.admit(None, spec, lambda out: None)
    sampler.admit(None, last, box.append)
    assert sampler.batch.cache.capacity == (16, 128)
    sampler.step()  # the eleven 2-token requests finish
    assert sampler.live_rows == 1 and sampler.batch.slab_rows == [0]
    while sampler.pending:
        sampler.step()
    _assert_same(box[0], want)


def test_settings(runner: ModelRunner, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="kv_cache"):
        Sampler(runner, tokenizer, kv_cache="paged")
    import tinsmith.engine.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "mergeable", lambda cache: False)
    assert isinstance(Sampler(runner, tokenizer).batch, DecodeBatch)  # one request at a time


def test_benchmark_dry_run() -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / "sampling.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--max-tokens", "4", "--requests", "8",
                          "--prompt-len", "32"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    for arm in ("slab", "dynamic", "generate", "sequential"):
        assert any(line.startswith(arm) for line in out.stdout.splitlines()), out.stdout
