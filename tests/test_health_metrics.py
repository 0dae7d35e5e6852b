"""Health endpoints and Prometheus metrics against a real server: /healthz and /readyz need no
API key, /metrics parses as Prometheus text, and requests through the official SDK move the
counters by exactly what they did. The shared session server is used by other tests too, so
metric checks compare before/after values rather than absolute ones."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import tinker
from conftest import SENTENCES, TINY, text_datum
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

import tinsmith.embedded
from tinsmith.scheduler.service import Service

ADAM = types.AdamParams(learning_rate=1e-3)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(base_url: str) -> Samples:
    r = httpx.get(f"{base_url}/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_healthz_needs_no_key(base_url: str) -> None:
    r = httpx.get(f"{base_url}/healthz", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_lists_checks(base_url: str) -> None:
    r = httpx.get(f"{base_url}/readyz", timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["failing"] == []
    assert set(body["checks"]) == {f"model:{TINY}", f"engine_worker:{TINY}", "database"}
    assert all(c["ok"] for c in body["checks"].values())


def test_metrics_parse_and_name_every_family(base_url: str) -> None:
    r = httpx.get(f"{base_url}/metrics", timeout=30)
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"tinsmith_queue_depth", "tinsmith_request_seconds", "tinsmith_requests",
            "tinsmith_tokens", "tinsmith_engine_busy_seconds", "tinsmith_engine_busy_fraction",
            "tinsmith_training_runs", "tinsmith_sampling_sessions"} <= names
    samples = _scrape(base_url)
    for state in ("queued", "held"):
        assert (("tinsmith_queue_depth", (("model", TINY), ("state", state))) in samples)


def test_requests_move_the_counters(
    base_url: str, service_client: tinker.ServiceClient, tokenizer
) -> None:
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2, seed=3).result()
    sampler = service_client.create_sampling_client(base_model=TINY).result()
    batch = [text_datum(tokenizer, s) for s in SENTENCES[:3]]
    train_tokens = sum(d.model_input.length for d in batch)
    prompt = tokenizer.encode("Metrics count every")
    before = _scrape(base_url)

    tc.forward_backward(batch, "cross_entropy").result()
    tc.optim_step(ADAM).result()
    out = sampler.sample(types.ModelInput.from_ints(prompt), 2,
                         types.SamplingParams(max_tokens=5, temperature=1.0)).result()
    sample_tokens = 2 * len(prompt) + sum(len(s.tokens) for s in out.sequences)
    after = _scrape(base_url)

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, model=TINY, **labels) - _get(before, name, model=TINY, **labels)

    for kind in ("forward_backward", "optim_step", "sample"):
        assert delta("tinsmith_requests_total", kind=kind, outcome="ok") == 1, kind
        assert delta("tinsmith_request_seconds_count", kind=kind) == 1, kind
        assert delta("tinsmith_request_seconds_sum", kind=kind) > 0, kind
    assert delta("tinsmith_tokens_total", kind="forward_backward") == train_tokens
    assert delta("tinsmith_tokens_total", kind="sample") == sample_tokens
    assert delta("tinsmith_tokens_total", kind="optim_step") == 0
    assert delta("tinsmith_engine_busy_seconds_total") > 0
    assert 0 < _get(after, "tinsmith_engine_busy_fraction", model=TINY) <= 1
    assert _get(after, "tinsmith_training_runs", model=TINY) >= 1
    assert _get(after, "tinsmith_sampling_sessions", model=TINY) >= 1


def test_bad_requests_count_as_user_errors(
    base_url: str, service_client: tinker.ServiceClient, tokenizer
) -> None:
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    key = ("tinsmith_requests_total",
           (("kind", "forward_backward"), ("model", TINY), ("outcome", "user_error")))
    before = _scrape(base_url)
    with pytest.raises(Exception, match="unknown loss function"):
        tc.forward_backward([text_datum(tokenizer, "hi there")], "no_such_loss").result()
    mismatched = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                             loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})
    with pytest.raises(Exception, match="target_tokens has 2 entries"):
        tc.forward_backward([mismatched], "cross_entropy").result()
    after = _scrape(base_url)
    assert after.get(key, 0.0) - before.get(key, 0.0) == 2
    ok = ("tinsmith_requests_total",
          (("kind", "forward_backward"), ("model", TINY), ("outcome", "ok")))
    assert after.get(ok, 0.0) == before.get(ok, 0.0)


def test_readyz_names_the_failing_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tinsmith.local yields only the URL: capture the Service it builds to break it from inside.
    made: list[Service] = []

    build = tinsmith.embedded.build_service

    def captured(*args: object, **kwargs: object) -> Service:
        made.append(build(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(tinsmith.embedded, "build_service", captured)
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        svc = made[0]
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200

        svc.models[TINY].worker.close()  # the engine worker thread exits
        r = httpx.get(f"{url}/readyz", timeout=30)
        assert r.status_code == 503
        assert r.json()["failing"] == [f"engine_worker:{TINY}"]
        assert r.json()["status"] == "unavailable"

        # The metadata database becomes unreachable: close its pool and put a folder where
        # the SQLite file was, so no new connection can open it.
        svc.db.close()
        for p in tmp_path.glob("tinsmith.db*"):
            p.unlink()
        (tmp_path / "tinsmith.db").mkdir()
        r = httpx.get(f"{url}/readyz", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["failing"] == ["database", f"engine_worker:{TINY}"]
        assert not body["checks"]["database"]["ok"] and body["checks"]["database"]["detail"]
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
