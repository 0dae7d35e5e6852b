"""Bad input gets a clear 4xx error the SDK surfaces, and disturbs nothing else: the same
training client keeps working afterwards (its seq_ids still flow), other runs too, and
stored checkpoints stay loadable."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import API_KEY, SENTENCES, TINY, logprobs_of, text_datum
from tinker import types

ADAM = types.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def victim(service_client, tokenizer):
    """A run that trains and checkpoints before, between and after every bad request."""
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    batch = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
    tc.forward_backward(batch, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    path = tc.save_state("before-bad-input").result().path
    return tc, batch, path


def _datum(tokens: list[int], targets: list[int], weights: list[float]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": targets, "weights": weights})


def _still_healthy(service_client, victim) -> None:
    tc, batch, path = victim
    out = tc.forward_backward(batch, "cross_entropy").result()
    assert np.isfinite(out.metrics["loss:sum"])
    tc.optim_step(ADAM).result()
    loaded = service_client.create_training_client_from_state(path).result()
    assert len(logprobs_of(loaded.forward(batch, "cross_entropy").result())) == len(batch)


BAD_DATA = {
    "token outside the vocabulary": (
        _datum([1, 2, 10**6], [2, 3, 4], [1.0, 1.0, 1.0]), "outside the vocabulary"),
    "target outside the vocabulary": (
        _datum([1, 2, 3], [2, 3, 49152], [1.0, 1.0, 1.0]), "outside the vocabulary"),
    "weights and targets of different lengths": (
        _datum([1, 2, 3], [2, 3, 4], [1.0, 1.0]), "weights has shape [2] but target_tokens has shape [3]"),
    "targets and input of different lengths": (
        _datum([1, 2, 3], [2, 3], [1.0, 1.0]), "target_tokens has 2 entries but the model input has 3"),
    "sequence longer than the context": (
        _datum([5] * 2049, [5] * 2049, [1.0] * 2049), "exceeds the model's context length of 2048"),
    "non-finite weight": (
        _datum([1, 2, 3], [2, 3, 4], [1.0, float("nan"), 1.0]), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_training_data(case: str, service_client, victim) -> None:
    datum, message = BAD_DATA[case]
    tc = victim[0]
    with pytest.raises(Exception) as err:
        tc.forward_backward([datum], "cross_entropy").result()
    assert message in str(err.value)
    assert "400" in str(err.value)
    _still_healthy(service_client, victim)


def test_unknown_loss_function(service_client, victim, tokenizer) -> None:
    with pytest.raises(Exception, match="unknown loss function 'no_such_loss'"):
        victim[0].forward_backward([text_datum(tokenizer, "hi there")], "no_such_loss").result()
    with pytest.raises(Exception, match="unknown loss_fn_config key"):
        victim[0].forward_backward([text_datum(tokenizer, "hi there")], "cross_entropy",
                                   {"beta": 0.1}).result()
    _still_healthy(service_client, victim)


def test_unknown_base_model(service_client, victim) -> None:
    with pytest.raises(Exception, match="unknown base model 'nobody/no-model'"):
        service_client.create_lora_training_client(base_model="nobody/no-model").result()
    with pytest.raises(Exception, match="unknown base model"):
        service_client.create_sampling_client(base_model="nobody/no-model").result()
    _still_healthy(service_client, victim)


@pytest.mark.parametrize(
    "path,message",
    [
        ("tinker://only-two/weights", "invalid checkpoint path"),
        ("tinker://run/bogus_kind/name", "is not one of"),
        ("tinker://run/weights/../../etc", "invalid checkpoint path"),
        ("tinker://run/weights/..", "invalid checkpoint name"),
        ("tinker://nobody:train:0/weights/final", "does not exist"),
    ],
)
def test_bad_checkpoint_paths(path: str, message: str, service_client, rest_client, victim) -> None:
    with pytest.raises(Exception, match=message):
        service_client.create_training_client_from_state(path).result()
    with pytest.raises(Exception, match=message):
        rest_client.get_weights_info_by_tinker_path(path).result()
    _still_healthy(service_client, victim)


def test_missing_path_and_unknown_model_id(base_url, rest_client, service_client, victim) -> None:
    with pytest.raises(Exception, match="unknown training run"):
        rest_client.get_training_run("nobody:train:0").result()
    # The wire-level answers: a 4xx with a JSON body that names the problem.
    with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}) as http:
        r = http.post("/api/v1/optim_step", json={"model_id": "nobody:train:0", "seq_id": 1,
                                                  "adam_params": {"learning_rate": 0.1}})
        assert r.status_code == 404 and "unknown training run" in r.json()["detail"]
        r = http.post("/api/v1/load_weights", json={"session_id": "x", "model_seq_id": 0,
                                                    "optimizer": False, "path": ""})
        assert r.status_code == 400 and "path is required" in r.json()["detail"]
        r = http.post("/api/v1/forward_backward", content=b"\xff\xff not protobuf",
                      headers={"content-type": "application/x-protobuf"})
        assert r.status_code == 400 and "malformed protobuf" in r.json()["detail"]
        r = http.post("/api/v1/retrieve_future", json={"request_id": "req-nope"})
        assert r.status_code == 404 and "unknown or expired request_id" in r.json()["detail"]
    _still_healthy(service_client, victim)


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        ([1, 2, 10**6], {"max_tokens": 4}, "outside the vocabulary"),
        ([5] * 2000, {"max_tokens": 100}, "exceeds the model's context length of 2048"),
        ([1, 2, 3], {"max_tokens": 4, "top_p": 0.0}, "top_p must be in (0, 1]"),
        ([1, 2, 3], {"max_tokens": 4, "temperature": -1.0}, "temperature must be"),
        ([1, 2, 3], {"max_tokens": 4, "stop": [""]}, "empty string"),
    ],
)
def test_bad_sampling_requests(prompt, params, message, service_client, victim) -> None:
    sampler = service_client.create_sampling_client(base_model=TINY).result()
    with pytest.raises(Exception) as err:
        sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(**params)).result()
    assert message in str(err.value) and "400" in str(err.value)
    _still_healthy(service_client, victim)


def _rl(tokens: list[int], **inputs: list[float]) -> types.Datum:
    arrays = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": np.asarray(tokens[1:] + [7]), **arrays})


BAD_LOSS_CALLS = {
    "loss without an input it needs": (
        [_rl([1, 2, 3], logprobs=[0, -1, -1])], "ppo", None, "needs loss_fn_inputs['advantages']"),
    "advantages shaped unlike the targets": (
        [_rl([1, 2, 3], logprobs=[0, -1, -1], advantages=[1, 1])], "importance_sampling", None,
        "advantages has shape [2] but target_tokens has shape [3]"),
    "non-finite sampler logprob": (
        [_rl([1, 2, 3], logprobs=[0, float("-inf"), -1], advantages=[0, 1, 1])], "cispo", None,
        "logprobs contains a non-finite value"),
    "unknown config key": (
        [_rl([1, 2, 3], logprobs=[0, -1, -1], advantages=[0, 1, 1])], "ppo", {"clip_ratio": 0.2},
        ("unknown loss_fn_config key(s) ['clip_ratio'] for loss 'ppo' (accepted: clip_high_threshold, "
         "clip_low_threshold)")),
    "clip bounds the wrong way round": (
        [_rl([1, 2, 3], logprobs=[0, -1, -1], advantages=[0, 1, 1])], "ppo",
        {"clip_low_threshold": 1.3, "clip_high_threshold": 0.7}, "clip_low_threshold <= clip_high_threshold"),
    "dpo with an odd number of datums": (
        [_rl([1, 2, 3], weights=[0, 1, 1], ref_logprobs=[0, -1, -1])], "dpo", None,
        "odd number of datums (1)"),
    "dpo without reference logprobs": (
        [_rl([1, 2, 3], weights=[0, 1, 1])] * 2, "dpo", None, "needs loss_fn_inputs['ref_logprobs']"),
    "dpo label smoothing out of range": (
        [_rl([1, 2, 3], weights=[0, 1, 1], ref_logprobs=[0, -1, -1])] * 2, "dpo",
        {"label_smoothing": 0.7}, "label_smoothing must be in [0, 0.5)"),
    "importance ratio that overflows": (
        [_rl([1, 2, 3], logprobs=[0, -500, -1], advantages=[0, 1, 1])], "importance_sampling", None,
        "is not finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOSS_CALLS))
def test_bad_loss_calls(case: str, service_client, victim) -> None:
    data, loss, config, message = BAD_LOSS_CALLS[case]
    with pytest.raises(Exception) as err:
        victim[0].forward_backward(data, loss, config).result()
    assert message in str(err.value)
    _still_healthy(service_client, victim)
