"""Checkpoints through the SDK: save/load, resume with optimizer state, samplers from
saved weights, the REST listing calls, deletion, and a server restart on the same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, logprobs_of, text_datum
from tinker import types

import tinsmith

ADAM = types.AdamParams(learning_rate=5e-3)


def _train(tc, batch, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(ADAM)
        losses.append(fb.result().metrics["loss:sum"])
    return losses


def test_save_load_gives_identical_logprobs(service_client, tokenizer) -> None:
    batch = [text_datum(tokenizer, s) for s in SENTENCES]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=2).result()
    _train(tc, batch, 2)
    path = tc.save_state("two").result().path
    assert path == f"tinker://{tc.model_id}/weights/two"
    expected = logprobs_of(tc.forward(batch, "cross_entropy").result())
    loaded = service_client.create_training_client_from_state(path).result()
    assert loaded.model_id != tc.model_id and loaded.get_info().lora_rank == 4
    for x, y in zip(expected, logprobs_of(loaded.forward(batch, "cross_entropy").result())):
        np.testing.assert_array_equal(x, y)
    # The deprecated load_state loads into an existing client, in order.
    other = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=9).result()
    with pytest.warns(Warning):
        other.load_state(path).result()
    for x, y in zip(expected, logprobs_of(other.forward(batch, "cross_entropy").result())):
        np.testing.assert_array_equal(x, y)


def test_resume_with_optimizer_continues_exactly(service_client, tokenizer) -> None:
    batch = [text_datum(tokenizer, s) for s in SENTENCES]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=5).result()
    _train(tc, batch, 2)
    path = tc.save_state("mid").result().path
    uninterrupted = _train(tc, batch, 2)
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    assert _train(resumed, batch, 2) == pytest.approx(uninterrupted, rel=1e-6)
    fresh_opt = service_client.create_training_client_from_state(path).result()
    assert _train(fresh_opt, batch, 2)[1] != pytest.approx(uninterrupted[1], rel=1e-6)


def test_samplers_reproduce_training_weights(service_client, tokenizer) -> None:
    batch = [text_datum(tokenizer, s) for s in SENTENCES]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=4).result()
    _train(tc, batch, 3)
    expected = logprobs_of(tc.forward(batch, "cross_entropy").result())
    sampler_path = tc.save_weights_for_sampler("s3").result().path
    assert sampler_path.endswith("/sampler_weights/s3")
    state_path = tc.save_state("s3").result().path
    samplers = [
        service_client.create_sampling_client(model_path=sampler_path).result(),
        service_client.create_sampling_client(model_path=state_path).result(),
        tc.save_weights_and_get_sampling_client().result(),
    ]
    base = service_client.create_sampling_client(base_model=TINY).result()
    for s in samplers:
        assert s.get_base_model() == TINY
        for d, lp in zip(batch, expected):
            ids = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].tolist()[-1]]
            got = s.compute_logprobs(types.ModelInput.from_ints(ids)).result()
            assert got[0] is None
            np.testing.assert_allclose(np.array(got[1:], dtype=np.float32), lp, atol=1e-4)
    base_lp = base.compute_logprobs(types.ModelInput.from_ints(batch[0].model_input.to_ints())).result()
    assert not np.allclose(np.array(base_lp[1:], dtype=np.float32), expected[0][:-1], atol=1e-3)
    # Training further does not change an existing snapshot sampler.
    snap = samplers[2]
    probe = types.ModelInput.from_ints(batch[0].model_input.to_ints())
    before = snap.compute_logprobs(probe).result()
    _train(tc, batch, 1)
    assert snap.compute_logprobs(probe).result() == before


def test_rest_calls_find_work_again(service_client, rest_client, tokenizer) -> None:
    tc = service_client.create_lora_training_client(
        base_model=TINY, rank=2, user_metadata={"experiment": "rest", "renderer_name": "role_colon"}
    ).result()
    p1 = tc.save_state("a", ttl_seconds=7200).result().path
    p2 = tc.save_weights_for_sampler("b").result().path
    caps = rest_client.get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [TINY]
    run = rest_client.get_training_run(tc.model_id).result()
    assert run.user_metadata == {"experiment": "rest", "renderer_name": "role_colon"}
    assert run.base_model == TINY and run.lora_rank == 2 and run.is_lora
    assert run.last_checkpoint.tinker_path == p1 and run.last_sampler_checkpoint.tinker_path == p2
    assert rest_client.get_training_run_by_tinker_path(p1).result().training_run_id == tc.model_id
    runs = rest_client.list_training_runs(limit=500).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    assert runs.cursor.total_count >= len(runs.training_runs)
    ckpts = rest_client.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.checkpoint_id for c in ckpts} == {"weights/a", "sampler_weights/b"}
    a = next(c for c in ckpts if c.checkpoint_id == "weights/a")
    assert a.checkpoint_type == "training" and a.size_bytes > 0 and a.expires_at is not None
    mine = rest_client.list_user_checkpoints(limit=1000).result().checkpoints
    assert {p1, p2} <= {c.tinker_path for c in mine}
    info = rest_client.get_weights_info_by_tinker_path(p2).result()
    assert info.base_model == TINY and info.lora_rank == 2
    sampler = service_client.create_sampling_client(model_path=p2).result()
    got = rest_client.get_sampler(sampler._sampling_session_id).result()
    assert got.base_model == TINY and got.model_path == p2
    rest_client.delete_checkpoint_from_tinker_path(p1).result()
    assert [c.checkpoint_id for c in rest_client.list_checkpoints(tc.model_id).result().checkpoints] == [
        "sampler_weights/b"
    ]
    with pytest.raises(Exception, match="does not exist"):
        service_client.create_training_client_from_state(p1).result()


def test_restart_keeps_runs_and_checkpoints(tmp_path: Path, tokenizer) -> None:
    batch = [text_datum(tokenizer, s) for s in SENTENCES[:2]]
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=8,
                                            user_metadata={"k": "v"}).result()
        _train(tc, batch, 2)
        state = tc.save_state("final").result().path
        sampler = tc.save_weights_for_sampler("final").result().path
        expected = logprobs_of(tc.forward(batch, "cross_entropy").result())
        run_id = tc.model_id
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        rc = tinker.RestClient(base_url=url, api_key=API_KEY)
        run = rc.get_training_run(run_id).result()
        assert run.user_metadata == {"k": "v"}
        assert {c.tinker_path for c in rc.list_checkpoints(run_id).result().checkpoints} == {state, sampler}
        resumed = sc.create_training_client_from_state_with_optimizer(state).result()
        for x, y in zip(expected, logprobs_of(resumed.forward(batch, "cross_entropy").result())):
            np.testing.assert_array_equal(x, y)
        s = sc.create_sampling_client(model_path=sampler).result()
        got = s.compute_logprobs(types.ModelInput.from_ints(
            batch[0].model_input.to_ints() + [batch[0].loss_fn_inputs["target_tokens"].tolist()[-1]])).result()
        np.testing.assert_allclose(np.array(got[1:], dtype=np.float32), expected[0], atol=1e-4)
