"""Inflight sampling clients (save_weights_and_get_sampling_client(kind="inflight")),
through the official SDK: all inflight clients of a run sample one shared weights target that
each inflight save updates; snapshot clients never change; a sample that spans an inflight
save runs wholly on the weights it started with.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from conftest import SENTENCES, TINY, text_datum
from tinker import types

WAIT_S = 60


def _lp(sc: tinker.SamplingClient, prompt: types.ModelInput) -> np.ndarray:
    out = sc.compute_logprobs(prompt).result(timeout=WAIT_S)
    return np.asarray(out[1:], dtype=np.float64)  # position 0 is never scored


def _train(tc: tinker.TrainingClient, tokenizer) -> None:
    batch = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
    tc.forward_backward(batch, "cross_entropy").result(timeout=WAIT_S)
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=WAIT_S)


@pytest.fixture
def tc(service_client: tinker.ServiceClient) -> tinker.TrainingClient:
    return service_client.create_lora_training_client(base_model=TINY, rank=4, seed=11).result()


def test_inflight_clients_share_the_latest_inflight_weights(tc: tinker.TrainingClient, tokenizer) -> None:
    prompt = types.ModelInput.from_ints(tokenizer.encode(SENTENCES[3]))
    snap0 = tc.save_weights_and_get_sampling_client().result(timeout=WAIT_S)
    a = tc.save_weights_and_get_sampling_client(kind="inflight").result(timeout=WAIT_S)
    b = tc.save_weights_and_get_sampling_client(kind="inflight").result(timeout=WAIT_S)
    lp0 = _lp(snap0, prompt)
    for sc in (a, b):
        np.testing.assert_allclose(_lp(sc, prompt), lp0, atol=1e-5)

    _train(tc, tokenizer)
    # Training alone publishes nothing: the inflight target is still step 0.
    np.testing.assert_allclose(_lp(a, prompt), lp0, atol=1e-5)

    snap1 = tc.save_weights_and_get_sampling_client().result(timeout=WAIT_S)
    c = tc.save_weights_and_get_sampling_client(kind="inflight").result(timeout=WAIT_S)
    lp1 = _lp(snap1, prompt)
    assert np.abs(lp1 - lp0).max() > 1e-3, "training did not change the weights"
    for sc in (a, b, c):  # the existing inflight clients moved with the new save
        np.testing.assert_allclose(_lp(sc, prompt), lp1, atol=1e-5)
    np.testing.assert_allclose(_lp(snap0, prompt), lp0, atol=1e-5)  # snapshots never change
    assert len({sc._sampling_session_id for sc in (a, b, c)}) == 3  # a fresh session each


def test_a_sample_spanning_an_inflight_save_runs_on_one_set_of_weights(
    tc: tinker.TrainingClient, tokenizer
) -> None:
    """A request already decoding when an inflight save lands finishes on the weights it
    started with: its logprobs are wholly those of step 0's or wholly those of step 1's."""
    prompt_ids = tokenizer.encode(SENTENCES[0])[:6]
    prompt = types.ModelInput.from_ints(prompt_ids)
    snap0 = tc.save_weights_and_get_sampling_client().result(timeout=WAIT_S)
    a = tc.save_weights_and_get_sampling_client(kind="inflight").result(timeout=WAIT_S)
    _train(tc, tokenizer)
    params = types.SamplingParams(max_tokens=48, temperature=1.0, seed=5, stop=[])
    running = a.sample(prompt, 2, params)
    tc.save_weights_and_get_sampling_client(kind="inflight").result(timeout=WAIT_S)
    snap1 = tc.save_weights_and_get_sampling_client().result(timeout=WAIT_S)
    for seq in running.result(timeout=WAIT_S).sequences:
        full = types.ModelInput.from_ints(prompt_ids + seq.tokens)
        got = np.asarray(seq.logprobs, dtype=np.float64)
        under = [_lp(s, full)[-len(seq.tokens):] for s in (snap0, snap1)]
        assert any(np.allclose(got, u, atol=1e-4) for u in under), (
            [float(np.abs(got - u).max()) for u in under])


def test_engine_replaces_one_adapter_and_lets_decoding_requests_finish(tmp_path) -> None:
    """The sampling backend under an inflight key: a second put_snapshot replaces the first
    (one adapter, one slot), a request decoding meanwhile finishes on the old weights
    exactly, and the old slot is freed when it ends. Driven step by step, so deterministic."""
    import torch
    from transformers import AutoTokenizer

    from tinsmith.engine.adapter import Adapter
    from tinsmith.engine.runner import ModelRunner
    from tinsmith.engine.sampling import LocalSampler
    from tinsmith.models.catalog import resolve_model_dir
    from tinsmith.types import LoraSpec, SampleSpec

    runner = ModelRunner(resolve_model_dir(TINY), TINY)
    tok = AutoTokenizer.from_pretrained(runner.model_dir)

    def adapter(seed: int) -> Adapter:
        a = Adapter.create(LoraSpec(rank=4, seed=seed), runner.layers)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in a.weights.values():
                w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.3)
        return a

    spec = SampleSpec(prompt=np.asarray(tok.encode(SENTENCES[2]), dtype=np.int64), max_tokens=10,
                      temperature=0.0)

    def alone(a: Adapter):
        ref = LocalSampler(runner, tok, tmp_path / f"ref{id(a)}")
        ref.put_snapshot("k", a)
        out: list = []
        ref.start_sample("k", spec, None, out.append)
        while not out:
            ref.step()
        return out[0].sequences[0]

    old, new = adapter(1), adapter(2)
    want_old, want_new = alone(old), alone(new)
    assert not np.allclose(want_old.logprobs, want_new.logprobs, atol=1e-3)
    slots_before = len(runner._slots)

    ls = LocalSampler(runner, tok, tmp_path / "live")
    ls.put_snapshot("inflight:run", old)
    running: list = []
    ls.start_sample("inflight:run", spec, None, running.append)  # prefilled, decoding
    ls.step()
    ls.put_snapshot("inflight:run", new)  # an inflight save lands mid-request
    assert len(ls._samplers) == 1 and len(runner._slots) == slots_before + 2  # old one pinned
    while not running:
        ls.step()
    got = running[0].sequences[0]
    np.testing.assert_array_equal(got.tokens, want_old.tokens)
    np.testing.assert_allclose(got.logprobs, want_old.logprobs, atol=1e-5)
    assert len(runner._slots) == slots_before + 1  # the old slot went with its last request
    later: list = []
    ls.start_sample("inflight:run", spec, None, later.append)
    while not later:
        ls.step()
    np.testing.assert_allclose(later[0].sequences[0].logprobs, want_new.logprobs, atol=1e-5)
