"""API keys: 401s, the health probes left open, the `tinsmith keys` CLI, and the open mode
(no keys) that every other test relies on, with its exposure guard."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import tinker
from conftest import TINY, KeyedServer

import tinsmith
from tinsmith.cli import main as cli
from tinsmith.config import ServerSettings
from tinsmith.embedded import check_exposure, create_api_key
from tinsmith.scheduler.access import BAD_KEY, MISSING_KEY


def _post_session(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/create_session", headers=headers, timeout=30,
                      json={"tags": [], "user_metadata": {}, "sdk_version": "test"})


def _until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_requests_without_a_valid_key_get_401(keyed_server: KeyedServer) -> None:
    url = keyed_server.url
    assert _post_session(url, keyed_server.headers("a")).status_code == 200
    missing = _post_session(url, {})
    assert missing.status_code == 401 and missing.json() == {"detail": MISSING_KEY}
    assert "WWW-Authenticate" in missing.headers
    # Revoked, well-formed but unknown, and malformed keys: one answer, naming no other key.
    for key in (keyed_server.key("revoked"), "tml-" + "x" * 43, "not-a-key", "tml-"):
        r = _post_session(url, {"X-API-Key": key})
        assert r.status_code == 401 and r.json() == {"detail": BAD_KEY}, (key, r.text)
    # Every API route is behind the key, the SDK's first call included.
    for path in ("/api/v1/client/config", "/api/v1/retrieve_future", "/api/v1/asample"):
        assert httpx.post(url + path, json={}, timeout=30).status_code == 401
    for path in ("/api/v1/training_runs", "/api/v1/checkpoints", "/api/v1/get_server_capabilities"):
        assert httpx.get(url + path, timeout=30).status_code == 401
    # The health probes stay open.
    for path in ("/healthz", "/readyz", "/metrics", "/api/v1/healthz"):
        assert httpx.get(url + path, timeout=30).status_code == 200, path


def test_sdk_with_a_revoked_key_fails_with_401(keyed_server: KeyedServer) -> None:
    with pytest.raises(tinker.AuthenticationError, match="invalid or has been revoked"):
        sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("revoked"))
        sc.create_lora_training_client(base_model=TINY, rank=2)
    with pytest.raises(tinker.AuthenticationError):  # at construction: it fetches /client/config
        tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("revoked"))


def test_cli_create_list_revoke_round_trip(keyed_server: KeyedServer, capsys) -> None:
    d = str(keyed_server.data_dir)
    assert cli(["keys", "create", "--name", "carol", "--data-dir", d]) == 0
    out = capsys.readouterr().out
    key = out.strip().splitlines()[-1]
    key_id = out.split("API key ")[1].split()[0]
    assert key.startswith("tml-") and len(key) > 40 and key_id.startswith("key-")
    # The running server takes it at once.
    assert _post_session(keyed_server.url, {"X-API-Key": key}).status_code == 200

    assert cli(["keys", "list", "--data-dir", d]) == 0
    listing = capsys.readouterr().out
    line = next(x for x in listing.splitlines() if x.startswith(key_id))
    assert "carol" in line and "active" in line and key[:10] in line
    assert key not in listing  # only the first characters are shown, ever
    assert keyed_server.keys["revoked"].key_id in listing and "revoked" in listing
    # Only the key's hash is stored.
    raw = sqlite3.connect(keyed_server.data_dir / "tinsmith.db").iterdump()
    assert not any(key in stmt for stmt in raw)

    assert cli(["keys", "revoke", key_id, "--data-dir", d]) == 0
    assert cli(["keys", "revoke", "key-nonexistent", "--data-dir", d]) == 1
    # Revoked from another process: the server's one-second key cache lets it through at most
    # that long.
    assert _until(lambda: _post_session(keyed_server.url, {"X-API-Key": key}).status_code == 401,
                  timeout=3.0)
    assert cli(["keys", "list", "--data-dir", d]) == 0
    assert "revoked" in next(x for x in capsys.readouterr().out.splitlines() if x.startswith(key_id))


def test_admin_key_from_the_cli(tmp_path: Path, capsys) -> None:
    assert cli(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert "the server is open" in capsys.readouterr().out
    assert cli(["keys", "create", "--admin", "--data-dir", str(tmp_path)]) == 0
    assert "created admin API key" in capsys.readouterr().out
    assert cli(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert " admin " in capsys.readouterr().out


def test_open_server_locks_when_a_key_is_made(tmp_path: Path) -> None:
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        assert _post_session(url, {"X-API-Key": "tml-anything"}).status_code == 200  # open
        assert _post_session(url, {}).status_code == 200
        new = create_api_key(tmp_path, name="late")
        assert _until(lambda: _post_session(url, {}).status_code == 401, timeout=3.0)
        assert _post_session(url, {"X-API-Key": "tml-anything"}).status_code == 401
        assert _post_session(url, {"X-API-Key": new.key}).status_code == 200


def test_serve_refuses_to_listen_openly_beyond_loopback(tmp_path: Path, caplog, capsys) -> None:
    with pytest.raises(ValueError, match="allow-open"):
        check_exposure(ServerSettings(data_dir=tmp_path, host="0.0.0.0"))
    # The CLI says so and exits before loading any model.
    assert cli(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--models", TINY]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="tinsmith"):
        assert check_exposure(ServerSettings(data_dir=tmp_path)) is False  # loopback: open, loudly
        assert check_exposure(ServerSettings(data_dir=tmp_path, host="::", allow_open=True)) is False
    assert caplog.text.count("THIS SERVER IS OPEN") == 2
    create_api_key(tmp_path)
    assert check_exposure(ServerSettings(data_dir=tmp_path, host="0.0.0.0")) is True


def test_a_foreign_database_is_refused_with_a_clear_message(tmp_path: Path, capsys) -> None:
    """Real databases from before keys are upgraded in place (test_migrations.py); one that
    only shares a table name with Tinsmith's is refused, and nothing is added to it."""
    db = sqlite3.connect(tmp_path / "tinsmith.db")
    db.execute("CREATE TABLE sessions (session_id VARCHAR(255) PRIMARY KEY, created_at DATETIME)")
    db.commit()
    db.close()
    assert cli(["keys", "list", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a Tinsmith metadata database" in err
    tables = sqlite3.connect(tmp_path / "tinsmith.db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    assert tables == [("sessions",)]  # refused before anything was added
