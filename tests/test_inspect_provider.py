"""The Inspect AI provider (`tinsmith/<model>`) against the session's real Tinsmith server.

Every completion is checked against what the SDK's own SamplingClient returns for the same
rendered prompt and sampling parameters, so prompts, params and `model_path` are shown to
pass through, not just to produce some text.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, text_datum
from inspect_ai import Task, eval  # the dev extra installs inspect-ai
from inspect_ai.dataset import Sample
from inspect_ai.model import ChatMessageUser, GenerateConfig, Model, ModelOutput, get_model
from inspect_ai.tool import ToolInfo
from tinker import types

from tinsmith.cookbook.renderers import Renderer, get_renderer

MODEL = f"tinsmith/{TINY}"
PROMPT = "Tell me a story about a fox."


@pytest.fixture(autouse=True)
def _inspect_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("INSPECT_DISPLAY", "none")


@pytest.fixture(scope="module")
def renderer(tokenizer) -> Renderer:
    return get_renderer(tokenizer)


def provider(base_url: str, **model_args: object) -> Model:
    return get_model(MODEL, base_url=base_url, api_key=API_KEY, memoize=False, **model_args)


def generate(model: Model, prompt: str = PROMPT, **config: object) -> ModelOutput:
    async def go() -> ModelOutput:
        try:
            return await model.generate([ChatMessageUser(content=prompt)],
                                        config=GenerateConfig(**config))
        finally:
            await model.api.aclose()

    return asyncio.run(go())


def sdk_sample(
    sc: tinker.SamplingClient, renderer: Renderer, params: types.SamplingParams,
    prompt: str = PROMPT,
) -> tuple[str, list[int], list[int]]:
    """The SDK's own reply text, sampled tokens and prompt tokens."""
    ids = renderer.build_generation_prompt([{"role": "user", "content": prompt}])
    seq = sc.sample(types.ModelInput.from_ints(ids), 1, params).result().sequences[0]
    message, _ = renderer.parse_response(list(seq.tokens))
    return message["content"], list(seq.tokens), ids


def test_eval_task_runs(base_url: str, tmp_path: Path) -> None:
    task = Task(dataset=[
        Sample(input="What is 2+2?", target="4"),
        Sample(input="Name a colour.", target="red"),
        Sample(input=PROMPT, target="fox"),
    ])
    # `base_url` goes through Inspect's own model_base_url: a "base_url" key in model_args
    # collides with get_model's argument of that name.
    logs = eval(task, model=MODEL, model_base_url=base_url, model_args={"api_key": API_KEY},
                log_dir=str(tmp_path / "logs"), display="none", max_tokens=8, seed=0)
    log = logs[0]
    assert log.status == "success", log.error
    assert log.samples is not None and len(log.samples) == 3
    for sample in log.samples:
        assert sample.output.completion.strip()
        usage = sample.output.usage
        assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    usage = log.stats.model_usage[MODEL]
    assert usage.input_tokens > 0 and usage.output_tokens > 0


def test_matches_sdk_sampling(base_url: str, service_client: tinker.ServiceClient,
                              renderer: Renderer) -> None:
    sc = service_client.create_sampling_client(base_model=TINY).result()
    stop = renderer.stop_sequences()
    # Greedy, then seeded temperature-1 sampling (which depends on every prompt token).
    for config in ({"temperature": 0.0, "seed": 11}, {"temperature": 1.0, "seed": 11}):
        out = generate(provider(base_url), max_tokens=10, **config)
        params = types.SamplingParams(max_tokens=10, stop=stop, **config)
        text, tokens, prompt_ids = sdk_sample(sc, renderer, params)
        assert out.completion == text
        assert out.usage is not None
        assert (out.usage.input_tokens, out.usage.output_tokens) == (len(prompt_ids), len(tokens))
    # The seed reaches the server: another seed gives another sample.
    other = generate(provider(base_url), max_tokens=10, temperature=1.0, seed=12)
    assert other.completion != text


def test_num_choices_and_top_k(base_url: str, service_client: tinker.ServiceClient,
                               renderer: Renderer) -> None:
    sc = service_client.create_sampling_client(base_model=TINY).result()
    out = generate(provider(base_url), max_tokens=6, temperature=1.0, seed=5, num_choices=3)
    assert len(out.choices) == 3 and out.usage is not None and out.usage.output_tokens == 18
    # top_k=1 is greedy whatever the temperature.
    topk = generate(provider(base_url), max_tokens=6, temperature=1.0, seed=5, top_k=1)
    greedy, _, _ = sdk_sample(sc, renderer, types.SamplingParams(
        max_tokens=6, temperature=0.0, stop=renderer.stop_sequences()))
    assert topk.completion == greedy


def test_model_path_is_used(base_url: str, service_client: tinker.ServiceClient, tokenizer,
                            renderer: Renderer) -> None:
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    datum = text_datum(tokenizer, SENTENCES[0])
    for _ in range(6):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    path = tc.save_weights_for_sampler("inspect-provider").result().path

    greedy = {"temperature": 0.0, "max_tokens": 12}
    base = generate(provider(base_url), **greedy)
    tuned = generate(provider(base_url, model_path=path), **greedy)
    sc = service_client.create_sampling_client(model_path=path).result()
    expected, _, _ = sdk_sample(sc, renderer, types.SamplingParams(
        stop=renderer.stop_sequences(), **greedy))
    assert tuned.completion == expected
    assert tuned.completion != base.completion


def test_stop_seqs_and_max_tokens(base_url: str) -> None:
    config = {"temperature": 1.0, "seed": 3, "max_tokens": 12}
    full = generate(provider(base_url), **config)
    assert full.usage is not None and full.usage.output_tokens == 12
    assert full.stop_reason == "max_tokens"
    # A stop string taken from the middle of the reply ends it there, and is left out.
    stop = full.completion[8:12]
    assert stop.strip()
    cut = generate(provider(base_url), stop_seqs=[stop], **config)
    assert cut.completion == full.completion[: full.completion.index(stop)]
    assert cut.stop_reason == "stop"
    assert cut.usage is not None and cut.usage.output_tokens < 12

    short = generate(provider(base_url), temperature=1.0, seed=3, max_tokens=3)
    assert short.usage is not None and 0 < short.usage.output_tokens <= 3
    assert full.completion.startswith(short.completion)


def test_tools_and_bad_args_are_rejected(base_url: str) -> None:
    model = provider(base_url)
    tool = ToolInfo(name="add", description="Add two numbers.")

    async def go() -> None:
        await model.generate("hi", tools=[tool], config=GenerateConfig(max_retries=0))

    with pytest.raises(ValueError, match="tool calling"):
        asyncio.run(go())
    with pytest.raises(ValueError, match="unknown tinsmith model args"):
        provider(base_url, modelpath="tinker://x")
    with pytest.raises(ValueError, match="renderer"):
        provider(base_url, renderer="llama3")


def test_base_url_and_key_from_environment(base_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", base_url)
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    out = generate(get_model(MODEL, memoize=False), max_tokens=2, temperature=0.0)
    assert out.usage is not None and out.usage.output_tokens == 2


def test_entry_point_registration(base_url: str) -> None:
    """A fresh interpreter finds the provider through the `inspect_ai` entry point alone."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="inspect_ai")}
    assert eps.get("tinsmith") == "tinsmith.cookbook.inspect_provider"
    code = (
        "import asyncio, json, sys\n"
        "from inspect_ai.model import get_model, GenerateConfig\n"
        "assert 'tinsmith.cookbook.inspect_provider' not in sys.modules\n"
        f"m = get_model({MODEL!r}, base_url=sys.argv[1], api_key={API_KEY!r})\n"
        "assert 'tinsmith.cookbook.inspect_provider' in sys.modules\n"
        "out = asyncio.run(m.generate('hi', config=GenerateConfig(max_tokens=2)))\n"
        "print(json.dumps([type(m.api).__name__, out.usage.output_tokens]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0"}
    proc = subprocess.run([sys.executable, "-c", code, base_url], capture_output=True,
                          check=False, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["TinsmithAPI", 2]
