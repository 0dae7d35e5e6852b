"""Sampling through the SDK: parameters, stops, logprobs, seeds; and the async style."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import SENTENCES, TINY, logprobs_of, text_datum
from tinker import types


@pytest.fixture(scope="module")
def base_sampler(service_client):
    return service_client.create_sampling_client(base_model=TINY).result()


@pytest.fixture(scope="module")
def prompt(tokenizer) -> types.ModelInput:
    return types.ModelInput.from_ints(tokenizer.encode("Once upon a time, in a land far away"))


def test_greedy_is_deterministic_and_logprobs_match_forward(service_client, base_sampler, prompt) -> None:
    params = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
    r1 = base_sampler.sample(prompt, 2, params).result()
    r2 = base_sampler.sample(prompt, 1, params).result()
    assert len(r1.sequences) == 2
    assert r1.sequences[0].tokens == r1.sequences[1].tokens == r2.sequences[0].tokens
    seq = r1.sequences[0]
    assert len(seq.tokens) == 12 and seq.stop_reason == "length"
    assert len(seq.logprobs) == 12
    # The sampler's logprobs are the model's: a forward pass over prompt + sample agrees.
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    ids = prompt.to_ints() + seq.tokens
    out = tc.forward([types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                  loss_fn_inputs={"target_tokens": ids[1:], "weights": [0.0] * (len(ids) - 1)})],
                     "cross_entropy").result()
    np.testing.assert_allclose(logprobs_of(out)[0][-12:], seq.logprobs, atol=1e-4)
    assert r1.sequences[0].sequence_id != r1.sequences[1].sequence_id


def test_seed_reproducible_and_samples_differ(base_sampler, prompt) -> None:
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=123, stop=[])
    a = base_sampler.sample(prompt, 4, params).result()
    b = base_sampler.sample(prompt, 4, params).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # 4 independent samples
    c = base_sampler.sample(prompt, 4, types.SamplingParams(max_tokens=8, seed=124, stop=[])).result()
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]


def test_stop_tokens_and_strings_are_included(base_sampler, prompt, tokenizer) -> None:
    greedy = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])).result()
    toks = greedy.sequences[0].tokens
    stop_tok = toks[3]
    first = toks.index(stop_tok)
    r = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0,
                                                            stop=[stop_tok])).result().sequences[0]
    assert r.tokens == toks[: first + 1] and r.stop_reason == "stop"
    text = tokenizer.decode(toks[:4])
    stop_str = text[-3:]
    r = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0,
                                                            stop=[stop_str])).result().sequences[0]
    assert r.stop_reason == "stop" and stop_str in tokenizer.decode(r.tokens)
    assert stop_str not in tokenizer.decode(r.tokens[:-1])
    assert r.tokens == toks[: len(r.tokens)]


def test_top_k_one_is_greedy_and_prompt_logprobs(base_sampler, prompt) -> None:
    greedy = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result()
    topk = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, top_k=1, seed=5, stop=[])).result()
    assert greedy.sequences[0].tokens == topk.sequences[0].tokens
    r = base_sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True).result()
    lps = r.prompt_logprobs
    assert lps[0] is None and len(lps) == prompt.length and all(x is not None and x < 0 for x in lps[1:])
    full = base_sampler.compute_logprobs(prompt).result()
    np.testing.assert_allclose(np.array(full[1:]), np.array(lps[1:]), atol=1e-5)


def test_async_style(service_client, tokenizer) -> None:
    async def main() -> tuple[list[float], list[int]]:
        tc = await service_client.create_lora_training_client(base_model=TINY, rank=4, seed=0)
        batch = [text_datum(tokenizer, s) for s in SENTENCES]
        losses = []
        for _ in range(3):
            fb = tc.forward_backward(batch, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
            losses.append((await fb).metrics["loss:sum"])
            await opt
        sampler = await tc.save_weights_and_get_sampling_client()
        res = await sampler.sample(types.ModelInput.from_ints(tokenizer.encode("The quick")), 1,
                                   types.SamplingParams(max_tokens=5, temperature=0.0, stop=[]))
        return losses, res.sequences[0].tokens

    losses, tokens = asyncio.run(main())
    assert losses[-1] < losses[0] and len(tokens) == 5
