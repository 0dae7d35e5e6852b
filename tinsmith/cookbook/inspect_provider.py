"""An Inspect AI model provider for Tinsmith (or hosted Tinker) sampling clients.

With `inspect-ai` installed (`pip install -e ".[inspect]"`), the `tinsmith` entry point in
the `inspect_ai` group registers the provider, so any Inspect task runs against a model
named `tinsmith/<base model name>`:

    inspect eval task.py --model tinsmith/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --model-base-url http://127.0.0.1:8000 \\
        -M model_path=tinker://<run>/sampler_weights/000010

or from Python:

    inspect_ai.eval(task, model="tinsmith/tinsmith/tiny-test",
                    model_base_url="http://127.0.0.1:8000", model_args={"api_key": "tml-x"})

Model args:

- `base_url`: the server. Inspect passes its own `--model-base-url` / `model_base_url=` /
  `get_model(base_url=...)` here, so give it that way: `-M base_url=...` (or a `base_url`
  key in `eval(model_args=...)`) collides with Inspect's own argument of that name and
  fails. Default: $TINKER_BASE_URL, else the SDK's default (the hosted Tinker service).
- `api_key`: default $TINKER_API_KEY, else "tml-local" (Tinsmith accepts any `tml-` key).
- `model_path`: a `tinker://.../sampler_weights/...` path to sample from; default: the
  base model named after `tinsmith/`.
- `renderer`: "chat_template" or "plain" (see `tinsmith.cookbook.renderers`); default:
  the chat template if the tokenizer has one, else plain `role: content` lines.
- `tokenizer`: a local folder or hub id to load the tokenizer from (see below).

Conversations become tokens through the renderer (`build_generation_prompt`), sampling
stops at the renderer's end-of-turn marker plus any `stop_seqs`, and the reply is parsed
back with `parse_response` and cut at the first `stop_seqs` string (Inspect providers
return text without the stop sequence). GenerateConfig maps to `SamplingParams`:
max_tokens (default 1024), temperature, top_p, top_k, stop_seqs, seed; num_choices is the
number of samples. Usage is the prompt's token count and the tokens sampled.

Tokenizer: the `tokenizer` model arg if given, else `SamplingClient.get_tokenizer()` (hub
download by the base model's name: works against hosted Tinker, or offline once cached),
else the tokenizer of a rank-1 LoRA training client for the base model:
`TrainingClient.get_tokenizer()` loads from the `tokenizer_id` the server reports, which
Tinsmith points at its local model folder, so this works offline. The fallback creates one
idle training run on the server per provider instance; it is not trained or saved.

Tools: Tinsmith models have no tool-calling format, so `generate` raises a ValueError when
tools are passed instead of silently answering without them (which would make an agentic
eval's scores meaningless). Text content only: images and other media raise as well.

The SDK's futures are awaited (`await sampling_client.sample(...)`), and the blocking
tokenizer load runs in a worker thread, so the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import tinker
from inspect_ai.model import (
    ChatCompletionChoice,
    ChatMessage,
    ChatMessageAssistant,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    StopReason,
    modelapi,
)
from inspect_ai.tool import ToolChoice, ToolInfo
from tinker import types

from tinsmith.cookbook.renderers import (
    ChatTemplateRenderer,
    Message,
    PlainRenderer,
    Renderer,
    get_renderer,
)

DEFAULT_API_KEY = "tml-local"
DEFAULT_MAX_TOKENS = 1024
_DEFAULT_CONFIG = GenerateConfig()
RENDERERS: dict[str, type[Renderer]] = {
    "chat_template": ChatTemplateRenderer,
    "plain": PlainRenderer,
}


class TinsmithAPI(ModelAPI):
    """Samples with the official `tinker` SDK from a base model or a `model_path`."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = _DEFAULT_CONFIG,
        model_path: str | None = None,
        renderer: str | None = None,
        tokenizer: str | None = None,
        **model_args: Any,
    ) -> None:
        super().__init__(
            model_name=model_name,
            base_url=base_url or os.environ.get("TINKER_BASE_URL") or None,
            api_key=api_key or os.environ.get("TINKER_API_KEY") or DEFAULT_API_KEY,
            api_key_vars=["TINKER_API_KEY"],
            config=config,
        )
        if model_args:
            raise ValueError(f"unknown tinsmith model args: {', '.join(sorted(model_args))}")
        if renderer is not None and renderer not in RENDERERS:
            raise ValueError(f"renderer must be one of {sorted(RENDERERS)}, got {renderer!r}")
        self.model_path = model_path
        self.renderer_name = renderer
        self.tokenizer_source = tokenizer
        self._service: tinker.ServiceClient | None = None
        self._sampler: tinker.SamplingClient | None = None
        self._renderer: Renderer | None = None
        self._locks: dict[int, asyncio.Lock] = {}  # per event loop (evals may use several)

    # --- lazy setup ---------------------------------------------------------------------

    async def _setup(self) -> tuple[tinker.SamplingClient, Renderer]:
        lock = self._locks.setdefault(id(asyncio.get_running_loop()), asyncio.Lock())
        async with lock:
            if self._sampler is None or self._renderer is None:
                service = tinker.ServiceClient(base_url=self.base_url, api_key=self.api_key)
                if self.model_path:
                    sampler = await service.create_sampling_client(model_path=self.model_path)
                else:
                    sampler = await service.create_sampling_client(base_model=self.model_name)
                tokenizer = await self._load_tokenizer(service, sampler)
                self._service, self._sampler = service, sampler
                self._renderer = (RENDERERS[self.renderer_name](tokenizer) if self.renderer_name
                                  else get_renderer(tokenizer))
            return self._sampler, self._renderer

    async def _load_tokenizer(
        self, service: tinker.ServiceClient, sampler: tinker.SamplingClient
    ) -> Any:
        if self.tokenizer_source:
            from transformers import AutoTokenizer

            return await asyncio.to_thread(AutoTokenizer.from_pretrained, self.tokenizer_source)
        try:
            return await asyncio.to_thread(sampler.get_tokenizer)
        except (OSError, ValueError):
            # Offline and not cached (OSError), or no tokenizer by that name: ask the server where the tokenizer lives.
            training = await service.create_lora_training_client(
                base_model=sampler.get_base_model(), rank=1)
            return await asyncio.to_thread(training.get_tokenizer)

    async def aclose(self) -> None:
        service, self._service, self._sampler, self._renderer = self._service, None, None, None
        if service is not None:
            await service.close("success")

    # --- ModelAPI -----------------------------------------------------------------------

    def max_tokens(self) -> int | None:
        return DEFAULT_MAX_TOKENS

    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput:
        if tools:
            raise ValueError(
                "the tinsmith provider does not support tool calling (Tinsmith models have no "
                f"tool-call format); remove the tools ({', '.join(t.name for t in tools)})")
        sampler, renderer = await self._setup()
        prompt = renderer.build_generation_prompt([_message(m) for m in input])
        user_stops = list(config.stop_seqs or [])
        params = types.SamplingParams(
            max_tokens=config.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if config.temperature is None else config.temperature,
            top_p=1.0 if config.top_p is None else config.top_p,
            top_k=-1 if config.top_k is None else config.top_k,
            seed=config.seed,
            stop=_stops(renderer, user_stops),
        )
        response = await sampler.sample(
            prompt=types.ModelInput.from_ints(prompt),
            num_samples=config.num_choices or 1,
            sampling_params=params,
        )
        choices = []
        for seq in response.sequences:
            message, _ = renderer.parse_response(list(seq.tokens))
            text = _cut(message["content"], user_stops)
            stop: StopReason = "max_tokens" if seq.stop_reason == "length" else "stop"
            choices.append(ChatCompletionChoice(
                message=ChatMessageAssistant(content=text, model=self.model_name,
                                             source="generate"),
                stop_reason=stop,
            ))
        output_tokens = sum(len(seq.tokens) for seq in response.sequences)
        return ModelOutput(
            model=self.model_name,
            choices=choices,
            usage=ModelUsage(input_tokens=len(prompt), output_tokens=output_tokens,
                             total_tokens=len(prompt) + output_tokens),
        )


def _message(message: ChatMessage) -> Message:
    if not isinstance(message.content, str) and any(c.type != "text" for c in message.content):
        raise ValueError("the tinsmith provider takes text content only")
    return {"role": message.role, "content": message.text}


def _stops(renderer: Renderer, user_stops: list[str]) -> list[str] | list[int]:
    """The renderer's end-of-turn stop plus `user_stops`. SamplingParams.stop takes either
    token ids or strings, so a token-id stop becomes its text when strings are added
    (Tinsmith matches stop strings on the decoded text, special tokens included)."""
    own = renderer.stop_sequences()
    if not user_stops:
        return own
    return [s if isinstance(s, str) else renderer.tokenizer.decode([s]) for s in own] \
        + user_stops


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to the first stop string, which Inspect providers leave out."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


@modelapi(name="tinsmith")
def tinsmith() -> type[ModelAPI]:
    return TinsmithAPI
