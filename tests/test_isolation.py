"""Isolation between API keys, through the official SDK and raw HTTP, on a real server.

Key A makes a session, a training run, a training checkpoint (save_state), a sampler
checkpoint (save_weights_for_sampler), a sampling session, an ephemeral sampler and a
request. Key B then tries every read, write and sample endpoint on them. Each attempt must
get exactly the answer B gets for an object that does not exist: the test sends the same
request naming a random id of the same form, and compares status and body (with the random
id put back). Afterwards A's objects still work, and an admin key sees them all.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import tinker
from conftest import TINY, KeyedServer
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

PROMPT = types.ModelInput.from_ints([5, 6, 7, 8])
PARAMS = types.SamplingParams(max_tokens=3, temperature=0.0)


@dataclass
class Owned:
    """What key A made."""

    session: str
    run: str
    state_path: str
    sampler_path: str
    sampler: str  # a sampling session on sampler_path
    ephemeral: str  # save_weights_and_get_sampling_client's sampler
    request_id: str  # one of A's requests (a sample)
    loss: float


def _fake_session() -> str:
    return uuid.uuid4().hex[:16]


def _fake_run() -> str:
    return f"{_fake_session()}:train:0"


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


DATUM = _datum([3, 9, 4, 11, 7, 2, 8])


def _http(server: KeyedServer, who: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.headers(who), timeout=60)


def _sample_body(sampler_id: str | None, model_path: str | None = None) -> dict[str, object]:
    return types.SampleRequest(prompt=PROMPT, sampling_params=PARAMS, num_samples=1,
                               sampling_session_id=sampler_id, model_path=model_path,
                               seq_id=1).model_dump(mode="json", exclude_none=True)


@pytest.fixture(scope="module")
def owned(keyed_server: KeyedServer) -> Owned:
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    loss = tc.forward_backward([DATUM], "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state_path = tc.save_state("a-state").result().path
    sampler_path = tc.save_weights_for_sampler("a-sampler").result().path
    ephemeral = tc.save_weights_and_get_sampling_client().result()
    run = tc.model_id
    session = run.split(":train:")[0]
    with _http(keyed_server, "a") as a:
        made = a.post("/api/v1/create_sampling_session", json={
            "session_id": session, "sampling_session_seq_id": 7, "model_path": sampler_path})
        assert made.status_code == 200, made.text
        sampler = made.json()["sampling_session_id"]
        sampled = a.post("/api/v1/asample", json=_sample_body(sampler))
        assert sampled.status_code == 200, sampled.text
    return Owned(session, run, state_path, sampler_path, sampler,
                 ephemeral._sampling_session_id, sampled.json()["request_id"], loss)


def _same_as_missing(send: Callable[[str], httpx.Response], real: str, fake: str,
                     status: int = 404) -> None:
    """`send(id)` naming A's object answers exactly as naming a nonexistent one."""
    got, missing = send(real), send(fake)
    assert missing.status_code == status, missing.text
    assert got.status_code == missing.status_code, (got.status_code, got.text, missing.text)
    assert got.json() == json.loads(missing.text.replace(fake, real)), (got.text, missing.text)


def test_other_key_cannot_touch_training_objects(keyed_server: KeyedServer, owned: Owned) -> None:
    fake_run = _fake_run()
    with _http(keyed_server, "b") as b:
        _same_as_missing(lambda r: b.post("/api/v1/get_info", json={"model_id": r}), owned.run, fake_run)

        def fwd(r: str) -> httpx.Response:
            msg = pb.ForwardBackwardRequest(model_id=r, seq_id=1, loss_fn="cross_entropy")
            return b.post("/api/v1/forward_backward", content=msg.SerializeToString(),
                          headers={"content-type": "application/x-protobuf"})
        _same_as_missing(fwd, owned.run, fake_run)
        _same_as_missing(lambda r: b.post("/api/v1/optim_step", json={
            "model_id": r, "seq_id": 1, "adam_params": {"learning_rate": 1.0}}), owned.run, fake_run)
        _same_as_missing(lambda r: b.post("/api/v1/save_weights", json={
            "model_id": r, "seq_id": 1, "path": "stolen"}), owned.run, fake_run)
        _same_as_missing(lambda r: b.post("/api/v1/save_weights_for_sampler", json={
            "model_id": r, "seq_id": 1, "path": "stolen"}), owned.run, fake_run)
        _same_as_missing(lambda r: b.post("/api/v1/save_weights_for_sampler", json={
            "model_id": r, "seq_id": 1, "sampling_session_seq_id": 99}), owned.run, fake_run)

        # B's own session: loading A's checkpoints into it, as a new run or by path.
        b_session = b.post("/api/v1/create_session", json={
            "tags": [], "user_metadata": {}, "sdk_version": "test"}).json()["session_id"]
        for path in (owned.state_path, owned.sampler_path):
            fake_path = path.replace(owned.run, fake_run)
            _same_as_missing(lambda p: b.post("/api/v1/load_weights", json={
                "session_id": b_session, "model_seq_id": 0, "path": p, "optimizer": False}),
                path, fake_path)
            _same_as_missing(lambda p: b.post("/api/v1/weights_info", json={"tinker_path": p}),
                             path, fake_path)
        # The legacy load_state into A's run, with A's path.
        _same_as_missing(lambda r: b.post("/api/v1/load_weights", json={
            "model_id": r, "seq_id": 1, "path": f"tinker://{r}/weights/a-state", "optimizer": True}),
            owned.run, fake_run)
        # New runs and samplers inside A's session.
        fake_session = _fake_session()
        _same_as_missing(lambda s: b.post("/api/v1/create_model", json={
            "session_id": s, "model_seq_id": 5, "base_model": TINY}), owned.session, fake_session)
        _same_as_missing(lambda s: b.post("/api/v1/create_sampling_session", json={
            "session_id": s, "sampling_session_seq_id": 5, "base_model": TINY}),
            owned.session, fake_session)


def test_other_key_cannot_sample_or_read_futures(keyed_server: KeyedServer, owned: Owned) -> None:
    fake_sampler = f"{_fake_session()}:sample:7"
    fake_path = owned.sampler_path.replace(owned.run, _fake_run())
    with _http(keyed_server, "b") as b:
        b_session = b.post("/api/v1/create_session", json={
            "tags": [], "user_metadata": {}, "sdk_version": "test"}).json()["session_id"]
        _same_as_missing(lambda p: b.post("/api/v1/create_sampling_session", json={
            "session_id": b_session, "sampling_session_seq_id": 1, "model_path": p}),
            owned.sampler_path, fake_path)
        for sampler in (owned.sampler, owned.ephemeral):
            _same_as_missing(lambda s: b.get(f"/api/v1/samplers/{s}"), sampler, fake_sampler)
            _same_as_missing(lambda s: b.post("/api/v1/asample", json=_sample_body(s)),
                             sampler, fake_sampler)
        # Per-request sampling by path (older clients).
        _same_as_missing(lambda p: b.post("/api/v1/asample", json=_sample_body(None, p)),
                         owned.sampler_path, fake_path)
        fake_rid = owned.request_id.rsplit("-", 1)[0] + "-99999999"
        _same_as_missing(lambda r: b.post("/api/v1/retrieve_future", json={"request_id": r}),
                         owned.request_id, fake_rid)
        # B's own request id is B's: A cannot read it either.
        mine = b.post("/api/v1/asample", json=_sample_body(None, None) | {"base_model": TINY})
        assert mine.status_code == 200, mine.text
        b_rid = mine.json()["request_id"]
        assert b.post("/api/v1/retrieve_future", json={"request_id": b_rid}).status_code == 200
    with _http(keyed_server, "a") as a:
        assert a.post("/api/v1/retrieve_future", json={"request_id": b_rid}).status_code == 404


def test_other_key_sees_nothing_over_rest(keyed_server: KeyedServer, owned: Owned) -> None:
    fake_run, fake_session = _fake_run(), _fake_session()
    with _http(keyed_server, "b") as b:
        _same_as_missing(lambda r: b.get(f"/api/v1/training_runs/{r}"), owned.run, fake_run)
        _same_as_missing(lambda r: b.get(f"/api/v1/training_runs/{r}/checkpoints"), owned.run, fake_run)
        for cid in ("weights/a-state", "sampler_weights/a-sampler"):
            _same_as_missing(lambda r, c=cid: b.delete(f"/api/v1/training_runs/{r}/checkpoints/{c}"),
                             owned.run, fake_run)
        _same_as_missing(lambda s: b.get(f"/api/v1/sessions/{s}"), owned.session, fake_session)
        # Heartbeats and finishing: the no-op answer an unknown session gets.
        _same_as_missing(lambda s: b.post("/api/v1/session_heartbeat", json={"session_id": s}),
                         owned.session, fake_session, status=200)
        _same_as_missing(lambda s: b.post(f"/api/v1/sessions/{s}/finish", json={}),
                         owned.session, fake_session, status=200)
        listed = json.dumps([b.get(p).json() for p in
                             ("/api/v1/training_runs", "/api/v1/checkpoints", "/api/v1/sessions")])
        assert owned.run not in listed and owned.session not in listed

    # The same, through the SDK's RestClient and ServiceClient.
    rest = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("b"))
    with pytest.raises(tinker.NotFoundError):
        rest.list_checkpoints(owned.run).result()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(owned.state_path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run(owned.run).result()
    mine = rest.list_user_checkpoints().result().checkpoints
    assert all(owned.run not in c.tinker_path for c in mine)
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("b"))
    with pytest.raises(Exception, match="does not exist"):
        sc.create_training_client_from_state(owned.state_path).result()
    with pytest.raises(Exception, match="does not exist"):
        sc.create_sampling_client(model_path=owned.sampler_path).sample(PROMPT, 1, PARAMS).result()


def test_owner_still_uses_everything_afterwards(keyed_server: KeyedServer, owned: Owned) -> None:
    # Run after B's attempts (file order): nothing of A's was changed or removed.
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    rest = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    paths = {c.tinker_path for c in rest.list_checkpoints(owned.run).result().checkpoints}
    assert paths == {owned.state_path, owned.sampler_path}
    assert rest.get_session(owned.session).result().training_run_ids == [owned.run]
    with _http(keyed_server, "a") as a:
        assert a.post("/api/v1/get_info", json={"model_id": owned.run}).status_code == 200
        assert a.post("/api/v1/retrieve_future", json={"request_id": owned.request_id}).status_code == 200
        for s in (owned.sampler, owned.ephemeral):
            assert a.post("/api/v1/asample", json=_sample_body(s) | {"seq_id": 2}).status_code == 200
    # The run kept training where it was: one optim_step of A's (none of B's) lowered the loss.
    tc = sc.create_training_client_from_state_with_optimizer(owned.state_path)
    loss = tc.forward_backward([DATUM], "cross_entropy").result().metrics["loss:sum"]
    assert loss < owned.loss
    out = sc.create_sampling_client(model_path=owned.sampler_path).sample(PROMPT, 1, PARAMS).result()
    assert len(out.sequences[0].tokens) == 3


def test_admin_sees_everything(keyed_server: KeyedServer, owned: Owned) -> None:
    with _http(keyed_server, "admin") as adm:
        assert adm.post("/api/v1/get_info", json={"model_id": owned.run}).status_code == 200
        assert adm.get(f"/api/v1/training_runs/{owned.run}").json()["model_owner"] == \
            keyed_server.keys["a"].key_id
        assert adm.get(f"/api/v1/samplers/{owned.ephemeral}").status_code == 200
        assert adm.post("/api/v1/weights_info", json={"tinker_path": owned.state_path}).status_code == 200
        assert adm.post("/api/v1/retrieve_future", json={"request_id": owned.request_id}).status_code == 200
        listed = json.dumps([adm.get(p).json() for p in
                             ("/api/v1/training_runs", "/api/v1/checkpoints", "/api/v1/sessions")])
        assert owned.run in listed and owned.session in listed and owned.sampler_path in listed
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("admin"))
    out = sc.create_sampling_client(model_path=owned.sampler_path).sample(PROMPT, 1, PARAMS).result()
    assert len(out.sequences[0].tokens) == 3


def test_other_keys_sampling_records_read_as_missing(keyed_server: KeyedServer) -> None:
    """stable_reinforce reads the server's sampling records through provenance spans: B's
    spans naming A's sampled sequences fail as spans naming sequences never sampled."""
    from tinsmith.recipes.rl_loop import rl_datum

    def client(who: str) -> tinker.TrainingClient:
        sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key(who))
        return sc.create_lora_training_client(base_model=TINY, rank=2).result()

    tc_a, tc_b = client("a"), client("b")
    prompt = [5, 6, 7, 8]
    sampler = tc_a.save_weights_and_get_sampling_client(record_stability_info=True).result()
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=4, seed=1, stop=[])).result().sequences[0]

    def datum(sid: str) -> types.Datum:
        d = rl_datum(prompt, list(seq.tokens), list(seq.logprobs), 1.0)
        return d.with_provenance(
            model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
                         types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens) - 1)],
            loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(prompt) - 1),
                            types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens))])

    def error(tc: tinker.TrainingClient, sid: str) -> str:
        with pytest.raises(Exception) as e:  # the message is compared below
            tc.forward([datum(sid)], "stable_reinforce").result()
        return str(e.value)

    real = seq.sequence_id
    fake = real.replace(real.split(":sample:")[0], _fake_session())
    got, missing = error(tc_b, real), error(tc_b, fake)
    assert "has no sampling record" in missing
    assert got == missing.replace(fake, real)
    out = tc_a.forward([datum(real)], "stable_reinforce").result()  # A's record is still there
    assert math.isfinite(out.metrics["loss:sum"])
