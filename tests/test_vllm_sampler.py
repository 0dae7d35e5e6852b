"""vLLM as the sampler (`--sampler vllm`), through the official SDK, on the bundled model.

One Tinsmith server with `sampler="vllm"` is started for the module; it starts its own vLLM
server (the CPU build, from its own environment: scripts/setup_vllm.sh) and stops it when it
closes. A second, native Tinsmith server is the reference.
Both compute in float32 on the CPU, so greedy tokens must be equal and logprobs agree
within LOGPROB_ATOL (vLLM's CPU kernels sum in another order than torch's).

The module skips when vLLM's environment is missing (TINSMITH_SKIP_VLLM=1, or no
.venv-vllm), unless TINSMITH_REQUIRE_VLLM=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from conftest import SENTENCES, logprobs_of
from tinker import types

import tinsmith
from tinsmith.engine.vllm_server import UP_MESSAGE, default_python

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
API_KEY = "tml-test"
# Largest |vLLM - native| logprob allowed (nats); measured at most ~2e-5 on this model in
# float32 (vLLM's CPU attention and GEMMs accumulate in another order than torch's).
LOGPROB_ATOL = 1e-3
MAX_ADAPTERS = 2  # the vLLM-backed server's max_sampler_adapters: eviction is reachable
REQUIRE = "TINSMITH_REQUIRE_VLLM"


def _vllm_python() -> Path:
    python = Path(os.environ.get("TINSMITH_VLLM_PYTHON") or default_python())
    why = None
    if os.environ.get("TINSMITH_SKIP_VLLM") == "1":
        why = "TINSMITH_SKIP_VLLM=1"
    elif not python.exists():
        why = f"no vLLM environment at {python} (scripts/setup_vllm.sh makes it)"
    elif subprocess.run([str(python), "-c", "import vllm"], check=False, capture_output=True).returncode:
        why = f"{python} cannot import vllm"
    if why is not None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{why}, and {REQUIRE}=1")
        pytest.skip(why)
    return python


class _UpAt(logging.Handler):
    """Catches the URL the vLLM process manager logs once its server is up."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == UP_MESSAGE:
            self.urls.append(str(record.args[0]))  # type: ignore[index]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tinker.ServiceClient, str]]:
    """A Tinsmith server with `sampler="vllm"`, which starts its own vLLM server from vLLM's
    environment (the `tinsmith serve --sampler vllm` path), and that vLLM server's URL."""
    python = _vllm_python()
    catcher = _UpAt()
    logger = logging.getLogger("tinsmith.vllm")
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    try:
        with tinsmith.local(models=[MODEL], data_dir=tmp_path_factory.mktemp("vllm-data"),
                            sampler="vllm", vllm_python=python,
                            max_sampler_adapters=MAX_ADAPTERS) as url:
            assert len(catcher.urls) == 1, catcher.urls
            yield tinker.ServiceClient(base_url=url, api_key=API_KEY), catcher.urls[0]
    finally:
        logger.removeHandler(catcher)
    # the server's close stopped the vLLM server it started
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{catcher.urls[0]}/health", timeout=5)


@pytest.fixture(scope="module")
def vllm_client(vllm_server) -> tinker.ServiceClient:
    return vllm_server[0]


@pytest.fixture(scope="module")
def vllm_url(vllm_server) -> str:
    return vllm_server[1]


@pytest.fixture(scope="module")
def native_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tinker.ServiceClient]:
    with tinsmith.local(models=[MODEL], data_dir=tmp_path_factory.mktemp("native-data")) as url:
        yield tinker.ServiceClient(base_url=url, api_key=API_KEY)


@pytest.fixture(scope="module")
def samplers(vllm_client, native_client):
    """(vLLM-backed, native) base-model sampling clients."""
    return (vllm_client.create_sampling_client(base_model=MODEL).result(),
            native_client.create_sampling_client(base_model=MODEL).result())


@pytest.fixture(scope="module")
def tokenizer(native_client):
    return native_client.create_lora_training_client(base_model=MODEL, rank=2).result().get_tokenizer()


def _prompt(tokenizer, text: str) -> types.ModelInput:
    return types.ModelInput.from_ints(tokenizer.encode(text))


def _both(samplers, prompt, n, params, **kw) -> tuple[types.SampleResponse, types.SampleResponse]:
    futs = [s.sample(prompt, n, params, **kw) for s in samplers]
    return futs[0].result(), futs[1].result()


def _assert_same(v: types.SampleResponse, n: types.SampleResponse) -> None:
    assert [s.tokens for s in v.sequences] == [s.tokens for s in n.sequences]
    assert [s.stop_reason for s in v.sequences] == [s.stop_reason for s in n.sequences]
    for a, b in zip(v.sequences, n.sequences):
        np.testing.assert_allclose(a.logprobs or [], b.logprobs or [], atol=LOGPROB_ATOL)


def test_greedy_base_model_equals_native(samplers, tokenizer) -> None:
    params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=[])
    worst = 0.0
    for text in SENTENCES[:3]:
        v, n = _both(samplers, _prompt(tokenizer, text), 2, params)
        assert len(v.sequences) == 2 and len(v.sequences[0].tokens) == 24
        _assert_same(v, n)
        worst = max(worst, float(np.abs(np.subtract(v.sequences[0].logprobs, n.sequences[0].logprobs)).max()))
    print(f"largest |vLLM - native| sampled logprob: {worst:.2e}")  # the figure in docs/sampling.md


def test_prompt_logprobs_and_topk_equal_native(samplers, tokenizer) -> None:
    prompt = _prompt(tokenizer, SENTENCES[1])
    params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    v, n = _both(samplers, prompt, 1, params, include_prompt_logprobs=True,
                 topk_prompt_logprobs=3, topk_sample_logprobs=3)
    _assert_same(v, n)
    assert v.prompt_logprobs[0] is None and n.prompt_logprobs[0] is None
    np.testing.assert_allclose(v.prompt_logprobs[1:], n.prompt_logprobs[1:], atol=LOGPROB_ATOL)
    for a, b in zip(v.topk_prompt_logprobs[1:], n.topk_prompt_logprobs[1:]):
        assert [t for t, _ in a] == [t for t, _ in b]
        np.testing.assert_allclose([x for _, x in a], [x for _, x in b], atol=LOGPROB_ATOL)
    va, na = v.sequences[0].topk_logprobs, n.sequences[0].topk_logprobs
    assert va is not None and na is not None
    assert [[t for t, _ in row] for row in va] == [[t for t, _ in row] for row in na]
    # prompt_logprobs_last_n leaves the earlier positions unscored, as natively
    v, n = _both(samplers, prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=3)
    assert [x is None for x in v.prompt_logprobs] == [x is None for x in n.prompt_logprobs]
    # max_tokens=0: the prompt's logprobs alone, no sampled token
    v, n = _both(samplers, prompt, 1, types.SamplingParams(max_tokens=0, temperature=0.0, stop=[]),
                 include_prompt_logprobs=True)
    _assert_same(v, n)
    assert v.sequences[0].tokens == []
    np.testing.assert_allclose(v.prompt_logprobs[1:], n.prompt_logprobs[1:], atol=LOGPROB_ATOL)


def test_sampled_logprobs_match_a_training_forward(vllm_client, samplers, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Once upon a time, in a land far away")
    seq = samplers[0].sample(prompt, 1, types.SamplingParams(max_tokens=10, seed=7, stop=[])).result().sequences[0]
    tc = vllm_client.create_lora_training_client(base_model=MODEL, rank=2).result()
    ids = prompt.to_ints() + seq.tokens
    out = tc.forward([types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                  loss_fn_inputs={"target_tokens": ids[1:], "weights": [0.0] * (len(ids) - 1)})],
                     "cross_entropy").result()
    np.testing.assert_allclose(logprobs_of(out)[0][-10:], seq.logprobs, atol=LOGPROB_ATOL)


def test_stop_tokens_and_strings_equal_native(samplers, tokenizer) -> None:
    prompt = _prompt(tokenizer, "Once upon a time, in a land far away")
    greedy = samplers[1].sample(prompt, 1, types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])).result()
    toks = greedy.sequences[0].tokens
    by_token = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[toks[3]])
    v, n = _both(samplers, prompt, 1, by_token)
    _assert_same(v, n)
    assert v.sequences[0].stop_reason == "stop" and v.sequences[0].tokens == toks[: toks.index(toks[3]) + 1]
    text = tokenizer.decode(toks[2:5]).strip()  # a string the greedy text contains
    by_text = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[text])
    v, n = _both(samplers, prompt, 1, by_text)
    _assert_same(v, n)
    assert v.sequences[0].stop_reason == "stop" and text in tokenizer.decode(v.sequences[0].tokens)
    # stop omitted: the model's EOS stops, and the EOS token is kept, as natively
    chat = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)
    v, n = _both(samplers, types.ModelInput.from_ints(list(chat)), 1,
                 types.SamplingParams(max_tokens=48, temperature=0.0))
    _assert_same(v, n)


def test_seeded_sampling_is_reproducible(samplers, tokenizer) -> None:
    prompt = _prompt(tokenizer, SENTENCES[0])
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=123, stop=[])
    a = samplers[0].sample(prompt, 4, params).result()
    b = samplers[0].sample(prompt, 4, params).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1  # 4 independent samples
    c = samplers[0].sample(prompt, 4, types.SamplingParams(max_tokens=12, seed=124, stop=[])).result()
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    # top-k 1 at any temperature is greedy: equal to the native sampler's
    v, n = _both(samplers, prompt, 2, types.SamplingParams(max_tokens=8, temperature=0.7, top_k=1, stop=[]))
    _assert_same(v, n)


def test_what_vllm_cannot_serve_is_a_clear_400(samplers, tokenizer) -> None:
    prompt = _prompt(tokenizer, SENTENCES[2])
    params = types.SamplingParams(max_tokens=2, temperature=0.0, stop=[])
    ids = np.full((len(prompt.to_ints()) - 1, 1), 5, np.int64)
    with pytest.raises(tinker.BadRequestError) as err:
        samplers[0].sample(prompt, 1, params,
                           target_prompt_logprobs=types.TensorData.from_numpy(ids)).result()
    assert "target_prompt_logprobs is not available with --sampler vllm" in str(err.value)
    with pytest.raises(tinker.BadRequestError) as err:
        samplers[0].sample(prompt, 1, params, topk_prompt_logprobs=100).result()
    assert "--vllm-max-logprobs" in str(err.value)
    with pytest.raises(tinker.BadRequestError) as err:  # the native checks run first
        samplers[0].sample(prompt, 1, types.SamplingParams(max_tokens=9000, stop=[])).result()
    assert "context length" in str(err.value)
    # the sampler keeps serving
    assert len(samplers[0].sample(prompt, 1, params).result().sequences[0].tokens) == 2


def _train(client: tinker.ServiceClient, tokenizer, steps: int):
    tc = client.create_lora_training_client(base_model=MODEL, rank=8, seed=11).result()
    _step(tc, tokenizer, steps)
    return tc


def _step(tc, tokenizer, steps: int) -> None:
    ids = tokenizer.encode(SENTENCES[3])
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    for _ in range(steps):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()


def test_trained_snapshots_equal_native_without_restart(vllm_client, native_client, tokenizer) -> None:
    """The same seeded run trained on both servers: save_weights_and_get_sampling_client's
    samples agree, and a later snapshot under the same run reaches vLLM at once."""
    runs = [_train(c, tokenizer, 2) for c in (vllm_client, native_client)]
    prompt = _prompt(tokenizer, "Lighthouses guide")
    params = types.SamplingParams(max_tokens=16, temperature=0.0, stop=[])
    base = vllm_client.create_sampling_client(base_model=MODEL).result().sample(prompt, 1, params).result()
    first = [tc.save_weights_and_get_sampling_client().result() for tc in runs]
    v1, n1 = first[0].sample(prompt, 1, params).result(), first[1].sample(prompt, 1, params).result()
    _assert_same(v1, n1)
    assert v1.sequences[0].tokens != base.sequences[0].tokens  # the adapter is in use
    for tc in runs:
        _step(tc, tokenizer, 3)
    second = [tc.save_weights_and_get_sampling_client().result() for tc in runs]
    v2, n2 = second[0].sample(prompt, 1, params).result(), second[1].sample(prompt, 1, params).result()
    _assert_same(v2, n2)
    assert v2.sequences[0].logprobs != v1.sequences[0].logprobs  # the new weights, no restart


def test_a_rank_group_trainer_feeds_vllm(tmp_path: Path, native_client, tokenizer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Training in a rank group (`sharded=True`, one gloo rank) with vLLM sampling: the
    server process loads no weights (meta device), the group's snapshots (host factors, not
    an Adapter) reach vLLM and sample what the native single-process server samples for the
    same seeded run."""
    from tinsmith.scheduler.served import SHAPES_ONLY

    python = _vllm_python()
    caplog.set_level(logging.INFO, logger="tinsmith.models")
    with tinsmith.local(models=[MODEL], data_dir=tmp_path, sampler="vllm", vllm_python=python,
                        device="cpu", sharded=True) as url:
        grouped = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        runs = [_train(c, tokenizer, 2) for c in (grouped, native_client)]
        prompt = _prompt(tokenizer, "Lighthouses guide")
        params = types.SamplingParams(max_tokens=16, temperature=0.0, stop=[])
        v, n = (tc.save_weights_and_get_sampling_client().result().sample(prompt, 1, params).result()
                for tc in runs)
        _assert_same(v, n)
    assert any(r.msg == SHAPES_ONLY for r in caplog.records)


def test_launch_flags_follow_the_device(tmp_path: Path) -> None:
    """Eager only where asked (the CPU build), vLLM's CUDA graphs otherwise; tensor
    parallelism passed through."""
    from tinsmith.engine.vllm_server import VllmLaunch, VllmProcess

    def argv(**kw) -> list[str]:
        return VllmProcess(VllmLaunch(python=tmp_path / "python", model_dir=tmp_path, max_loras=2,
                                      max_cpu_loras=2, max_lora_rank=8, max_model_len=64,
                                      max_logprobs=4, **kw)).argv()

    assert "--enforce-eager" in argv(eager=True)
    gpu = argv(eager=False, tensor_parallel=4, dtype="bfloat16")
    assert "--enforce-eager" not in gpu
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "4"
    assert gpu[gpu.index("--dtype") + 1] == "bfloat16"


def _adapters(vllm_url: str) -> set[str]:
    models = httpx.get(f"{vllm_url}/v1/models", timeout=30).json()["data"]
    return {m["id"] for m in models if m["id"] != "base"}


def test_stored_samplers_load_on_use_and_evicted_ones_unload(vllm_client, vllm_url, tokenizer) -> None:
    tc = _train(vllm_client, tokenizer, 1)
    names = [f"evict-{i}" for i in range(3)]
    paths = [tc.save_weights_for_sampler(name=n).result().path for n in names]

    def loaded() -> list[str]:  # which of `names` vLLM has loaded
        return sorted(n for n in names if any(f"/{n}@" in a for a in _adapters(vllm_url)))

    prompt = _prompt(tokenizer, "Tinsmiths shape")
    params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    assert loaded() == []  # saving loads nothing
    outs = []
    for i, path in enumerate(paths):
        outs.append(vllm_client.create_sampling_client(model_path=path).result().sample(prompt, 1, params).result())
        assert len(_adapters(vllm_url)) <= MAX_ADAPTERS  # LRU-bounded
        assert names[i] in loaded()  # loaded on first use
    assert loaded() == names[1:]  # the least recently used one was unloaded
    # used again, the evicted one is loaded again, with the same result
    again = vllm_client.create_sampling_client(model_path=paths[0]).result().sample(prompt, 1, params).result()
    assert again.sequences[0].tokens == outs[0].sequences[0].tokens
    assert loaded() == [names[0], names[2]]


def test_serve_refuses_a_missing_vllm_environment(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tinsmith.cli", "serve", "--port", "0", "--data-dir", str(tmp_path),
         "--models", MODEL, "--sampler", "vllm", "--vllm-python", str(tmp_path / "nope" / "python")],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "scripts/setup_vllm.sh" in r.stderr and "--vllm-python" in r.stderr


def test_serve_flags_reach_the_settings(tmp_path: Path) -> None:
    from tinsmith.cli import _settings, build_parser
    from tinsmith.config import ServerSettings

    parse = build_parser().parse_args
    s = _settings(parse(["serve", "--data-dir", str(tmp_path), "--sampler", "vllm",
                         "--vllm-url", "http://127.0.0.1:9", "--vllm-python", "/x/python",
                         "--vllm-max-lora-rank", "16", "--vllm-max-logprobs", "5",
                         "--vllm-tensor-parallel", "2"]))
    assert (s.sampler, s.vllm_url, s.vllm_python, s.vllm_max_lora_rank, s.vllm_max_logprobs,
            s.vllm_tensor_parallel) == ("vllm", "http://127.0.0.1:9", Path("/x/python"), 16, 5, 2)
    d, base = _settings(parse(["serve", "--data-dir", str(tmp_path)])), ServerSettings(data_dir=tmp_path)
    for name in ("sampler", "vllm_url", "vllm_python", "vllm_max_lora_rank", "vllm_max_logprobs",
                 "vllm_tensor_parallel"):
        assert getattr(d, name) == getattr(base, name), name
