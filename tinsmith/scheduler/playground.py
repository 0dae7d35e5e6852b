"""The dashboard's playground: one completion of a text prompt from a base model or a
sampler checkpoint, through the service's ordinary sampling path.

Each caller (API key) gets one dashboard session and one sampling session per model it
samples, made on first use and reused, so playing does not pile up sessions; each completion
heartbeats the session, as the SDK does while a client lives, so the dashboard shows it
active while it is played with. A checkpoint path saved anew (deleted, then saved again
under the same name) gets a fresh sampling session, with the new weights. The model's
sampling backend tokenizes the prompt as the SDK's tokenizer does (`tokenizer.encode(text)`)
and sampling stops at the model's EOS tokens, as the SDK's default `stop`, so a seeded
request answers exactly what `SamplingClient.sample` answers for the same prompt and seed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np

from tinsmith.scheduler.access import Caller
from tinsmith.scheduler.futures import FutureStore
from tinsmith.scheduler.paths import PREFIX, CheckpointRef, parse_path
from tinsmith.scheduler.served import ModelHandle
from tinsmith.storage.db import CheckpointRow
from tinsmith.types import SampleOut, SampleSpec, UserError

MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class Completion:
    model: str  # what was asked: a base model name or a tinker:// path
    base_model: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stop_reason: str

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class _Sampler(Protocol):
    handle: ModelHandle


class SamplingService(Protocol):
    """What the playground uses of the service (tinsmith.scheduler.service.Service)."""

    futures: FutureStore

    def create_session(self, *, tags: list[str], user_metadata: None, display_name: str,
                       project_id: None, sdk_version: None, caller: Caller) -> str: ...
    def checkpoint(self, ref: CheckpointRef, caller: Caller | None = None) -> CheckpointRow: ...
    def model(self, name: str) -> ModelHandle: ...
    def create_sampling_session(self, *, session_id: str, sampling_session_seq_id: int,
                                base_model: str | None, model_path: str | None,
                                caller: Caller) -> str: ...
    def heartbeat(self, session_id: str, caller: Caller) -> None: ...
    def sampler(self, sampler_id: str, caller: Caller | None = None) -> _Sampler: ...
    def sample(self, sampler_id: str, seq_id: int, spec: SampleSpec) -> tuple[str, list[str]]: ...


class Playground:
    def __init__(self, svc: SamplingService) -> None:
        self.svc = svc
        self._lock = threading.Lock()
        self._sessions: dict[str | None, str] = {}  # caller's key id -> its dashboard session
        # (key id, model) -> (sampler id, when the checkpoint was saved; None: a base model)
        self._samplers: dict[tuple[str | None, str], tuple[str, datetime | None]] = {}
        self._seq = itertools.count()  # sampling_session_seq_id: unique in this process's sessions
        self._sample_seq = itertools.count()  # sample seq_id: unique per sampler of this process

    def _session(self, caller: Caller) -> str:
        with self._lock:
            sid = self._sessions.get(caller.owner)
        if sid is None:
            sid = self.svc.create_session(tags=["dashboard"], user_metadata=None,
                                          display_name="dashboard playground", project_id=None,
                                          sdk_version=None, caller=caller)
            with self._lock:
                sid = self._sessions.setdefault(caller.owner, sid)
        return sid

    def _sampler(self, caller: Caller, model: str) -> str:
        saved = None
        if model.startswith(PREFIX):
            saved = self.svc.checkpoint(parse_path(model), caller).created_at  # else 404
            base_model, model_path = None, model
        else:
            self.svc.model(model)  # unknown model: 400 naming the served ones
            base_model, model_path = model, None
        key = (caller.owner, model)
        with self._lock:
            cached = self._samplers.get(key)
        if cached is not None and cached[1] == saved:
            return cached[0]
        with self._lock:
            seq = next(self._seq)
        sampler_id = self.svc.create_sampling_session(
            session_id=self._session(caller), sampling_session_seq_id=seq, base_model=base_model,
            model_path=model_path, caller=caller)
        with self._lock:
            self._samplers[key] = (sampler_id, saved)
        return sampler_id

    async def complete(self, caller: Caller, *, model: str, prompt: str, max_tokens: int,
                       temperature: float, seed: int | None) -> Completion:
        if not prompt:
            raise UserError("prompt is empty: type some text to complete")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise UserError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        # The service's calls read the database: off the event loop.
        rid, handle, ids = await asyncio.to_thread(self._start, caller, model, prompt,
                                                   max_tokens, temperature, seed)
        done = False
        while not done:
            done, value, error = await self.svc.futures.wait(rid, 30.0, caller)
        if error is not None:
            raise UserError(error.message) if error.category == "user" else RuntimeError(error.message)
        assert isinstance(value, SampleOut)
        seq = value.sequences[0]
        tokens = [int(t) for t in seq.tokens]
        return Completion(model, handle.name, ids, tokens,
                          handle.sampler.decode(tokens), str(seq.stop_reason))

    def _start(self, caller: Caller, model: str, prompt: str, max_tokens: int,
               temperature: float, seed: int | None) -> tuple[str, ModelHandle, list[int]]:
        """Submit the sample request: (its request id, the model, the prompt's tokens)."""
        sampler_id = self._sampler(caller, model)
        self.svc.heartbeat(self._session(caller), caller)
        handle = self.svc.sampler(sampler_id, caller).handle
        ids = handle.sampler.encode(prompt)
        spec = SampleSpec(prompt=np.asarray(ids, dtype=np.int64), max_tokens=max_tokens,
                          temperature=temperature, seed=seed, stop_tokens=handle.eos_token_ids)
        rid, _ = self.svc.sample(sampler_id, next(self._sample_seq), spec)
        return rid, handle, ids
