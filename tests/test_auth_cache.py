"""The key check on the event loop: `ApiKeys.cached` answers only what `authenticate` would
answer without the database, and the API's auth dependency hops to the threadpool only
when the cache cannot answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.requests import Request

import tinsmith.api.auth as auth
from tinsmith.scheduler.access import OPEN, ApiKeys, Unauthorized
from tinsmith.storage.db import MetadataStore


@pytest.fixture
def db(tmp_path: Path):
    store = MetadataStore(f"sqlite:///{tmp_path / 'tinsmith.db'}")
    yield store
    store.close()


def test_cached_answers_only_what_authenticate_knows_without_the_database(db: MetadataStore) -> None:
    keys = ApiKeys(db, cache_s=3600.0)
    assert keys.cached(None) is None  # "are there keys?" was never asked
    assert keys.authenticate(None) is OPEN
    assert keys.cached(None) is OPEN and keys.cached("anything") is OPEN

    made = keys.create("a")  # the server locks at once
    assert keys.cached(made.key) is None and keys.cached(None) is None
    caller = keys.authenticate(made.key)
    assert keys.cached(made.key) == caller and caller.key_id == made.key_id
    other = keys.create("b")
    assert keys.cached(other.key) is None  # never authenticated: only the database knows
    for bad in (None, "", "not-a-key", "tml-" + "x" * 43):
        assert keys.cached(bad) is None
        with pytest.raises(Unauthorized):
            keys.authenticate(bad)

    keys.revoke(made.key_id)  # takes effect at once, on the fast path too
    assert keys.cached(made.key) is None
    with pytest.raises(Unauthorized):
        keys.authenticate(made.key)


def test_cached_expires_with_the_cache(db: MetadataStore) -> None:
    keys = ApiKeys(db, cache_s=0.0)
    made = keys.create("a")
    keys.authenticate(made.key)
    assert keys.cached(made.key) is None  # remembered for 0 s: authenticate reads again
    assert keys.authenticate(made.key).key_id == made.key_id


class _Svc:
    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def authenticate(self, key: str | None):
        return self.keys.authenticate(key)


def _request(svc: _Svc, key: str | None) -> Request:
    app = type("App", (), {})()
    app.state = type("State", (), {"service": svc})()
    headers = [] if key is None else [(b"x-api-key", key.encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "app": app})


def test_the_auth_dependency_hops_to_the_threadpool_only_on_a_cache_miss(
    db: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[object] = []
    real = auth.run_in_threadpool

    async def counting(fn, *args):
        hops.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(auth, "run_in_threadpool", counting)
    svc = _Svc(ApiKeys(db, cache_s=3600.0))
    made = svc.keys.create("a")

    first = asyncio.run(auth.current_caller(_request(svc, made.key)))
    assert first.key_id == made.key_id and len(hops) == 1  # read from the database
    again = [asyncio.run(auth.current_caller(_request(svc, made.key))) for _ in range(5)]
    assert again == [first] * 5 and len(hops) == 1  # the cache answered on the loop
    with pytest.raises(Unauthorized):
        asyncio.run(auth.current_caller(_request(svc, None)))
    assert len(hops) == 2  # a refusal goes through authenticate, as before
