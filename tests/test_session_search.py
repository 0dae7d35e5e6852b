"""Session search and trace export, through the official SDK on a real keyed server.

Key A makes sessions with display names, metadata and projects; the SDK's search filters
them, pages through them with its cursor, and reports their status and checkpoints. Key B
finds none of them, whatever owner it asks for; an admin finds them. A session's trace is
a signed URL to a trace-event JSON of what the server kept of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import httpx
import pytest
import tinker
from conftest import TINY, KeyedServer
from tinker import types
from tinker.types import (
    AccessibleSearchOwner,
    ActiveSessionStatusQuery,
    ClientFinishedSessionStatusQuery,
    SessionSearchRequest,
    UserSearchOwner,
)

warnings.filterwarnings("ignore", message=".*search_sessions is experimental.*")
TOKENS = [3, 9, 4, 11, 7, 2, 8]
DATUM = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 6})


def _session(server: KeyedServer, who: str, **fields: object) -> str:
    got = httpx.post(f"{server.url}/api/v1/create_session", headers=server.headers(who),
                     json={"tags": [], "user_metadata": {}, "sdk_version": "test", **fields})
    assert got.status_code == 200, got.text
    return got.json()["session_id"]


def _search(rest: tinker.RestClient, **fields: object) -> list[str]:
    page = rest.search_sessions(SessionSearchRequest(**fields)).result()  # type: ignore[arg-type]
    return [s.session_id for s in page.sessions]


def test_search_filters_pages_and_stays_within_the_callers_sessions(
        keyed_server: KeyedServer) -> None:
    tag = uuid.uuid4().hex[:8]
    project = f"proj-{tag}"
    s1 = _session(keyed_server, "a", display_name=f"Nightly {tag} sweep",
                  user_metadata={"exp": tag, "lr": "0.1"}, project_id=project)
    s2 = _session(keyed_server, "a", display_name=f"nightly {tag}", user_metadata={"exp": tag})
    s3 = _session(keyed_server, "a", display_name="other", user_metadata={"exp": tag})
    httpx.post(f"{keyed_server.url}/api/v1/sessions/{s2}/finish", headers=keyed_server.headers("a"),
               json={"reason": {"type": "errored"}}).raise_for_status()
    a = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    meta = {"exp": tag}

    assert _search(a, user_metadata=meta) == [s3, s2, s1]  # newest first
    assert _search(a, user_metadata={"exp": tag, "lr": "0.1"}) == [s1]
    assert _search(a, display_name=f"{tag.upper()} NIGHTLY") == [s2, s1]  # words, any case
    assert _search(a, display_name=f"sweep {tag}", session_id=s3) == [s3, s1]  # either matches
    assert _search(a, session_id=s2) == [s2]
    assert _search(a, project_ids=[project]) == [s1]
    assert _search(a, user_metadata=meta, statuses=[ActiveSessionStatusQuery()]) == [s3, s1]
    assert _search(a, user_metadata=meta, statuses=[
        ClientFinishedSessionStatusQuery(reasons=["errored"])]) == [s2]
    assert _search(a, user_metadata=meta, statuses=[
        ClientFinishedSessionStatusQuery(reasons=["success"])]) == []

    # Pages of one, through the cursor.
    request = SessionSearchRequest(user_metadata=meta, limit=1)
    seen = []
    while True:
        page = a.search_sessions(request).result()
        seen += [s.session_id for s in page.sessions]
        if page.next_cursor is None:
            break
        request = request.model_copy(update={"cursor": page.next_cursor})
    assert seen == [s3, s2, s1]

    [hit] = a.search_sessions(SessionSearchRequest(session_id=s1)).result().sessions
    assert (hit.project_id, hit.display_name, hit.user_metadata) == (
        project, f"Nightly {tag} sweep", {"exp": tag, "lr": "0.1"})
    assert hit.owner == keyed_server.keys["a"].key_id and hit.status is not None
    assert hit.status.type == "active" and hit.checkpoints_count == 0

    # B finds none of A's, whichever owner it names; an admin finds them.
    b = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("b"))
    a_id = keyed_server.keys["a"].key_id
    for owner in (None, AccessibleSearchOwner(), UserSearchOwner(owner_urns=[a_id])):
        fields = {"user_metadata": meta, **({"owner": owner} if owner else {})}
        assert _search(b, **fields) == []
    admin = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("admin"))
    assert _search(admin, user_metadata=meta) == []  # its own: none
    assert _search(admin, user_metadata=meta, owner=AccessibleSearchOwner()) == [s3, s2, s1]
    assert _search(admin, user_metadata=meta, owner=UserSearchOwner(owner_urns=[a_id])) == [s3, s2, s1]


def test_search_counts_checkpoints_and_trace_exports_the_session(keyed_server: KeyedServer,
                                                                 tmp_path: Path) -> None:
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    tc.forward_backward([DATUM], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_state("traced").result().path
    session = tc.model_id.split(":train:")[0]
    a = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    [hit] = a.search_sessions(SessionSearchRequest(session_id=session)).result().sessions
    assert hit.checkpoints_count == 1 and (hit.checkpoint_storage_bytes or 0) > 0

    url = a.export_session_trace(session).result()
    got = httpx.get(url, timeout=60)  # no key: the URL is signed
    assert got.status_code == 200, got.text
    events = got.json()["traceEvents"]
    names = [e["name"] for e in events]
    assert "forward_backward" in names and "optim_step" in names
    assert "saved weights/traced" in names
    [fwd] = [e for e in events if e["name"] == "forward_backward"]
    assert fwd["args"]["loss:sum"] > 0 and fwd["tid"] == next(
        e["tid"] for e in events if e["name"] == "thread_name"
        and e["args"]["name"] == f"training run {tc.model_id}")
    assert any(e["args"].get("tinker_path") == path for e in events if e["ph"] == "i")
    tampered = url.replace("signature=", "signature=0")
    assert httpx.get(tampered, timeout=60).status_code == 403

    b = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("b"))
    with pytest.raises(tinker.NotFoundError, match="unknown session"):
        b.export_session_trace(session).result()

    # The CLI's `tinker session export-trace` downloads the same trace.
    out = tmp_path / "session.pftrace"
    env = {**os.environ, "TINKER_BASE_URL": keyed_server.url, "TINKER_API_KEY": keyed_server.key("a")}
    done = subprocess.run([sys.executable, "-m", "tinker.cli", "session", "export-trace", session,
                           "--output", str(out)], check=False, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "optim_step" in {e["name"] for e in json.loads(out.read_text())["traceEvents"]}
