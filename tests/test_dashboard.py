"""The web dashboard, driven in a real headless Chromium (Debian's) through Playwright,
against real servers with runs trained through the SDK; and its JSON endpoints over HTTP.

Browser tests skip when Chromium or Playwright is missing, unless TINSMITH_REQUIRE_BROWSER=1
(CI), then they fail. Screenshots go to docs/dashboard/ as documentation.
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import tinker
from conftest import SENTENCES, TINY, KeyedServer, text_datum
from tinker import types

CHROMIUM = "/usr/bin/chromium"
REQUIRE_BROWSER = "TINSMITH_REQUIRE_BROWSER"
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "dashboard"
STEPS = 5
PROMPT = "The quick brown"


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"Chromium not found at {CHROMIUM}"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    missing = _browser_missing()
    if missing:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_BROWSER}=1")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _train(url: str, key: str, steps: int, tokenizer_out: list | None = None) -> tuple[str, str, str]:
    """A run trained `steps` steps through the SDK; returns (run id, sampler path, state path)."""
    sc = tinker.ServiceClient(base_url=url, api_key=key)
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    tok = tc.get_tokenizer()
    if tokenizer_out is not None:
        tokenizer_out.append(tok)
    data = [text_datum(tok, s) for s in SENTENCES]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    sampler = tc.save_weights_for_sampler("dash-sampler").result().path
    state = tc.save_state("dash-state").result().path
    return tc.model_id, sampler, state


@pytest.fixture(scope="module")
def trained(keyed_server: KeyedServer) -> dict[str, object]:
    toks: list = []
    run_a, sampler_a, state_a = _train(keyed_server.url, keyed_server.key("a"), STEPS, toks)
    run_b, sampler_b, _ = _train(keyed_server.url, keyed_server.key("b"), 2)
    return {"run_a": run_a, "sampler_a": sampler_a, "state_a": state_a, "run_b": run_b,
            "sampler_b": sampler_b, "tokenizer": toks[0]}


# ----- JSON endpoints ------------------------------------------------------------------------

def test_metrics_history_per_step(keyed_server: KeyedServer, trained: dict[str, object]) -> None:
    r = httpx.get(f"{keyed_server.url}/api/v1/training_runs/{trained['run_a']}/metrics",
                  headers=keyed_server.headers("a"))
    assert r.status_code == 200, r.text
    points = r.json()["points"]
    fb = [p for p in points if p["kind"] == "forward_backward"]
    opt = [p for p in points if p["kind"] == "optim_step"]
    assert [p["step"] for p in fb] == list(range(STEPS))
    assert [p["step"] for p in opt] == list(range(STEPS))
    assert all("loss:sum" in p["metrics"] for p in fb)
    assert fb[-1]["metrics"]["loss:sum"] < fb[0]["metrics"]["loss:sum"]  # it trained
    assert all("grad_norm:mean" in p["metrics"] for p in opt)
    assert all(a["time"] <= b["time"] for a, b in itertools.pairwise(points))


def test_other_keys_objects_are_not_found(keyed_server: KeyedServer, trained: dict[str, object]) -> None:
    url, a = keyed_server.url, keyed_server.headers("a")
    r = httpx.get(f"{url}/api/v1/training_runs/{trained['run_b']}/metrics", headers=a)
    assert r.status_code == 404 and "unknown training run" in r.json()["detail"]
    r = httpx.get(f"{url}/api/v1/checkpoints/download", params={"path": trained["sampler_b"]}, headers=a)
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    r = httpx.post(f"{url}/api/v1/dashboard/sample", headers=a,
                   json={"model": trained["sampler_b"], "prompt": PROMPT})
    assert r.status_code == 404
    ov = httpx.get(f"{url}/api/v1/dashboard/overview", headers=a).json()
    ids = {x["training_run_id"] for x in ov["training_runs"]}
    assert trained["run_a"] in ids and trained["run_b"] not in ids
    assert httpx.get(f"{url}/api/v1/dashboard/overview").status_code == 401
    admin = httpx.get(f"{url}/api/v1/training_runs/{trained['run_b']}/metrics",
                      headers=keyed_server.headers("admin"))
    assert admin.status_code == 200 and len(admin.json()["points"]) == 4


def test_bad_input_gets_4xx_naming_the_problem(keyed_server: KeyedServer, trained: dict[str, object]) -> None:
    url, a = keyed_server.url, keyed_server.headers("a")
    cases = [
        ({"model": TINY, "prompt": ""}, 400, "prompt is empty"),
        ({"model": "no/such-model", "prompt": "hi"}, 400, "unknown base model"),
        ({"model": "tinker://nope", "prompt": "hi"}, 400, "invalid checkpoint path"),
        ({"model": TINY, "prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ({"model": TINY, "prompt": "hi", "temperature": -1}, 422, "temperature"),
    ]
    for body, status, words in cases:
        r = httpx.post(f"{url}/api/v1/dashboard/sample", headers=a, json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.text, (body, r.text)
    r = httpx.get(f"{url}/api/v1/checkpoints/download", params={"path": "s3://x"}, headers=a)
    assert r.status_code == 400 and "tinker://" in r.json()["detail"]
    assert httpx.get(f"{url}/dashboard/secrets.txt").status_code == 404


def test_engine_figures_follow_the_work(keyed_server: KeyedServer, trained: dict[str, object]) -> None:
    r = httpx.get(f"{keyed_server.url}/api/v1/dashboard/engine", headers=keyed_server.headers("a"))
    (m,) = r.json()["models"]
    assert m["model"] == TINY
    assert m["requests_total"] >= 2 * (STEPS + 2)  # both runs' forward_backward + optim_step
    assert m["tokens_total"] > 0 and m["tokens_per_s"] > 0
    assert m["requests_per_pass"] >= 1
    assert 0 < m["busy_fraction"] <= 1
    assert m["training_runs"] >= 2 and m["queued"] == 0


def test_playground_matches_the_sdk_in_one_session(keyed_server: KeyedServer,
                                                   trained: dict[str, object]) -> None:
    url, a = keyed_server.url, keyed_server.headers("a")
    tok = trained["tokenizer"]
    models = (TINY, str(trained["sampler_a"]))

    def play() -> dict[str, list[int]]:
        out = {}
        for model in models:
            r = httpx.post(f"{url}/api/v1/dashboard/sample", headers=a, timeout=60,
                           json={"model": model, "prompt": PROMPT, "max_tokens": 10,
                                 "temperature": 0.8, "seed": 7})
            assert r.status_code == 200, r.text
            assert r.json()["prompt_tokens"] == tok.encode(PROMPT)
            out[model] = r.json()["tokens"]
        return out

    def samplers() -> int:
        return httpx.get(f"{url}/api/v1/dashboard/engine", headers=a).json()["models"][0][
            "sampling_sessions"]

    first = play()
    before = samplers()
    assert play() == first  # seeded: the same again
    assert samplers() == before  # one sampling session per model, reused
    sc = tinker.ServiceClient(base_url=url, api_key=keyed_server.key("a"))
    params = types.SamplingParams(max_tokens=10, temperature=0.8, seed=7)
    for model in models:
        client = (sc.create_sampling_client(base_model=TINY) if model == TINY
                  else sc.create_sampling_client(model_path=model))
        want = client.sample(prompt=types.ModelInput.from_ints(tok.encode(PROMPT)), num_samples=1,
                             sampling_params=params).result().sequences[0].tokens
        assert first[model] == list(want) and want
    ov = httpx.get(f"{url}/api/v1/dashboard/overview", headers=a).json()
    (mine,) = [s for s in ov["sessions"] if "dashboard" in s["tags"]]  # reused, not piled up
    assert mine["status"] == "active" and mine["last_heartbeat_at"] > mine["created_at"]


def test_playground_offers_own_sampler_checkpoints(keyed_server: KeyedServer,
                                                   trained: dict[str, object]) -> None:
    url = keyed_server.url

    def offered(who: str) -> list[str]:
        return httpx.get(f"{url}/api/v1/dashboard/overview",
                         headers=keyed_server.headers(who)).json()["sampler_checkpoints"]

    assert trained["sampler_a"] in offered("a")
    assert trained["state_a"] not in offered("a")  # training state: not for sampling
    assert trained["sampler_b"] not in offered("a") and trained["sampler_a"] not in offered("b")
    assert offered("admin") == []  # an admin's own: none, not everyone's


def test_playground_samples_a_checkpoint_saved_again(keyed_server: KeyedServer) -> None:
    """A sampler path deleted and saved again (newer weights) is sampled with the new weights,
    as the SDK samples it: the playground makes a fresh sampling session for it."""
    url, a = keyed_server.url, keyed_server.headers("a")
    sc = tinker.ServiceClient(base_url=url, api_key=keyed_server.key("a"))
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    tok = tc.get_tokenizer()
    data = [text_datum(tok, s) for s in SENTENCES]
    params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=3)

    def play(path: str) -> list[int]:
        r = httpx.post(f"{url}/api/v1/dashboard/sample", headers=a, timeout=60,
                       json={"model": path, "prompt": PROMPT, "max_tokens": 10,
                             "temperature": 1.0, "seed": 3})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    def sdk(path: str) -> list[int]:
        return list(sc.create_sampling_client(model_path=path).sample(
            prompt=types.ModelInput.from_ints(tok.encode(PROMPT)), num_samples=1,
            sampling_params=params).result().sequences[0].tokens)

    path = tc.save_weights_for_sampler("again").result().path
    before = play(path)
    assert before == sdk(path)
    rest = tinker.RestClient(base_url=url, api_key=keyed_server.key("a"))
    rest.delete_checkpoint(tc.model_id, "sampler_weights/again").result()
    r = httpx.post(f"{url}/api/v1/dashboard/sample", headers=a, json={"model": path, "prompt": "x"})
    assert r.status_code == 404  # deleted: not sampled from a cached session
    for _ in range(4):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    assert tc.save_weights_for_sampler("again").result().path == path
    after = play(path)
    assert after == sdk(path)
    assert after != before  # the new weights, not the engine's cached old ones


def test_sessions_end_when_heartbeats_stop(keyed_server: KeyedServer, monkeypatch) -> None:
    """A session whose client stops heartbeating shows as ended after MISSED_HEARTBEATS
    intervals (shortened here), as active again when a heartbeat comes, and finished once
    finished."""
    from tinsmith.api.routes import dashboard

    url, b = keyed_server.url, keyed_server.headers("b")

    def status(sid: str) -> str:
        ov = httpx.get(f"{url}/api/v1/dashboard/overview", headers=b).json()
        return next(s["status"] for s in ov["sessions"] if s["session_id"] == sid)

    monkeypatch.setattr(dashboard, "SDK_HEARTBEAT_S", 1.0)
    r = httpx.post(f"{url}/api/v1/create_session", headers=b,
                   json={"tags": ["quiet"], "user_metadata": None, "sdk_version": "test"})
    sid = r.json()["session_id"]
    assert status(sid) == "active"
    time.sleep(dashboard.MISSED_HEARTBEATS * 1.0 + 0.5)
    assert status(sid) == "ended"
    httpx.post(f"{url}/api/v1/session_heartbeat", headers=b, json={"session_id": sid})
    assert status(sid) == "active"
    httpx.post(f"{url}/api/v1/sessions/{sid}/finish", headers=b, json={})
    assert status(sid) == "finished"


def test_heartbeat_interval_is_the_sdks() -> None:
    """SDK_HEARTBEAT_S is the SDK's own heartbeat period, read from its source."""
    from tinker.lib import internal_client_holder

    from tinsmith.api.routes import dashboard

    source = inspect.getsource(internal_client_holder.InternalClientHolder._session_heartbeat)
    period = re.search(r"SESSION_HEARTBEAT_PERIOD_SEC = (\d+)", source)
    assert period is not None and int(period.group(1)) == dashboard.SDK_HEARTBEAT_S


def test_favicon_is_served(keyed_server: KeyedServer) -> None:
    for path in ("/favicon.ico", "/dashboard/favicon.svg"):
        r = httpx.get(f"{keyed_server.url}{path}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml", path
        assert r.text.startswith("<svg")
    page = httpx.get(f"{keyed_server.url}/dashboard").text
    assert '<link rel="icon" href="/dashboard/favicon.svg"' in page


def test_history_is_bounded() -> None:
    from tinsmith.scheduler.history import MetricHistory

    h = MetricHistory(max_points=3, max_runs=2)
    for i in range(5):
        h.record("r1", "forward_backward", {"loss:sum": float(i), "bad": float("nan")})
        h.record("r1", "optim_step", {"grad_norm:mean": 1.0})
    points, total = h.points("r1")
    assert total == 10 and len(points) == 3
    assert [(p.kind, p.step) for p in points] == [("optim_step", 3), ("forward_backward", 4),
                                                  ("optim_step", 4)]
    assert points[1].metrics == {"loss:sum": 4.0}  # NaN dropped: JSON has none
    assert h.latest("r1") == (5, {"loss:sum": 4.0})
    h.record("r2", "optim_step", {})
    h.record("r3", "optim_step", {})
    assert h.points("r1") == ([], 0) and h.latest("r3")[0] == 1  # r1 was the oldest run


# ----- the page in Chromium ------------------------------------------------------------------

def _loopback_only(urls: list[str]) -> list[str]:
    """The requested URLs that leave this machine (anything but loopback, blob: and data:)."""
    bad = []
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme in ("blob", "data"):
            continue
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            bad.append(u)
    return bad


def test_dashboard_in_chromium(browser, keyed_server: KeyedServer, trained: dict[str, object],
                               tmp_path: Path) -> None:
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    missing: list[str] = []  # 404s: the favicon used to be one on every load
    page.on("response", lambda resp: resp.status == 404 and missing.append(resp.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    run_a, run_b = str(trained["run_a"]), str(trained["run_b"])
    # Tokens/s is a rate over the last 30 s, and other tests may have run since `trained`:
    # a forward pass by b (a run of its own, so a's table is unchanged) just before the page
    # loads puts tokens in that window.
    sc_b = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("b"))
    tc_b = sc_b.create_lora_training_client(base_model=TINY, rank=2)
    tc_b.forward([text_datum(tc_b.get_tokenizer(), SENTENCES[0])], "cross_entropy").result()

    page.goto(f"{keyed_server.url}/")  # redirects to /dashboard
    assert page.url.endswith("/dashboard")
    expect(page.locator("#key-form")).to_be_visible()  # keyed server: the page asks for a key
    page.screenshot(path=str(SHOTS / "key.png"), clip={"x": 0, "y": 0, "width": 1280, "height": 170})
    page.fill("#key-input", keyed_server.key("a"))
    page.click("#key-save")
    row = page.locator(f'#runs tbody tr[data-run="{run_a}"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text("loaded")
    expect(row.locator("td").nth(4)).to_have_text(str(STEPS))
    assert page.locator(f'#runs tbody tr[data-run="{run_b}"]').count() == 0  # b's run: not shown
    assert page.evaluate("localStorage.getItem('tinsmith.apiKey')") == keyed_server.key("a")

    # The engine panel shows the engine's numbers under the right headings.
    expect(page.locator("#status")).to_contain_text("updated")  # every panel filled
    heads = page.locator("#engine thead th").all_inner_texts()
    cells = page.locator(f'#engine tbody tr[data-model="{TINY}"] td').all_inner_texts()
    panel = dict(zip(heads, cells))
    figures = httpx.get(f"{keyed_server.url}/api/v1/dashboard/engine",
                        headers=keyed_server.headers("a")).json()["models"][0]
    assert float(panel["Requests"]) == figures["requests_total"] >= 2 * (STEPS + 2)
    assert float(panel["Requests/pass"]) == pytest.approx(figures["requests_per_pass"], rel=1e-2)
    assert float(panel["Tokens/s"]) > 0 and panel["Busy"].endswith("%")
    assert (panel["Queued"], panel["Held"]) == ("0", "0") and int(panel["Runs"]) >= 2

    # A run's curves: one point per step.
    row.click()
    loss = page.locator('#charts svg[data-metric="loss:sum"]')
    expect(loss).to_have_attribute("data-points", str(STEPS))
    assert loss.locator("circle").count() == STEPS
    expect(page.locator('#charts svg[data-metric="optim grad_norm:mean"]')).to_have_attribute(
        "data-points", str(STEPS))
    page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

    # Download: the archive holds the adapter files.
    ck_row = page.locator(f'#checkpoints tbody tr[data-path="{trained["sampler_a"]}"]')
    with page.expect_download() as dl_info:
        ck_row.locator("button.download").click()
    saved = tmp_path / dl_info.value.suggested_filename
    dl_info.value.save_as(saved)
    names = set(zipfile.ZipFile(saved).namelist())
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names, names
    assert saved.suffix == ".zip"

    # Playground: the base model and the key's own sampler checkpoints, nothing else.
    options = page.locator("#pg-model option").evaluate_all("os => os.map(o => o.value)")
    assert options[0] == TINY and str(trained["sampler_a"]) in options
    assert str(trained["sampler_b"]) not in options and str(trained["state_a"]) not in options
    # The same completion as the SDK's sample with the same seed.
    page.select_option("#pg-model", str(trained["sampler_a"]))
    page.fill("#pg-prompt", PROMPT)
    page.fill("#pg-max-tokens", "12")
    page.fill("#pg-temperature", "1.0")
    page.fill("#pg-seed", "1234")
    page.click("#pg-run")
    expect(page.locator("#pg-state")).to_contain_text("tokens from")
    got = page.evaluate("JSON.parse(document.querySelector('#pg-output').dataset.tokens)")
    sc = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    sampler = sc.create_sampling_client(model_path=str(trained["sampler_a"]))
    tok = trained["tokenizer"]
    want = sampler.sample(prompt=types.ModelInput.from_ints(tok.encode(PROMPT)), num_samples=1,
                          sampling_params=types.SamplingParams(max_tokens=12, temperature=1.0,
                                                               seed=1234)).result()
    assert got == list(want.sequences[0].tokens) and got
    assert page.locator("#pg-output").inner_text() == tok.decode(got, skip_special_tokens=True)
    page.locator("#playground-panel").screenshot(path=str(SHOTS / "playground.png"))

    # Delete (confirmed): gone from the page and from the REST listing.
    state_row = page.locator(f'#checkpoints tbody tr[data-path="{trained["state_a"]}"]')
    page.once("dialog", lambda d: d.accept())
    state_row.locator("button.delete").click()
    expect(state_row).to_have_count(0)
    rest = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    paths = [c.tinker_path for c in rest.list_checkpoints(run_a).result().checkpoints]
    assert trained["state_a"] not in paths and trained["sampler_a"] in paths

    assert _loopback_only(requested) == [], requested
    assert missing == []
    statuses = page.locator("#sessions tbody tr td:last-child").all_inner_texts()
    assert "active" in statuses, statuses  # the playground's session, heartbeated by playing
    assert any("/api/v1/dashboard/overview" in u for u in requested)
    assert errors == []
    ctx.close()


def test_dashboard_open_server_needs_no_key(browser, base_url: str) -> None:
    from playwright.sync_api import expect

    sc = tinker.ServiceClient(base_url=base_url, api_key="tml-test")
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    tc.forward_backward([text_datum(tc.get_tokenizer(), SENTENCES[0])], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    page = browser.new_page()
    page.goto(f"{base_url}/dashboard")
    expect(page.locator(f'#runs tbody tr[data-run="{tc.model_id}"]')).to_be_visible()
    expect(page.locator("#status")).to_contain_text("updated")  # a full refresh, no key asked
    assert page.locator("#key-form").is_hidden()
    page.close()
