"""Per-key limits (tinsmith/scheduler/limits.py): concurrent requests (429), tokens per request
and stored checkpoint bytes (413), each hit through the official SDK and raw HTTP on a real
server, with another key unaffected at the same time, and the key working again once the
limit clears. Also: the server-wide defaults on an open server, and revision 0003 upgrading
a 0002 database with keys in place.

A request is held pending without timing tricks by sending a training run's seq_ids out of
order: a later seq_id waits in the run's gate until the earlier one arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tinker
from conftest import SENTENCES, TINY, text_datum
from sqlalchemy import text
from tinker import types
from tinker._client import AsyncTinker  # the HTTP client under the SDK's public clients

import tinsmith
from tinsmith.cli import main as cli_main
from tinsmith.scheduler.access import ApiKeys, NewKey, hash_key
from tinsmith.scheduler.limits import Limits
from tinsmith.storage.db import MetadataStore, alembic_config, create_db_engine

ADAM = {"learning_rate": 1e-3}


@dataclass(frozen=True)
class LimitedServer:
    url: str
    data_dir: Path
    keys: dict[str, NewKey]

    def client(self, who: str) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.url, api_key=self.keys[who].key)

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.keys[who].key}, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedServer]:
    """Keys: "busy" (2 concurrent requests), "tokens" (60 tokens a request), "store" (limit
    set by the test), "free" (the server's defaults)."""
    d = tmp_path_factory.mktemp("tinsmith-limits")
    db = MetadataStore(f"sqlite:///{d / 'tinsmith.db'}")
    keys = ApiKeys(db)
    made = {"busy": keys.create("busy", max_concurrent=2),
            "tokens": keys.create("tokens", max_request_tokens=60),
            "store": keys.create("store"), "free": keys.create("free")}
    db.close()
    with tinsmith.local(models=[TINY], data_dir=d) as url:
        yield LimitedServer(url, d, made)


def _hold(http: httpx.Client, model_id: str, seq_id: int) -> httpx.Response:
    """An optim_step that waits in the run's gate until the seq_ids before it arrive."""
    return http.post("/api/v1/optim_step",
                     json={"model_id": model_id, "seq_id": seq_id, "adam_params": ADAM})


def _result(http: httpx.Client, request_id: str) -> dict[str, object]:
    r = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_limit(server: LimitedServer) -> None:
    busy = server.client("busy")
    tc = busy.create_lora_training_client(base_model=TINY, rank=2).result()
    holder = busy.create_lora_training_client(base_model=TINY, rank=2).result()  # next seq: 1
    tokenizer = tc.get_tokenizer()
    batch = [text_datum(tokenizer, SENTENCES[0])]
    with server.http("busy") as http, server.http("free") as other_http:
        held = [_hold(http, holder.model_id, 2), _hold(http, holder.model_id, 3)]
        assert [r.status_code for r in held] == [200, 200]

        # A third request of the key: 429 at once, with a body naming the limit and the count.
        r = _hold(http, holder.model_id, 4)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        detail = r.json()["detail"]
        assert "max_concurrent=2" in detail and "2 not yet completed" in detail

        # The SDK retries a 429 with the same seq_id: the forward waits, and goes through
        # once the key's requests complete.
        pending = tc.forward(batch, "cross_entropy")
        # Another key is not slowed down meanwhile.
        other = server.client("free").create_lora_training_client(base_model=TINY, rank=2)
        other = other.result()
        start = time.monotonic()
        out = other.forward_backward([text_datum(tokenizer, SENTENCES[1])], "cross_entropy").result()
        assert out.metrics["loss:sum"] > 0 and time.monotonic() - start < 10
        assert other_http.get("/healthz").status_code == 200
        with pytest.raises(TimeoutError):  # still waiting for the key's requests
            pending.result(timeout=0.5)

        # The seq_id the held requests wait for always passes (else the run would wedge),
        # and then all three complete: the limit clears.
        first = _hold(http, holder.model_id, 1)
        assert first.status_code == 200, first.text
        for r in (first, *held):
            assert _result(http, r.json()["request_id"])["type"] == "optim_step"
        assert len(pending.result(timeout=60).loss_fn_outputs) == 1
        r = _hold(http, holder.model_id, 4)  # refused before: nothing of it was consumed
        assert r.status_code == 200, r.text
        assert _result(http, r.json()["request_id"])["type"] == "optim_step"


def test_sdk_raises_429_after_its_retries(server: LimitedServer) -> None:
    """The SDK's own HTTP client honours Retry-After (1 s) and raises RateLimitError once its
    retries are spent. (Its training and sampling clients retry a 429 far longer: see
    docs/operating.md, "Limits".)"""
    holder = server.client("busy").create_lora_training_client(base_model=TINY, rank=2)
    holder = holder.result()
    with server.http("busy") as http:
        held = [_hold(http, holder.model_id, 2), _hold(http, holder.model_id, 3)]

        async def attempt() -> float:
            client = AsyncTinker(base_url=server.url, api_key=server.keys["busy"].key,
                                        max_retries=2)
            start = time.monotonic()
            try:
                with pytest.raises(tinker.RateLimitError, match="max_concurrent=2"):
                    await client.training.optim_step(request=types.OptimStepRequest(
                        model_id=holder.model_id, seq_id=5,
                        optim_params=types.AdamParams(learning_rate=1e-3)))
                return time.monotonic() - start
            finally:
                await client.close()

        took = asyncio.run(attempt())
        assert 1.5 < took < 10  # two retries, 1 s apart
        first = _hold(http, holder.model_id, 1)
        for r in (first, *held):
            _result(http, r.json()["request_id"])


def test_request_token_limit(server: LimitedServer) -> None:
    sc = server.client("tokens")
    tc = sc.create_lora_training_client(base_model=TINY, rank=2).result()
    tokenizer = tc.get_tokenizer()
    small = text_datum(tokenizer, SENTENCES[0])
    n = len(small.model_input.to_ints())
    big = [small] * (60 // n + 1)  # just over 60 tokens across datums
    total = n * len(big)
    with pytest.raises(tinker.APIStatusError) as err:
        tc.forward_backward(big, "cross_entropy").result()
    assert err.value.status_code == 413
    assert f"is {total} tokens" in str(err.value) and "max_request_tokens=60" in str(err.value)
    # Another key sends the same request meanwhile; this key's next request still flows.
    other = server.client("free").create_lora_training_client(base_model=TINY, rank=2).result()
    assert len(other.forward(big, "cross_entropy").result().loss_fn_outputs) == len(big)
    assert len(tc.forward_backward([small], "cross_entropy").result().loss_fn_outputs) == 1

    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.encode(SENTENCES[2])[:4])
    with pytest.raises(tinker.APIStatusError) as err:
        sampler.sample(prompt, 3, types.SamplingParams(max_tokens=20)).result()
    assert err.value.status_code == 413
    assert f"is {4 + 60} tokens" in str(err.value) and "max_request_tokens=60" in str(err.value)
    out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=10)).result()
    assert len(out.sequences) == 2


def _stored(rest: tinker.RestClient, run_id: str) -> dict[str, int]:
    rows = rest.list_checkpoints(run_id).result().checkpoints
    return {c.checkpoint_id: c.size_bytes for c in rows}


def _set_stored_limit(server: LimitedServer, limit: str) -> None:
    assert cli_main(["keys", "limits", server.keys["store"].key_id, "--max-stored-bytes", limit,
                     "--data-dir", str(server.data_dir)]) == 0
    time.sleep(1.1)  # the server reads a key's limits again after 1 s


def test_stored_bytes_limit(server: LimitedServer, capsys: pytest.CaptureFixture[str]) -> None:
    sc = server.client("store")
    rest = sc.create_rest_client()
    tc = sc.create_lora_training_client(base_model=TINY, rank=2).result()
    tc.save_state("a").result()
    size = _stored(rest, tc.model_id)["weights/a"]

    # Room for one more? No: the save fails, and nothing of it is written.
    _set_stored_limit(server, str(size + size // 2))
    with pytest.raises(Exception) as err:
        tc.save_state("b").result()
    assert f"this checkpoint is {size} bytes" in str(err.value)
    assert f"max_stored_bytes={size + size // 2}" in str(err.value)
    assert _stored(rest, tc.model_id) == {"weights/a": size}
    assert not (server.data_dir / "checkpoints" / tc.model_id / "weights" / "b").exists()

    # Overwriting "a" replaces its bytes: it fits.
    tc.save_state("a", overwrite=True).result()
    # At the limit: refused at submission with 413, before anything is queued.
    _set_stored_limit(server, str(size))
    with pytest.raises(tinker.APIStatusError) as err:
        tc.save_state("c").result()
    assert err.value.status_code == 413
    assert f"stores {size} bytes" in str(err.value) and f"max_stored_bytes={size}" in str(err.value)

    # Another key saves meanwhile; after deleting "a" this key saves again.
    other = server.client("free").create_lora_training_client(base_model=TINY, rank=2).result()
    assert other.save_state("x").result().path.endswith("/weights/x")
    rest.delete_checkpoint(tc.model_id, "weights/a").result()
    tc.save_state("d").result()
    assert _stored(rest, tc.model_id) == {"weights/d": size}

    capsys.readouterr()
    assert cli_main(["keys", "list", "--data-dir", str(server.data_dir)]) == 0
    listed = capsys.readouterr().out
    assert f"max_stored_bytes={size}" in listed and "max_concurrent=2" in listed


def test_open_server_applies_the_defaults(tmp_path: Path) -> None:
    with tinsmith.local(models=[TINY], data_dir=tmp_path, max_request_tokens=8) as url:
        tc = tinker.ServiceClient(base_url=url, api_key="tml-any").create_lora_training_client(
            base_model=TINY, rank=2).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(1, 10))),
                            loss_fn_inputs={"target_tokens": list(range(2, 11)),
                                            "weights": [1.0] * 9})
        with pytest.raises(tinker.APIStatusError) as err:
            tc.forward([datum], "cross_entropy").result()
        assert err.value.status_code == 413 and "max_request_tokens=8" in str(err.value)


def test_revision_0003_upgrades_a_0002_database_with_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tinsmith.db'}"
    engine = create_db_engine(url)
    with engine.begin() as conn:
        from alembic import command

        command.upgrade(alembic_config(conn), "0002")
        conn.execute(text(
            "INSERT INTO api_keys (key_id, key_hash, hint, name, is_admin, created_at) "
            "VALUES ('key-old', :h, 'tml-old', 'old', 0, '2026-01-01 00:00:00')"),
            {"h": hash_key("tml-old-key")})
    engine.dispose()
    db = MetadataStore(url)
    try:
        keys = ApiKeys(db)
        assert keys.authenticate("tml-old-key").key_id == "key-old"
        row = db.get_api_key("key-old")
        assert row is not None and row.expires_at is None and row.max_concurrent is None
        assert keys.limits("key-old") == keys.defaults
        assert keys.set_limits("key-old", max_concurrent=3)
        assert keys.limits("key-old").max_concurrent == 3
        assert keys.set_limits("key-old", max_request_tokens=0)  # 0: unlimited (CLI "none")
        assert keys.limits("key-old").max_request_tokens is None
    finally:
        db.close()


def test_keys_create_with_limits_and_expiry(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data-dir", str(tmp_path)]
    assert cli_main(["keys", "create", "--name", "cli", "--max-concurrent", "3",
                     "--max-request-tokens", "none", "--expires-in", "30d", *args]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli_main(["keys", "list", *args]) == 0
    listed = capsys.readouterr().out
    assert "max_concurrent=3" in listed and "max_request_tokens=none" in listed
    db = MetadataStore(f"sqlite:///{tmp_path / 'tinsmith.db'}")
    try:
        keys = ApiKeys(db)
        caller = keys.authenticate(key)
        row = db.get_api_key(str(caller.key_id))
        assert row is not None and row.expires_at is not None
        left = row.expires_at - datetime.now(UTC)
        assert timedelta(days=29, hours=23) < left <= timedelta(days=30)
        assert keys.limits(caller.key_id) == Limits(3, None, None)
    finally:
        db.close()
    with pytest.raises(SystemExit):
        cli_main(["keys", "create", "--expires-in", "soon", *args])


def test_many_chunks_under_a_small_concurrency_limit_complete(tmp_path: Path) -> None:
    """A forward_backward split into more chunks than `max_concurrent` + 1 still completes.
    In parallel mode the SDK sends the first chunk only after every other one was accepted,
    so held chunks would fill the limit and the rest would get 429 until the SDK gave up;
    for a key with a concurrency limit the server asks for chunks in order instead."""
    db = MetadataStore(f"sqlite:///{tmp_path / 'tinsmith.db'}")
    key = ApiKeys(db).create("narrow", max_concurrent=2)
    db.close()
    with tinsmith.local(models=[TINY], data_dir=tmp_path, fwdbwd_max_chunk_len=1) as url:
        tc = tinker.ServiceClient(base_url=url, api_key=key.key).create_lora_training_client(
            base_model=TINY, rank=2).result()
        tok = tc.get_tokenizer()
        data = [text_datum(tok, s) for s in SENTENCES + SENTENCES[:2]]  # 6 chunks of one
        start = time.monotonic()
        out = tc.forward_backward(data, "cross_entropy").result(timeout=120)
        assert len(out.loss_fn_outputs) == 6
        assert time.monotonic() - start < 60
        with httpx.Client(base_url=url, headers={"X-API-Key": key.key}) as http:
            assert http.post("/api/v1/client/config", json={}).json()["parallel_fwdbwd_chunks"] is False
