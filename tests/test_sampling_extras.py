"""The SDK's per-position sampling extras, end to end through the official client:
topk_prompt_logprobs, topk_sample_logprobs, target_prompt_logprobs (dense and sparse CSR)
and prompt_alt_tokens_k; many seeded samples per prompt; and the 400s for bad values.

The tiny random model is nearly uniform over its vocabulary, so a prompt token is rarely
among a position's top k by chance. The `prompt` fixture is therefore a short text followed
by its own greedy continuation: from there on, each prompt token is its position's top-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from conftest import TINY
from tinker import types

ONE = types.SamplingParams(max_tokens=1, temperature=0.0, stop=[])  # one prefill, one token
N_HEAD = 6  # prompt tokens from text; the rest are greedy, so prompt[t] is top-1 for t >= N_HEAD


@pytest.fixture(scope="module")
def sampler(service_client):
    return service_client.create_sampling_client(base_model=TINY).result()


@pytest.fixture(scope="module")
def prompt(sampler, tokenizer) -> list[int]:
    head = tokenizer.encode("Tinsmiths shape sheet metal with hammers")[:N_HEAD]
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    tail = sampler.sample(types.ModelInput.from_ints(head), 1, greedy).result().sequences[0].tokens
    return head + tail


def _sample(sampler, prompt: list[int], params=ONE, n: int = 1, **kw) -> types.SampleResponse:
    return sampler.sample(types.ModelInput.from_ints(prompt), n, params, **kw).result()


def test_topk_prompt_logprobs(sampler, prompt) -> None:
    k = 8
    r = _sample(sampler, prompt, include_prompt_logprobs=True, topk_prompt_logprobs=k)
    top, lps = r.topk_prompt_logprobs, r.prompt_logprobs
    assert len(top) == len(prompt) and top[0] is None and lps[0] is None
    hits = 0
    for t in range(1, len(prompt)):
        ids = [i for i, _ in top[t]]
        vals = [v for _, v in top[t]]
        assert len(top[t]) == k and len(set(ids)) == k
        assert vals == sorted(vals, reverse=True) and vals[0] >= max(vals) and vals[0] < 0
        assert lps[t] <= vals[0] + 1e-6
        if prompt[t] in ids:
            assert vals[ids.index(prompt[t])] == pytest.approx(lps[t], abs=1e-6)
            hits += 1
        else:
            assert lps[t] <= vals[-1] + 1e-6
    assert hits >= len(prompt) - N_HEAD  # the greedy tail is always in the top k
    assert all(top[t][0][0] == prompt[t] for t in range(N_HEAD, len(prompt)))
    # Same numbers as compute_logprobs (a separate prefill), and the numpy view agrees.
    full = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    np.testing.assert_allclose(np.array(full[1:]), np.array(lps[1:]), atol=1e-5)
    np.testing.assert_array_equal(r.topk_prompt_logprobs_np.token_ids[1:, 0], [row[0][0] for row in top[1:]])

    # prompt_logprobs_last_n: only the suffix rows are filled, with the same values.
    last = _sample(sampler, prompt, include_prompt_logprobs=True, topk_prompt_logprobs=k,
                   prompt_logprobs_last_n=3)
    assert last.topk_prompt_logprobs[:-3] == [None] * (len(prompt) - 3)
    for got, want in zip(last.topk_prompt_logprobs[-3:], top[-3:]):
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-5)
    # The SDK does not tie top-k to include_prompt_logprobs: it works alone.
    alone = _sample(sampler, prompt, topk_prompt_logprobs=2)
    assert alone.prompt_logprobs is None and [i for i, _ in alone.topk_prompt_logprobs[-1]] == \
        [i for i, _ in top[-1][:2]]


def test_topk_sample_logprobs(sampler, prompt) -> None:
    greedy = _sample(sampler, prompt, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[]), n=2,
                     topk_sample_logprobs=4)
    for seq in greedy.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 6
        for tok, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
            assert len(row) == 4 and row[0][0] == tok and row[0][1] == pytest.approx(lp, abs=1e-6)
            assert [v for _, v in row] == sorted((v for _, v in row), reverse=True)
    params = types.SamplingParams(max_tokens=8, temperature=1.5, seed=11, stop=[])
    r = _sample(sampler, prompt, params, n=4, topk_sample_logprobs=3)
    for seq in r.sequences:
        assert seq.topk_logprobs_np.token_ids.shape == (len(seq.tokens), 3)
        for tok, lp, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
            assert lp <= row[0][1] + 1e-6
            ids = [i for i, _ in row]
            if tok in ids:
                assert row[ids.index(tok)][1] == pytest.approx(lp, abs=1e-6)
    # Seeded draws do not depend on the extras, and repeat exactly.
    again = _sample(sampler, prompt, params, n=4, topk_sample_logprobs=3)
    plain = _sample(sampler, prompt, params, n=4, prompt_alt_tokens_k=2)
    assert [s.tokens for s in r.sequences] == [s.tokens for s in again.sequences] == \
        [s.tokens for s in plain.sequences]
    assert [s.topk_logprobs for s in r.sequences] == [s.topk_logprobs for s in again.sequences]
    assert plain.sequences[0].topk_logprobs is None


def test_target_prompt_logprobs_dense_and_sparse(sampler, prompt) -> None:
    n = len(prompt)
    ref = _sample(sampler, prompt, include_prompt_logprobs=True, topk_prompt_logprobs=2)
    top = ref.topk_prompt_logprobs
    ids = torch.full((n - 1, 3), -1, dtype=torch.int64)
    ids[:, 0] = torch.tensor(prompt[1:])  # row i scores prompt position i + 1
    ids[:, 1] = torch.tensor([top[i + 1][1][0] for i in range(n - 1)])  # the second most likely
    ids[::2, 2] = 5
    r = _sample(sampler, prompt, target_prompt_logprobs=types.TensorData.from_torch(ids))
    got = r.target_prompt_logprobs
    assert got.dtype == "float32" and got.shape == [n - 1, 3] and got.sparse_crow_indices is None
    vals = got.to_numpy()
    np.testing.assert_allclose(vals[:, 0], np.array(ref.prompt_logprobs[1:]), atol=1e-5)
    np.testing.assert_allclose(vals[:, 1], [top[i + 1][1][1] for i in range(n - 1)], atol=1e-5)
    assert (vals[1::2, 2] == 0.0).all() and (vals[::2, 2] < 0).all()

    # Sparse CSR in, sparse CSR out: only the listed cells, the rest read back as 0.
    sparse_ids = torch.full((n - 1, 4), -1, dtype=torch.int64)
    sparse_ids[n - 2, 3] = prompt[-1]
    sparse_ids[2, 0] = 5
    request = types.TensorData.from_torch_sparse(sparse_ids, pad_value=-1)
    assert request.sparse_crow_indices is not None
    out = _sample(sampler, prompt, target_prompt_logprobs=request).target_prompt_logprobs
    assert out.sparse_crow_indices == request.sparse_crow_indices
    assert out.sparse_col_indices == request.sparse_col_indices and out.shape == [n - 1, 4]
    dense = out.to_numpy()
    assert np.count_nonzero(dense) == 2
    assert dense[n - 2, 3] == pytest.approx(ref.prompt_logprobs[-1], abs=1e-5)
    assert dense[2, 0] == pytest.approx(vals[2, 2], abs=1e-5)


def test_prompt_alt_tokens(sampler, prompt) -> None:
    n, k = len(prompt), 5
    params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=3, stop=[])
    a = _sample(sampler, prompt, params, prompt_alt_tokens_k=k).prompt_alt_tokens
    toks, lps = a.tokens.to_numpy(), a.logprobs.to_numpy()
    assert toks.shape == lps.shape == (n - 1, k) and toks.dtype == np.int64 and lps.dtype == np.float32
    b = _sample(sampler, prompt, params, prompt_alt_tokens_k=k).prompt_alt_tokens
    np.testing.assert_array_equal(b.tokens.to_numpy(), toks)
    other = types.SamplingParams(max_tokens=1, temperature=1.0, seed=4, stop=[])
    c = _sample(sampler, prompt, other, prompt_alt_tokens_k=k).prompt_alt_tokens
    assert (c.tokens.to_numpy() != toks).any()
    assert len(np.unique(toks)) > k  # temperature 1 on a near-uniform model: varied draws
    # Their logprobs are the model's: score the same ids with target_prompt_logprobs.
    scored = _sample(sampler, prompt, target_prompt_logprobs=types.TensorData.from_numpy(toks))
    np.testing.assert_allclose(scored.target_prompt_logprobs.to_numpy(), lps, atol=1e-5)
    # Temperature 0: the argmax, repeated; row i is the top-1 at prompt position i + 1.
    greedy = _sample(sampler, prompt, ONE, prompt_alt_tokens_k=3, topk_prompt_logprobs=1)
    g = greedy.prompt_alt_tokens.tokens.to_numpy()
    top1 = [row[0][0] for row in greedy.topk_prompt_logprobs[1:]]
    np.testing.assert_array_equal(g, np.repeat(np.array(top1)[:, None], 3, axis=1))
    np.testing.assert_array_equal(g[N_HEAD - 1 :, 0], prompt[N_HEAD:])


def test_many_seeded_samples(sampler, prompt) -> None:
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=2024, stop=[])
    a = _sample(sampler, prompt, params, n=32)
    b = _sample(sampler, prompt, params, n=32, topk_sample_logprobs=2)
    assert len(a.sequences) == 32 and len({s.sequence_id for s in a.sequences}) == 32
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) == 32  # independent draws
    np.testing.assert_allclose(a.sequences[7].logprobs, b.sequences[7].logprobs, atol=1e-6)


BAD = {
    "negative top-k": ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs must be between 0 and"),
    "top-k too large": ({"topk_sample_logprobs": 5000}, "topk_sample_logprobs must be between 0 and 1000"),
    "too many draws": ({"prompt_alt_tokens_k": 1001}, "prompt_alt_tokens_k must be between 0 and 1000"),
    "target rows": ({"target_prompt_logprobs": np.zeros((3, 2), np.int64)},
                    "target_prompt_logprobs has 3 rows but the prompt has"),
    "target id": ({"target_prompt_logprobs": "vocab"}, "target_prompt_logprobs: token id 1000000 is outside"),
    "target all -1": ({"target_prompt_logprobs": "empty"}, "target_prompt_logprobs names no token id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_extras_are_400s(case: str, sampler, prompt) -> None:
    kw, message = BAD[case]
    target = kw.get("target_prompt_logprobs")
    if isinstance(target, str):
        ids = np.full((len(prompt) - 1, 2), -1, np.int64)
        if target == "vocab":
            ids[1, 1] = 10**6
        kw = {"target_prompt_logprobs": ids}
    if "target_prompt_logprobs" in kw:
        kw = {"target_prompt_logprobs": types.TensorData.from_numpy(kw["target_prompt_logprobs"])}
    with pytest.raises(tinker.BadRequestError) as err:
        _sample(sampler, prompt, **kw)
    assert message in str(err.value)
    # The server keeps serving, extras included.
    ok = _sample(sampler, prompt, topk_prompt_logprobs=2)
    assert len(ok.sequences) == 1 and ok.topk_prompt_logprobs[-1] is not None
