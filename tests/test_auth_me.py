"""Identity endpoints through the official SDK and `tinker` CLI: GET/DELETE
/api/v1/auth/apikey/me (`tinker auth login/logout/status`) and the tokens of POST
/api/v1/auth/token, with which `RestClient.whoami()` and `tinker auth whoami` work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tinker
from conftest import TINY, KeyedServer

from tinsmith.embedded import create_api_key
from tinsmith.scheduler.access import BAD_KEY


def _tinker(url: str, home: Path, *args: str, key: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TINKER_API_KEY"}
    env.update(TINKER_BASE_URL=url, HOME=str(home))
    if key is not None:
        env["TINKER_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "tinker.cli", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def _token(ks: KeyedServer, key: str) -> str:
    r = httpx.post(f"{ks.url}/api/v1/auth/token", json={}, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["jwt"]


def test_apikey_me_describes_the_calling_key(keyed_server: KeyedServer) -> None:
    a = keyed_server.keys["a"]
    me = httpx.get(f"{keyed_server.url}/api/v1/auth/apikey/me", headers=keyed_server.headers("a"),
                   timeout=30)
    assert me.status_code == 200
    body = me.json()
    assert body["key_id"] == int(a.key_id.removeprefix("key-"), 16) and body["name"] == "alice"
    assert body["details"]["user_details"]["email"] == "alice"
    assert "(admin)" in httpx.get(f"{keyed_server.url}/api/v1/auth/apikey/me",
                                  headers=keyed_server.headers("admin"), timeout=30).json()["note"]
    for headers in ({}, keyed_server.headers("revoked")):
        assert httpx.get(f"{keyed_server.url}/api/v1/auth/apikey/me", headers=headers,
                         timeout=30).status_code == 401


def test_tinker_auth_login_and_status(keyed_server: KeyedServer, tmp_path: Path) -> None:
    url = keyed_server.url
    bad = _tinker(url, tmp_path, "auth", "login", stdin=keyed_server.key("revoked") + "\n")
    assert bad.returncode != 0 and BAD_KEY in bad.stdout + bad.stderr
    res = _tinker(url, tmp_path, "auth", "login", stdin=keyed_server.key("b") + "\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Logged in as bob (tinsmith)" in res.stdout
    stored = json.loads((tmp_path / ".tinker" / "credentials.json").read_text())
    assert keyed_server.key("b") in json.dumps(stored)
    # The stored key is what the SDK (and the CLI) now use.
    status = _tinker(url, tmp_path, "auth", "status")
    assert status.returncode == 0 and "Tinker accessible: yes" in status.stdout, status.stderr


def test_a_key_deletes_itself_and_nothing_else(keyed_server: KeyedServer) -> None:
    ks = keyed_server
    doomed = create_api_key(ks.data_dir, name="doomed")
    r = httpx.delete(f"{ks.url}/api/v1/auth/apikey/me", headers={"X-API-Key": doomed.key},
                     timeout=30)
    assert r.status_code == 200, r.text
    # Refused at once (the server drops its key cache), by the SDK too.
    assert httpx.get(f"{ks.url}/api/v1/auth/apikey/me", headers={"X-API-Key": doomed.key},
                     timeout=30).status_code == 401
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=ks.url, api_key=doomed.key)
    assert httpx.get(f"{ks.url}/api/v1/auth/apikey/me", headers=ks.headers("a"),
                     timeout=30).status_code == 200
    log = tinker.AdminClient(base_url=ks.url, api_key=ks.key("admin")).get_audit_log(
        event_type="organizations").result().entries
    [revoked] = [e for e in log if e.event == "key_revoked"
                 and e.event_details["key_id"] == doomed.key_id]
    assert revoked.event_details["actor"] == doomed.key_id


def test_whoami_with_a_token(keyed_server: KeyedServer, tmp_path: Path) -> None:
    ks, a = keyed_server, keyed_server.keys["a"]
    # With a plain key the SDK exchanges it for a token itself (pjwt_auth_enabled).
    me = tinker.RestClient(base_url=ks.url, api_key=a.key).whoami().result()
    assert (me.user_urn, me.email) == (a.key_id, "alice")
    # A token given as the credential works too.
    token = _token(ks, a.key)
    me = tinker.RestClient(base_url=ks.url, api_key=token).whoami().result()
    assert (me.user_urn, me.org_urn, me.email) == (a.key_id, "tml:organization:tinsmith", "alice")
    res = _tinker(ks.url, tmp_path, "--format", "json", "auth", "whoami", key=token)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["user_urn"] == a.key_id
    # The token is the key's credential: training works with it, as that key's.
    sc = tinker.ServiceClient(base_url=ks.url, api_key=token)
    run = sc.create_lora_training_client(base_model=TINY, rank=2).model_id
    assert tinker.RestClient(base_url=ks.url, api_key=a.key).get_training_run(run).result()


def test_tokens_are_refused_once_forged_or_their_key_is_revoked(keyed_server: KeyedServer) -> None:
    ks = keyed_server
    key = create_api_key(ks.data_dir, name="short-lived")
    token = _token(ks, key.key)
    head, payload, _ = token.split(".")
    url = f"{ks.url}/api/v1/auth/apikey/me"
    for bad in (f"{head}.{payload}.AAAA", f"{head}.{payload}"):
        r = httpx.get(url, headers={"X-API-Key": bad}, timeout=30)
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert httpx.get(url, headers={"X-API-Key": token}, timeout=30).status_code == 200
    httpx.delete(url, headers={"X-API-Key": key.key}, timeout=30).raise_for_status()
    r = httpx.get(url, headers={"X-API-Key": token}, timeout=30)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
