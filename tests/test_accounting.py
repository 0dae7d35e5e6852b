"""Accounting through the official SDK and `tinker` CLI against real servers: usage counted
exactly per key and kind, priced at the operator's `--price`s and kept across a restart;
the audit log of who did what, each key seeing its own entries and an admin all; and the
checkpoint storage report (tinsmith.scheduler.accounting, tinsmith.scheduler.billing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tinker
from conftest import TINY, KeyedServer, ServeProcess
from tinker import types

import tinsmith
from tinsmith.embedded import create_api_key

PRICES = {"train": 2.5, "forward": 0.5, "prefill": 1.0, "sample": 10.0}


def _datum(n: int) -> types.Datum:
    """A datum of exactly `n` model-input tokens."""
    toks = [(7 * i + 3) % 50 + 1 for i in range(n + 1)]
    return types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                       loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * n})


def _window() -> tuple[str, str]:
    """This hour and its neighbours, as RFC 3339 (the hour may turn during a test)."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return ((hour - timedelta(hours=1)).isoformat(), (hour + timedelta(hours=2)).isoformat())


def _usage(url: str, key: str) -> list[dict]:
    start, end = _window()
    r = httpx.get(f"{url}/api/v1/billing/usage/events", headers={"X-API-Key": key},
                  params={"starting_on": start, "ending_before": end}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def _totals(rows: list[dict], user: str | None = None) -> Counter[str]:
    """Quantities by kind (forward-only `training` rows apart as "forward")."""
    out: Counter[str] = Counter()
    for row in rows:
        if user is not None and row["user_id"] != user:
            continue
        info = row["event_info"]
        kind = "forward" if info.get("forward_only") else info["type"]
        out[kind] += info.get("token_count", info.get("count", 0))
    return out


def _tinker_cli(url: str, key: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKER_BASE_URL": url, "TINKER_API_KEY": key, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "tinker.cli", "--format", "json", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def test_usage_is_exact_per_key_priced_and_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    a, b = create_api_key(data, name="alice"), create_api_key(data, name="bob")
    admin = create_api_key(data, name="ops", admin=True)
    prices = [x for kind, usd in PRICES.items() for x in ("--price", f"{kind}={usd}")]
    server = ServeProcess(tmp_path, ["--data-dir", str(data), "--models", TINY, *prices])
    try:
        server.start()
        sc = tinker.ServiceClient(base_url=server.url, api_key=a.key)
        tc = sc.create_lora_training_client(base_model=TINY, rank=2)
        tc.forward_backward([_datum(7), _datum(12)], "cross_entropy").result()
        tc.forward_backward([_datum(5)], "cross_entropy").result()
        tc.forward([_datum(9)], "cross_entropy").result()
        tc.save_state("one").result()
        sampler = sc.create_sampling_client(base_model=TINY)
        out = sampler.sample(types.ModelInput.from_ints([5, 6, 7, 8, 9, 10]), num_samples=3,
                             sampling_params=types.SamplingParams(max_tokens=5)).result()
        sampled = sum(len(s.tokens) for s in out.sequences)
        tb = tinker.ServiceClient(base_url=server.url, api_key=b.key).create_lora_training_client(
            base_model=TINY, rank=2)
        tb.forward_backward([_datum(4)], "cross_entropy").result()

        expected = Counter(training=24, forward=9, sampling_prefill=6, sampling_sample=sampled,
                           checkpoint=1)
        assert _totals(_usage(server.url, a.key)) == expected
        assert _totals(_usage(server.url, b.key)) == Counter(training=4)  # its own only
        everyone = _usage(server.url, admin.key)
        assert _totals(everyone, a.key_id) == expected
        assert _totals(everyone, b.key_id) == Counter(training=4)
        assert {r["user_name"] for r in everyone} == {"alice", "bob"}

        # The SDK's view: typed events, each token event priced at the operator's rate.
        start, end = _window()
        usage = tinker.AdminClient(base_url=server.url, api_key=a.key).get_billing_usage(
            start, end).result()
        cost = sum(e.estimated_cost_usd or 0.0 for e in usage.data)
        want = (24 * 2.5 + 9 * 0.5 + 6 * 1.0 + sampled * 10.0) / 1e6
        assert cost == pytest.approx(want)
        training = [e for e in usage.data if isinstance(e.event_info, types.TrainingBillingEvent)]
        assert {e.effective_rate_usd_per_million_tokens for e in training} == {2.5, 0.5}
        assert {e.session_id for e in training} == {tc.model_id.split(":")[0]}
        assert any(isinstance(e.event_info, types.CheckpointBillingEvent) for e in usage.data)

        # Usage gathered since the last write (reports write first) is written at shutdown.
        tc.forward_backward([_datum(3)], "cross_entropy").result()
        expected["training"] += 3
        server.stop()  # SIGINT
        server.start()
        assert _totals(_usage(server.url, a.key)) == expected
        # The CLI reads the same, through AdminClient.
        res = _tinker_cli(server.url, a.key, "billing", "usage", start, end, home=tmp_path)
        assert res.returncode == 0, res.stderr
        rows = json.loads(res.stdout)["data"]
        assert sum(r["event_info"]["token_count"] for r in rows
                   if r["event_info"]["type"] == "sampling_sample") == sampled
    finally:
        server.stop()


def test_usage_window_is_checked(keyed_server: KeyedServer) -> None:
    ac = tinker.AdminClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    with pytest.raises(tinker.BadRequestError, match="must be after"):
        ac.get_billing_usage("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z").result()
    with pytest.raises(tinker.BadRequestError, match="at most 366 days"):
        ac.get_billing_usage("2020-01-01T00:00:00Z", "2026-01-01T00:00:00Z").result()


def _events(ks: KeyedServer, who: str, **kw: object) -> list[types.AuditLogEntry]:
    ac = tinker.AdminClient(base_url=ks.url, api_key=ks.key(who))
    return ac.get_audit_log(**kw).result().entries  # type: ignore[arg-type]


def test_audit_log_records_who_did_what(keyed_server: KeyedServer) -> None:
    ks, a = keyed_server, keyed_server.keys["a"]
    sc = tinker.ServiceClient(base_url=ks.url, api_key=a.key)
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    run = tc.model_id
    path = tc.save_state("audited").result().path
    rest = tinker.RestClient(base_url=ks.url, api_key=a.key)
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    rest.publish_checkpoint_from_tinker_path(path).result()
    rest.delete_checkpoint_from_tinker_path(path).result()

    mine = _events(ks, "a")
    about_run = [e for e in mine if e.event_details.get("model_id") == run]
    assert [e.event for e in about_run] == [
        "run_created", "checkpoint_saved", "checkpoint_ttl_set", "checkpoint_published",
        "checkpoint_deleted"]
    assert all(e.event_details["actor"] == a.key_id for e in about_run)
    assert all(e.tinker_path == path for e in about_run[1:])  # the deprecated field too
    assert any(e.event == "session_created" and e.event_details["session_id"] == run.split(":")[0]
               for e in mine)
    assert any(e.event == "key_created" and e.event_details["key_id"] == a.key_id for e in mine)
    times = [e.timestamp for e in mine]
    assert times == sorted(times)

    checkpoints = _events(ks, "a", event_type="checkpoints")
    assert checkpoints and all(e.event.startswith("checkpoint_") for e in checkpoints)
    assert not [e for e in _events(ks, "a", day=date.today() - timedelta(days=1))
                if e.event_details.get("model_id") == run]
    # Another key sees none of it; an admin sees all of it, also through the deprecated
    # RestClient wrapper.
    assert not [e for e in _events(ks, "b") if e.event_details.get("model_id") == run]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        every = tinker.RestClient(base_url=ks.url, api_key=ks.key("admin")).get_audit_log().result()
    assert [e.event for e in every.entries if e.event_details.get("model_id") == run] == \
        [e.event for e in about_run]
    bad = httpx.get(f"{ks.url}/api/v1/audit", params={"event_type": "bogus"},
                    headers=ks.headers("a"), timeout=30)
    assert bad.status_code == 400 and "unknown audit event_type" in bad.json()["detail"]


def test_checkpoint_storage_per_key_and_project(keyed_server: KeyedServer, tmp_path: Path) -> None:
    ks = keyed_server
    c = create_api_key(ks.data_dir, name="carol")  # a fresh key: nothing stored yet
    sc = tinker.ServiceClient(base_url=ks.url, api_key=c.key, project_id="proj-storage")
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    tc.save_state("s1").result()
    tc.save_weights_for_sampler("s2").result()
    tinker.ServiceClient(base_url=ks.url, api_key=ks.key("b")).create_lora_training_client(
        base_model=TINY, rank=2).save_state("bobs").result()
    rest = tinker.RestClient(base_url=ks.url, api_key=c.key)
    listed = rest.list_checkpoints(tc.model_id).result()
    size = sum(ck.size_bytes or 0 for ck in listed.checkpoints)
    assert len(listed.checkpoints) == 2 and size > 0

    own = tinker.AdminClient(base_url=ks.url, api_key=c.key).get_current_checkpoint_storage_usage()
    [row] = own.result().data
    assert (row.org_user_urn, row.user_name, row.project_id) == (c.key_id, "carol", "proj-storage")
    assert (row.checkpoint_count, row.size_bytes) == (2, size)
    assert row.size_gigabytes == pytest.approx(size / 1e9)
    admin = tinker.AdminClient(base_url=ks.url, api_key=ks.key("admin"))
    rows = admin.get_current_checkpoint_storage_usage().result().data
    assert [(r.checkpoint_count, r.size_bytes) for r in rows
            if r.org_user_urn == c.key_id] == [(2, size)]
    assert {r.org_user_urn for r in rows} >= {c.key_id, ks.keys["b"].key_id}  # every key's
    assert admin.get_current_checkpoint_storage_usage(project_id="proj-none").result().data == []
    # Another key sees none of carol's.
    b_rows = tinker.AdminClient(base_url=ks.url, api_key=ks.key("b")) \
        .get_current_checkpoint_storage_usage().result().data
    assert b_rows and all(r.org_user_urn == ks.keys["b"].key_id for r in b_rows)

    res = _tinker_cli(ks.url, c.key, "billing", "checkpoint-storage", "--project-id",
                      "proj-storage", home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert size in {r.get("size_bytes") for r in json.loads(res.stdout)["data"]}, res.stdout


def test_accounting_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """The same reports on PostgreSQL: usage added to an existing hour row, the audit log,
    and storage joined over runs and sessions."""
    key = create_api_key(tmp_path, database_url=postgres_url, name="pg")
    with tinsmith.local(models=[TINY], data_dir=tmp_path, database_url=postgres_url) as url:
        tc = tinker.ServiceClient(base_url=url, api_key=key.key, project_id="pg-proj") \
            .create_lora_training_client(base_model=TINY, rank=2)
        tc.forward_backward([_datum(6)], "cross_entropy").result()
        assert _totals(_usage(url, key.key)) == Counter(training=6)  # written: a new row
        tc.forward_backward([_datum(5)], "cross_entropy").result()
        path = tc.save_state("pg").result().path
        assert _totals(_usage(url, key.key)) == Counter(training=11, checkpoint=1)  # added to it
        ac = tinker.AdminClient(base_url=url, api_key=key.key)
        assert [e.tinker_path for e in ac.get_audit_log(event_type="checkpoints").result().entries
                ] == [path]
        [row] = ac.get_current_checkpoint_storage_usage(project_id="pg-proj").result().data
        assert (row.org_user_urn, row.checkpoint_count) == (key.key_id, 1) and row.size_bytes > 0


def test_serve_refuses_a_bad_price(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tinsmith.cli import main as cli

    assert cli(["serve", "--price", "gpu=1", "--data-dir", str(tmp_path), "--models", TINY]) == 2
    assert "invalid price 'gpu=1'" in capsys.readouterr().err
    assert cli(["serve", "--price", "train=-1", "--data-dir", str(tmp_path), "--models", TINY]) == 2
