"""Bad input on the wire, against a real keyed server: oversized bodies (with and without a
Content-Length), invalid JSON, wrong types, binary garbage as protobuf, path traversal in
checkpoint names and paths, revoked and expired keys. Each gets a 4xx with a JSON body that
names the problem (never a 500), and the server is unharmed after each: /healthz answers,
an existing run still trains and its stored checkpoint still loads, and nothing is written
outside the checkpoint store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import SENTENCES, TINY, logprobs_of, text_datum
from tinker import types

import tinsmith
from tinsmith.scheduler.access import BAD_KEY, ApiKeys, NewKey, Unauthorized
from tinsmith.storage.db import MetadataStore

MAX_BODY = 256 * 1024
ADAM = types.AdamParams(learning_rate=5e-3)


@dataclass
class Victim:
    url: str
    data_dir: Path
    keys: dict[str, NewKey]
    training: tinker.TrainingClient  # trained through the SDK only
    raw_run: str  # a run the raw requests below address (their seq_ids are counted here)
    batch: list[types.Datum]
    checkpoint: str
    losses: list[float]
    next_seq: int = 1

    def http(self, who: str = "user") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.keys[who].key}, timeout=30)

    def seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


def _tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    d = tmp_path_factory.mktemp("tinsmith-bad-http")
    db = MetadataStore(f"sqlite:///{d / 'tinsmith.db'}")
    keys = ApiKeys(db)
    made = {"user": keys.create("user"), "revoked": keys.create("revoked"),
            "expired": keys.create("expired", expires_at=datetime.now(UTC) - timedelta(minutes=1))}
    keys.revoke(made["revoked"].key_id)
    db.close()
    with tinsmith.local(models=[TINY], data_dir=d, max_body_bytes=MAX_BODY) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=made["user"].key)
        tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
        raw = sc.create_lora_training_client(base_model=TINY, rank=2).result()
        batch = [text_datum(tc.get_tokenizer(), s) for s in SENTENCES[:2]]
        loss = tc.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(ADAM).result()
        path = tc.save_state("before-bad-input").result().path
        yield Victim(url, d, made, tc, raw.model_id, batch, path, [loss])


@pytest.fixture
def unharmed(victim: Victim) -> Iterator[None]:
    """After the test: the server answers, the victim run trains, its checkpoint loads, and
    no file appeared outside the checkpoint store."""
    outside = {p for p in _tree(victim.data_dir.parent) if p.parts[0] != victim.data_dir.name}
    yield
    with victim.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
    out = victim.training.forward_backward(victim.batch, "cross_entropy").result()
    victim.losses.append(out.metrics["loss:sum"])
    victim.training.optim_step(ADAM).result()
    sc = tinker.ServiceClient(base_url=victim.url, api_key=victim.keys["user"].key)
    loaded = sc.create_training_client_from_state(victim.checkpoint).result()
    assert len(logprobs_of(loaded.forward(victim.batch, "cross_entropy").result())) == 2
    now = {p for p in _tree(victim.data_dir.parent) if p.parts[0] != victim.data_dir.name}
    assert now == outside


def _problem(r: httpx.Response, status: int | tuple[int, ...], *words: str) -> str:
    """A 4xx of the expected status whose JSON body names the problem."""
    assert r.status_code in ((status,) if isinstance(status, int) else status), r.text
    detail = str(r.json()["detail"])
    for w in words:
        assert w in detail, detail
    return detail


# --- bodies --------------------------------------------------------------------------------

@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("endpoint", ["/api/v1/forward_backward", "/api/v1/create_session"])
def test_oversized_body_with_content_length(victim: Victim, endpoint: str) -> None:
    with victim.http() as http:
        r = http.post(endpoint, content=b"\0" * (MAX_BODY + 1),
                      headers={"Content-Type": "application/x-protobuf"})
    _problem(r, 413, f"{MAX_BODY + 1} bytes", f"limit of {MAX_BODY} bytes")


@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("endpoint", ["/api/v1/forward_backward", "/api/v1/create_session"])
def test_oversized_chunked_body(victim: Victim, endpoint: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked, counted as it arrives
        for _ in range(2 * MAX_BODY // 65536):
            yield b"{" * 65536

    with victim.http() as http:
        r = http.post(endpoint, content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    _problem(r, 413, f"limit of {MAX_BODY} bytes")


@pytest.mark.usefixtures("unharmed")
def test_body_just_under_the_limit_is_parsed(victim: Victim) -> None:
    body = b'{"tags": [], "padding": "' + b"x" * (MAX_BODY - 100) + b'"}'
    with victim.http() as http:
        r = http.post("/api/v1/create_session", content=body,
                      headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 422), r.text  # parsed: accepted, or refused by its schema


@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("body", [b"{not json", b'{"tags": [', b"\xff\xfe\x00garbage", b""])
def test_invalid_json(victim: Victim, body: bytes) -> None:
    with victim.http() as http:
        r = http.post("/api/v1/create_session", content=body,
                      headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert r.json()["detail"]


@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("endpoint,body,field", [
    ("/api/v1/create_model", {"session_id": ["x"], "model_seq_id": "one", "base_model": 7,
                              "lora_config": {"rank": "big"}}, "model_seq_id"),
    ("/api/v1/optim_step", {"model_id": 5, "seq_id": "x", "adam_params": {"learning_rate": "fast"}},
     "learning_rate"),
    ("/api/v1/weights_info", {"tinker_path": {"a": 1}}, "tinker_path"),
    ("/api/v1/retrieve_future", {"request_id": None}, "request_id"),
])
def test_wrong_types(victim: Victim, endpoint: str, body: dict[str, object], field: str) -> None:
    with victim.http() as http:
        r = http.post(endpoint, json=body)
    assert r.status_code in (400, 422), r.text
    assert field in r.text


@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("content_type", ["application/x-protobuf", "application/octet-stream"])
@pytest.mark.parametrize("body", [b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))])
def test_binary_garbage(victim: Victim, content_type: str, body: bytes) -> None:
    with victim.http() as http:
        r = http.post("/api/v1/forward_backward", content=body,
                      headers={"Content-Type": content_type})
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["detail"]
        r = http.post("/api/v1/create_session", content=body,  # a JSON endpoint
                      headers={"Content-Type": content_type})
        assert 400 <= r.status_code < 500, r.text


# --- path traversal ------------------------------------------------------------------------

NAMES = ["../../etc", "..", "/etc/passwd", "a/../../b", "tinker://run/../x", "..\\..\\x", "a\0b"]


@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("name", NAMES)
def test_traversal_in_save_names(victim: Victim, name: str) -> None:
    with victim.http() as http:
        for endpoint in ("/api/v1/save_weights", "/api/v1/save_weights_for_sampler"):
            r = http.post(endpoint, json={"model_id": victim.raw_run, "path": name,
                                          "seq_id": victim.seq()})
            _problem(r, 400, "invalid checkpoint name")


def _paths(victim: Victim) -> list[str]:
    run = victim.checkpoint.split("/")[2]
    return [f"tinker://{run}/weights/../../etc", f"tinker://{run}/../x", "tinker://run/../x",
            "tinker://../weights/x", "/etc/passwd", "file:///etc/passwd",
            f"tinker://{run}/weights/..", f"tinker://{run}/weights/%2e%2e"]


@pytest.mark.usefixtures("unharmed")
def test_traversal_in_load_and_weights_info(victim: Victim) -> None:
    with victim.http() as http:
        for path in _paths(victim):
            load = http.post("/api/v1/load_weights", json={
                "path": path, "optimizer": False, "session_id": "s", "model_seq_id": 5})
            for r in (load, http.post("/api/v1/weights_info", json={"tinker_path": path})):
                detail = _problem(r, (400, 404))
                assert "invalid checkpoint" in detail or "does not exist" in detail, detail


@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("checkpoint_id", [
    "weights/%2e%2e/%2e%2e/%2e%2e/etc", "..%2F..%2Fbefore-bad-input", "weights/..%2F..%2Fx",
    "%2Fetc%2Fpasswd", "weights/before-bad-input%2F..%2F..%2F..",
])
def test_traversal_in_delete(victim: Victim, checkpoint_id: str) -> None:
    run = victim.checkpoint.split("/")[2]
    with victim.http() as http:
        r = http.delete(f"/api/v1/training_runs/{run}/checkpoints/{checkpoint_id}")
    assert r.status_code in (400, 404), r.text
    assert r.json()["detail"]


# --- keys ----------------------------------------------------------------------------------

@pytest.mark.usefixtures("unharmed")
@pytest.mark.parametrize("who", ["revoked", "expired"])
def test_revoked_and_expired_keys(victim: Victim, who: str) -> None:
    with victim.http(who) as http:
        r = http.post("/api/v1/create_session", json={"tags": []})
        assert r.status_code == 401 and r.json() == {"detail": BAD_KEY}
    sc = tinker.ServiceClient(base_url=victim.url, api_key=victim.keys[who].key)
    with pytest.raises(tinker.AuthenticationError, match="invalid or has been revoked"):
        sc.create_lora_training_client(base_model=TINY, rank=2).result()


def test_key_expiring_while_in_use(victim: Victim) -> None:
    """A key that expires while in use is refused from then on, like a revoked one."""
    db = MetadataStore(f"sqlite:///{victim.data_dir / 'tinsmith.db'}")
    soon = ApiKeys(db).create("soon", expires_at=datetime.now(UTC) + timedelta(seconds=2))
    db.close()
    with httpx.Client(base_url=victim.url, headers={"X-API-Key": soon.key}) as http:
        assert http.get("/api/v1/training_runs").status_code == 200
        time.sleep(2.05)
        r = http.get("/api/v1/training_runs")
        assert r.status_code == 401 and r.json() == {"detail": BAD_KEY}


def test_the_auth_cache_never_outlives_a_key(tmp_path: Path) -> None:
    db = MetadataStore(f"sqlite:///{tmp_path / 'tinsmith.db'}")
    try:
        keys = ApiKeys(db, cache_s=30)
        key = keys.create("brief", expires_at=datetime.now(UTC) + timedelta(seconds=1))
        assert keys.authenticate(key.key).key_id == key.key_id
        time.sleep(1.1)
        with pytest.raises(Unauthorized, match=BAD_KEY):
            keys.authenticate(key.key)
    finally:
        db.close()


def test_the_victim_learned_throughout(victim: Victim) -> None:
    """Run last (file order), this sees the victim's loss fall over all the steps taken
    between bad requests; alone, over steps of its own."""
    while len(victim.losses) < 10:
        out = victim.training.forward_backward(victim.batch, "cross_entropy").result()
        victim.losses.append(out.metrics["loss:sum"])
        victim.training.optim_step(ADAM).result()
    assert np.mean(victim.losses[-3:]) < victim.losses[0]
