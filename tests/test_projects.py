"""Projects and copies (copy_weights), through the official SDK on a real keyed server.

A run's project is its own, else its session's; assigning a session moves its runs. A copy
is a new, untrainable run in the destination project whose checkpoint shares its source's
files: no bytes are written, and deleting (or expiring) either one leaves the other whole.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import TINY, KeyedServer
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

import tinsmith
from tinsmith.embedded import create_api_key
from tinsmith.storage.db import MetadataStore

TOKENS = [3, 9, 4, 11, 7, 2, 8]
DATUM = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 6})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """Keys a, b and admin; expired checkpoints are swept every 0.2 s."""
    d = tmp_path_factory.mktemp("tinsmith-projects")
    keys = {"a": create_api_key(d, name="alice"), "b": create_api_key(d, name="bob"),
            "admin": create_api_key(d, name="ops", admin=True)}
    with tinsmith.local(models=[TINY], data_dir=d, checkpoint_sweep_s=0.2) as url:
        yield KeyedServer(url, d, keys)


def _project() -> str:
    return f"proj-{uuid.uuid4().hex[:8]}"


def _files(server: KeyedServer) -> set[Path]:
    """Every checkpoint file stored."""
    return {p for p in (server.data_dir / "checkpoints").rglob("*") if p.is_file()}


def _logprobs(tc: tinker.TrainingClient) -> np.ndarray:
    out = tc.forward([DATUM], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy())


def _trained(sc: tinker.ServiceClient) -> tinker.TrainingClient:
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    tc.forward_backward([DATUM], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return tc


def _runs(rest: tinker.RestClient, project: str) -> set[str]:
    got = rest.list_training_runs(limit=100, project_id=project).result()
    assert got.cursor.total_count == len(got.training_runs)
    return {r.training_run_id for r in got.training_runs}


def test_runs_follow_their_session_into_a_project(server: KeyedServer) -> None:
    p, q = _project(), _project()
    a = tinker.RestClient(base_url=server.url, api_key=server.key("a"))
    in_p = tinker.ServiceClient(base_url=server.url, api_key=server.key("a"), project_id=p)
    run_p = in_p.create_lora_training_client(base_model=TINY, rank=2).model_id
    loose = tinker.ServiceClient(base_url=server.url, api_key=server.key("a"))
    run_loose = loose.create_lora_training_client(base_model=TINY, rank=2).model_id
    assert _runs(a, p) == {run_p} and _runs(a, q) == set()
    everything = a.list_training_runs(limit=100).result().training_runs
    assert {run_p, run_loose} <= {r.training_run_id for r in everything}

    a.assign_session_project(run_loose.split(":train:")[0], p).result()
    assert _runs(a, p) == {run_p, run_loose}
    a.assign_session_project(run_p.split(":train:")[0], q).result()
    assert _runs(a, p) == {run_loose} and _runs(a, q) == {run_p}

    # Only the session's owner (or an admin) moves it; a project is required.
    b = tinker.RestClient(base_url=server.url, api_key=server.key("b"))
    with pytest.raises(tinker.NotFoundError, match="unknown session"):
        b.assign_session_project(run_loose.split(":train:")[0], q).result()
    assert _runs(b, p) == set()  # B lists none of A's runs, in any project
    with pytest.raises(tinker.BadRequestError, match="project_id is required"):
        a.assign_session_project(run_loose.split(":train:")[0], "").result()
    admin = tinker.RestClient(base_url=server.url, api_key=server.key("admin"))
    admin.assign_session_project(run_loose.split(":train:")[0], q).result()
    assert _runs(a, q) == {run_p, run_loose}


def test_copy_shares_files_and_cannot_be_trained(server: KeyedServer) -> None:
    sc = tinker.ServiceClient(base_url=server.url, api_key=server.key("a"))
    rest = tinker.RestClient(base_url=server.url, api_key=server.key("a"))
    tc = _trained(sc)
    source = tc.save_state("to-copy").result().path
    expected = _logprobs(tc)
    before = _files(server)

    archive = _project()
    copy = rest.copy_weights(source, archive).result()
    assert copy != source and copy.endswith("/weights/to-copy")
    assert _files(server) == before  # no bytes written
    copy_run = types.ParsedCheckpointTinkerPath.from_tinker_path(copy).training_run_id
    assert _runs(rest, archive) == {copy_run}
    [listed] = rest.list_checkpoints(copy_run).result().checkpoints
    assert (listed.checkpoint_type, listed.tinker_path, listed.public) == ("training", copy, False)
    # ServiceClient.copy_weights copies into its own project; a sampler checkpoint stays one.
    sampler = tc.save_weights_for_sampler("to-copy-s").result().path
    other = _project()
    copied_sampler = tinker.ServiceClient(base_url=server.url, api_key=server.key("a"),
                                          project_id=other).copy_weights(sampler).result()
    assert "/sampler_weights/to-copy-s" in copied_sampler
    assert _runs(rest, other) == {copied_sampler.split("/")[2]}

    # The copied run cannot be trained: a clear 400.
    msg = pb.ForwardBackwardRequest(model_id=copy_run, seq_id=1, loss_fn="cross_entropy")
    got = httpx.post(f"{server.url}/api/v1/forward_backward", content=msg.SerializeToString(),
                     headers={**server.headers("a"), "content-type": "application/x-protobuf"})
    assert got.status_code == 400 and "cannot be trained" in got.json()["detail"], got.text
    # Its checkpoint loads into a new run, with the source's weights.
    np.testing.assert_allclose(_logprobs(sc.create_training_client_from_state(copy)), expected,
                               rtol=1e-5, atol=1e-6)

    # Overwriting the source leaves the copy's weights alone.
    tc.forward_backward([DATUM], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    tc.save_state("to-copy", overwrite=True).result()
    np.testing.assert_allclose(_logprobs(sc.create_training_client_from_state(copy)), expected,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(_logprobs(sc.create_training_client_from_state(source)), expected)

    # Deleting the source keeps the copy whole; deleting the copy then frees its files.
    copy2 = rest.copy_weights(source, archive).result()
    shared = _files(server)
    rest.delete_checkpoint_from_tinker_path(source).result()
    assert _files(server) == shared
    sc.create_training_client_from_state(copy2).result()
    rest.delete_checkpoint_from_tinker_path(copy2).result()
    assert len(_files(server)) < len(shared)
    with pytest.raises(Exception, match="does not exist"):
        sc.create_training_client_from_state(copy2).result()


def test_expiry_of_a_copy_or_its_source_keeps_the_other(server: KeyedServer) -> None:
    sc = tinker.ServiceClient(base_url=server.url, api_key=server.key("a"))
    rest = tinker.RestClient(base_url=server.url, api_key=server.key("a"))
    source = _trained(sc).save_state("expiring").result().path
    project = _project()
    short = rest.copy_weights(source, project, ttl_seconds=1).result()
    kept = rest.copy_weights(source, project).result()
    stored = _files(server)
    deadline = time.monotonic() + 10
    while short.split("/")[2] in _runs(rest, project) and rest.list_checkpoints(
            short.split("/")[2]).result().checkpoints:
        assert time.monotonic() < deadline, "the copy did not expire"
        time.sleep(0.2)
    assert _files(server) == stored
    rest.set_checkpoint_ttl_from_tinker_path(source, 1).result()
    deadline = time.monotonic() + 10
    while source in {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}:
        assert time.monotonic() < deadline, "the source did not expire"
        time.sleep(0.2)
    assert _files(server) == stored
    sc.create_training_client_from_state(kept).result()


def test_copy_access_and_retries(server: KeyedServer) -> None:
    a = tinker.RestClient(base_url=server.url, api_key=server.key("a"))
    b = tinker.RestClient(base_url=server.url, api_key=server.key("b"))
    source = _trained(tinker.ServiceClient(base_url=server.url, api_key=server.key("a"))) \
        .save_state("for-b").result().path
    project = _project()
    with pytest.raises(tinker.NotFoundError, match="does not exist"):
        b.copy_weights(source, project).result()
    a.publish_checkpoint_from_tinker_path(source).result()
    mine = b.copy_weights(source, project).result()
    a.unpublish_checkpoint_from_tinker_path(source).result()
    # B's copy is B's: it stays loadable, and A does not see it.
    tinker.ServiceClient(base_url=server.url, api_key=server.key("b")) \
        .create_training_client_from_state(mine).result()
    with pytest.raises(tinker.NotFoundError):
        a.get_weights_info_by_tinker_path(mine).result()
    # A retry (same X-Idempotency-Key) gets the first copy back; bad requests get a 400.
    headers = {**server.headers("a"), "X-Idempotency-Key": uuid.uuid4().hex}
    body = {"source_path": source, "destination_project_id": project}
    first, again = (httpx.post(f"{server.url}/api/v1/copy_weights", json=body, headers=headers)
                    for _ in range(2))
    assert first.status_code == 200 and first.json() == again.json(), (first.text, again.text)
    for bad, why in (({"source_path": source}, "destination_project_id"),
                     ({**body, "ttl_seconds": -5}, "ttl_seconds"),
                     ({**body, "source_path": "tinker://x"}, "invalid checkpoint path")):
        got = httpx.post(f"{server.url}/api/v1/copy_weights", json=bad, headers=server.headers("a"))
        assert got.status_code == 400 and why in got.json()["detail"], got.text
    assert "TINKER_PROJECT_ID" not in os.environ


# --- the queries underneath, on SQLite and PostgreSQL --------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MetadataStore]:
    url = (f"sqlite:///{tmp_path / 't.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    s = MetadataStore(url)
    yield s
    s.close()


def test_copy_references_project_and_search_queries(store: MetadataStore) -> None:
    lora = {"rank": 2}
    store.add_session("s1", tags=[], user_metadata={}, project_id="p", owner="k1")
    store.add_session("s2", tags=[], user_metadata={}, owner="k2")
    store.add_run("s1:train:0", session_id="s1", base_model="m", lora=lora, user_metadata={"r": "x"})
    key = "s1:train:0/weights/x"
    store.upsert_checkpoint("s1:train:0", "weights/x", checkpoint_type="training",
                            tinker_path="tinker://s1:train:0/weights/x", storage_key=key,
                            size_bytes=10, base_model="m", lora=lora, owner="k1")
    copy = store.add_copy("s1:train:0", "weights/x", training_run_id="s2:train:0",
                          session_id="s2", tinker_path="tinker://s2:train:0/weights/x",
                          project_id="q", expires_at=None, owner="k2")
    assert copy is not None and (copy.storage_key, copy.size_bytes, copy.owner) == (key, 10, "k2")
    run = store.get_run("s2:train:0")
    assert run is not None and (run.copied_from, run.user_metadata) == (
        "tinker://s1:train:0/weights/x", {"r": "x"})
    assert [r.training_run_id for r in store.list_runs(project_id="p")[0]] == ["s1:train:0"]
    assert store.project_of("s2:train:0") == "q" and store.project_of("s1:train:0") == "p"
    store.set_session_project("s1", "q")
    assert store.list_runs(project_id="q")[1] == 2 and store.list_runs(project_id="p")[1] == 0
    assert store.list_runs(project_id="q", owner="k2")[1] == 1

    assert not store.has_public_checkpoint("s1:train:0")
    store.set_checkpoint_public("s1:train:0", "weights/x", True)
    assert store.has_public_checkpoint("s1:train:0") and not store.has_public_checkpoint("s2:train:0")
    assert store.session_checkpoints(["s1", "s2", "s3"]) == {"s1": (1, 10), "s2": (1, 10)}

    assert [s.session_id for s in store.scan_sessions()] == ["s2", "s1"]
    assert [s.session_id for s in store.scan_sessions(owners=["k1"])] == ["s1"]
    assert [s.session_id for s in store.scan_sessions(project_ids=[None])] == ["s2"]
    first = store.scan_sessions(limit=1)[0]
    assert [s.session_id for s in store.scan_sessions(
        before=(first.created_at, first.session_id))] == ["s1"]

    assert store.storage_key_used(key, excluding=("s1:train:0", "weights/x"))
    assert store.release_checkpoint("s1:train:0", "weights/x") is None  # the copy holds it
    assert not store.storage_key_used(key, excluding=("s2:train:0", "weights/x"))
    assert store.release_checkpoint("s2:train:0", "weights/x") == key  # the last one
    assert store.release_checkpoint("s2:train:0", "weights/x") is None  # gone already
    assert store.add_copy("s1:train:0", "weights/x", training_run_id="s2:train:1",
                          session_id="s2", tinker_path="tinker://s2:train:1/weights/x",
                          project_id=None, expires_at=None, owner=None) is None
