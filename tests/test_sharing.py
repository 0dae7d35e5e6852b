"""Publishing checkpoints, through the official SDK and its CLI, on a real keyed server.

Key A trains a run and saves a training, a sampler and an external checkpoint. Unpublished,
they do not exist for key B (exactly as a missing checkpoint). Published, B reads, downloads
and loads them (the same weights: identical logprobs), but may not change them. Unpublished
again, they are gone for B. Only the owner (or an admin) publishes; the CLI does the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tinker
from conftest import TINY, KeyedServer
from tinker import types

TOKENS = [3, 9, 4, 11, 7, 2, 8]
DATUM = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 6})
PROMPT = types.ModelInput.from_ints([5, 6, 7, 8])
PARAMS = types.SamplingParams(max_tokens=3, temperature=0.0)


@dataclass
class Saved:
    run: str
    state: str
    sampler: str
    external: str
    logprobs: np.ndarray  # A's forward logprobs of DATUM with the saved weights


def _logprobs(tc: tinker.TrainingClient) -> np.ndarray:
    out = tc.forward([DATUM], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy())


def _rest(server: KeyedServer, who: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=server.key(who))


def _service(server: KeyedServer, who: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.url, api_key=server.key(who))


@pytest.fixture(scope="module")
def saved(keyed_server: KeyedServer) -> Saved:
    tc = _service(keyed_server, "a").create_lora_training_client(base_model=TINY, rank=2)
    tc.forward_backward([DATUM], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    state = tc.save_state("shared-state").result().path
    sampler = tc.save_weights_for_sampler("shared-sampler").result().path
    external = tc.save_weights_external("shared-ext").result().path
    return Saved(tc.model_id, state, sampler, external, _logprobs(tc))


def _public(rest: tinker.RestClient, run: str) -> dict[str, bool]:
    return {c.tinker_path: c.public for c in rest.list_checkpoints(run).result().checkpoints}


def test_published_checkpoints_are_readable_and_loadable_by_another_key(
        keyed_server: KeyedServer, saved: Saved) -> None:
    a, b = _rest(keyed_server, "a"), _rest(keyed_server, "b")
    everything = (saved.state, saved.sampler, saved.external)
    # Unpublished: B gets exactly what a missing checkpoint gets.
    fake = saved.state.replace(saved.run, "0123456789abcdef:train:0")
    with httpx.Client(base_url=keyed_server.url, headers=keyed_server.headers("b")) as h:
        got, missing = (h.post("/api/v1/weights_info", json={"tinker_path": p}) for p in (saved.state, fake))
        assert got.status_code == missing.status_code == 404
        assert got.json() == json.loads(missing.text.replace(fake, saved.state))
    with pytest.raises(tinker.NotFoundError):
        b.get_training_run_by_tinker_path(saved.state).result()

    for path in everything:
        a.publish_checkpoint_from_tinker_path(path).result()
    assert _public(a, saved.run) == dict.fromkeys(everything, True)
    assert {c.public for c in a.list_user_checkpoints().result().checkpoints
            if c.tinker_path in everything} == {True}

    # B reads them ...
    info = b.get_weights_info_by_tinker_path(saved.state).result()
    assert (info.base_model, info.lora_rank) == (TINY, 2)
    run = b.get_training_run_by_tinker_path(saved.sampler).result()
    assert run.training_run_id == saved.run and run.base_model == TINY
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == saved.state
    assert set(_public(b, saved.run)) == set(everything)
    # ... downloads one (no key on the signed URLs) ...
    urls = b.get_external_weights_urls(saved.external).result().urls
    assert "adapter_model.safetensors" in urls
    got = httpx.get(urls["adapter_model.safetensors"], timeout=60)
    assert got.status_code == 200 and len(got.content) > 100
    # ... loads the training checkpoint, as a new run and into a run of its own ...
    sc = _service(keyed_server, "b")
    loaded = sc.create_training_client_from_state(saved.state)
    np.testing.assert_allclose(_logprobs(loaded), saved.logprobs, rtol=1e-5, atol=1e-6)
    own = sc.create_lora_training_client(base_model=TINY, rank=2)
    own.load_state(saved.state).result()
    np.testing.assert_allclose(_logprobs(own), saved.logprobs, rtol=1e-5, atol=1e-6)
    # ... and samples the sampler checkpoint.
    sampled = sc.create_sampling_client(model_path=saved.sampler).sample(PROMPT, 1, PARAMS).result()
    assert len(sampled.sequences[0].tokens) == 3

    # B may not change them: 403, naming the owner rule.
    for change in (lambda: b.delete_checkpoint_from_tinker_path(saved.state).result(),
                   lambda: b.unpublish_checkpoint_from_tinker_path(saved.state).result(),
                   lambda: b.set_checkpoint_ttl_from_tinker_path(saved.state, 3600).result()):
        with pytest.raises(tinker.PermissionDeniedError, match="only its owner"):
            change()
    assert _public(a, saved.run) == dict.fromkeys(everything, True)

    # Unpublished again: gone for B, still A's.
    for path in everything:
        a.unpublish_checkpoint_from_tinker_path(path).result()
    assert _public(a, saved.run) == dict.fromkeys(everything, False)
    with pytest.raises(tinker.NotFoundError):
        b.get_weights_info_by_tinker_path(saved.state).result()
    with pytest.raises(tinker.NotFoundError):
        b.get_training_run_by_tinker_path(saved.state).result()
    with pytest.raises(tinker.NotFoundError):
        b.get_external_weights_urls(saved.external).result()
    with pytest.raises(tinker.NotFoundError):
        b.publish_checkpoint_from_tinker_path(saved.state).result()
    with pytest.raises(Exception, match="does not exist"):
        sc.create_training_client_from_state(saved.state).result()
    with pytest.raises(Exception, match="does not exist"):
        sc.create_sampling_client(model_path=saved.sampler).sample(PROMPT, 1, PARAMS).result()
    assert a.get_weights_info_by_tinker_path(saved.state).result().base_model == TINY


def test_only_the_owner_or_an_admin_publishes(keyed_server: KeyedServer, saved: Saved) -> None:
    a, admin = _rest(keyed_server, "a"), _rest(keyed_server, "admin")
    with pytest.raises(tinker.NotFoundError):
        _rest(keyed_server, "b").publish_checkpoint_from_tinker_path(saved.sampler).result()
    admin.publish_checkpoint_from_tinker_path(saved.sampler).result()
    assert _public(a, saved.run)[saved.sampler] is True
    admin.unpublish_checkpoint_from_tinker_path(saved.sampler).result()
    assert _public(a, saved.run)[saved.sampler] is False
    with pytest.raises(tinker.NotFoundError, match="does not exist"):
        a.publish_checkpoint_from_tinker_path(saved.sampler.replace("shared-sampler", "nope")).result()


def _cli(server: KeyedServer, who: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": server.key(who)}
    return subprocess.run([sys.executable, "-m", "tinker.cli", "checkpoint", *args],
                          check=False, env=env, capture_output=True, text=True, timeout=120)


def test_cli_publish_and_unpublish(keyed_server: KeyedServer, saved: Saved) -> None:
    a = _rest(keyed_server, "a")
    done = _cli(keyed_server, "a", "publish", saved.state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _public(a, saved.run)[saved.state] is True
    refused = _cli(keyed_server, "b", "unpublish", saved.state)
    assert refused.returncode != 0 and _public(a, saved.run)[saved.state] is True
    done = _cli(keyed_server, "a", "unpublish", saved.state)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _public(a, saved.run)[saved.state] is False
