"""The vLLM sampling backend: a SamplingBackend (engine/backend.py) whose requests run in a
vLLM server (engine/vllm_server.py starts one, or one is given by URL), with its multi-LoRA.

Sampler adapters reach vLLM as PEFT folders (engine/export.py's `write_peft_folder`) under
`adapter_dir`, and are loaded by name on first use (`POST /v1/load_lora_adapter`):
- a snapshot of a training run (`put_snapshot`, save_weights_and_get_sampling_client) is
  turned into checkpoint files by `snapshot_files` and written at once; a newer snapshot
  under the same key gets a new vLLM name (`key#version`), so requests already running
  finish on the old weights and new ones see the new ones, with no restart;
- a stored sampler checkpoint is fetched with its `load` and written when first used.
At most `max_adapters` names stay loaded (LRU); an evicted name is unloaded
(`/v1/unload_lora_adapter`) once no request in flight uses it. A snapshot's folder stays on
disk after eviction (it has no other copy; the newest MAX_SNAPSHOT_FOLDERS), a stored
checkpoint's goes (it is fetched again).

Requests: `start_sample` checks the request (the native checks, then what vLLM cannot do:
vllm_requests.refusal), resolves its adapter and posts it from a thread pool; `step()`
waits briefly for answers and completes the ones that arrived, on the worker's thread, so
`pending`/`step()` keep the worker's contract (scheduler/worker.py). The worker thread calls
everything but `encode`/`decode`.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from tinsmith.engine.backend import FilesLoader, OnDone, WeightsSnapshot
from tinsmith.engine.checkpoint import CONFIG_FILE
from tinsmith.engine.export import write_peft_folder
from tinsmith.engine.validation import check_sample
from tinsmith.engine.vllm_requests import completion_body, error_of, refusal, sample_out
from tinsmith.engine.vllm_server import BASE_NAME, VllmProcess
from tinsmith.types import NotFound, SampleOut, SampleSpec, UserError

log = logging.getLogger("tinsmith.vllm")

# Snapshot folders kept on disk after their adapter left vLLM (as MAX_SPILLED_SAMPLERS natively).
MAX_SNAPSHOT_FOLDERS = 64
# How long one `step()` waits for an answer when none is ready (seconds): short, so that a
# job queued meanwhile waits at most this long.
STEP_WAIT_S = 0.02


@dataclass
class _Folder:
    """The newest weights of one sampler key: its folder and its vLLM name."""

    name: str  # the vLLM adapter name, `key#version`
    path: Path
    snapshot: bool  # True: no stored copy, the folder is the only one


@dataclass(frozen=True)
class VllmLimits:
    """What the vLLM server was started with (vllm_server.VllmLaunch), for clear refusals."""

    vocab_size: int
    max_context: int
    max_adapters: int
    max_lora_rank: int
    max_logprobs: int


class VllmSampler:
    """A SamplingBackend over a vLLM server at `url`; owns `process` when it started it."""

    def __init__(
        self, url: str, tokenizer, adapter_dir: Path, limits: VllmLimits,
        snapshot_files: Callable[[WeightsSnapshot], Mapping[str, bytes]],
        *, process: VllmProcess | None = None, concurrency: int = 256, timeout_s: float = 3600.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.limits = limits
        self._tokenizer = tokenizer
        self._snapshot_files = snapshot_files
        self._process = process
        self.adapter_dir = adapter_dir
        shutil.rmtree(adapter_dir, ignore_errors=True)  # folders never outlive their server
        adapter_dir.mkdir(parents=True, exist_ok=True)
        self._http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="vllm-request")
        self._done: queue.Queue[tuple[SampleOut | BaseException, OnDone, str, int]] = queue.Queue()
        self._folders: dict[str, _Folder] = {}  # sampler key -> its newest weights
        self._snapshots: OrderedDict[str, None] = OrderedDict()  # snapshot keys, oldest first
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # vLLM names loaded, LRU first
        self._retired: dict[str, Path | None] = {}  # names to unload when unused (folder to drop)
        self._inflight: Counter[str] = Counter()  # vLLM name -> requests in flight
        self._rows = 0  # sequences in flight
        self._versions = 0
        self.loads = 0  # adapters loaded into vLLM since start (metrics, tests)
        self.unloads = 0

    # ----- adapters -------------------------------------------------------------------
    def _new_folder(self, key: str, files: Mapping[str, bytes], snapshot: bool) -> _Folder:
        config = json.loads(bytes(files[CONFIG_FILE])) if CONFIG_FILE in files else {}
        rank = int(config.get("r", 0))
        if rank > self.limits.max_lora_rank:
            raise UserError(f"LoRA rank {rank} exceeds this vLLM sampler's --vllm-max-lora-rank "
                            f"({self.limits.max_lora_rank})")
        self._versions += 1
        name = f"{key}#{self._versions}"
        path = self.adapter_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)[-80:]}-{self._versions}"
        try:
            write_peft_folder(files, path)
        except ValueError as e:
            raise UserError(f"cannot load sampler weights: {e}") from e
        return _Folder(name, path, snapshot)

    def put_snapshot(self, key: str, snapshot: WeightsSnapshot) -> None:
        """Serve a training snapshot as sampler `key`: written as a PEFT folder now, loaded
        into vLLM by its first request; an older one under `key` is retired."""
        folder = self._new_folder(key, self._snapshot_files(snapshot), snapshot=True)
        old = self._folders.pop(key, None)
        if old is not None:
            self._retire(old.name, old.path)
        self._folders[key] = folder
        self._snapshots.pop(key, None)
        self._snapshots[key] = None
        while len(self._snapshots) > MAX_SNAPSHOT_FOLDERS:
            gone, _ = self._snapshots.popitem(last=False)
            f = self._folders.pop(gone, None)
            if f is not None:
                self._retire(f.name, f.path)

    def _adapter_name(self, key: str | None, load: FilesLoader | None) -> str:
        """The vLLM name serving `key`, loaded into vLLM if it is not (may evict another)."""
        if key is None:
            return BASE_NAME
        folder = self._folders.get(key)
        if folder is None:
            if load is None:
                raise NotFound(
                    f"sampler weights {key!r} are gone (the server keeps the newest "
                    f"{MAX_SNAPSHOT_FOLDERS} unsaved samplers); save them with "
                    "save_weights_for_sampler(name) to keep them")
            folder = self._new_folder(key, load(), snapshot=False)
            self._folders[key] = folder
        if folder.name not in self._loaded:
            self._load(folder)
        self._loaded.move_to_end(folder.name)
        return folder.name

    def _load(self, folder: _Folder) -> None:
        r = self._http.post(f"{self.url}/v1/load_lora_adapter",
                            json={"lora_name": folder.name, "lora_path": str(folder.path)})
        if r.status_code != 200:
            err = error_of(r.status_code, r.text)
            raise UserError(f"vLLM cannot load sampler weights: {err}") if r.status_code < 500 else err
        self.loads += 1
        self._loaded[folder.name] = folder.path
        while len(self._loaded) > self.limits.max_adapters:
            name, path = next(iter(self._loaded.items()))
            key = name.rsplit("#", 1)[0]
            current = self._folders.get(key)
            keep_folder = current is not None and current.name == name and current.snapshot
            if current is not None and current.name == name and not current.snapshot:
                del self._folders[key]  # a stored checkpoint: fetched again when next used
            self._retire(name, None if keep_folder else path)

    def _retire(self, name: str, drop: Path | None) -> None:
        """Unload `name` from vLLM (now, or when its last request ends) and delete `drop`."""
        if name not in self._loaded:
            if drop is not None:
                shutil.rmtree(drop, ignore_errors=True)
            return
        del self._loaded[name]
        self._retired[name] = drop
        self._unload_unused()

    def _unload_unused(self) -> None:
        for name in [n for n in self._retired if self._inflight[n] <= 0]:
            drop = self._retired.pop(name)
            r = self._http.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name})
            if r.status_code not in (200, 404):
                log.warning("vLLM did not unload %s: %s %s", name, r.status_code, r.text[:200])
            else:
                self.unloads += 1
            if drop is not None:
                shutil.rmtree(drop, ignore_errors=True)

    @property
    def loaded(self) -> list[str]:
        """The vLLM adapter names loaded now, least recently used first."""
        return list(self._loaded)

    # ----- requests -------------------------------------------------------------------
    def refusal(self, spec: SampleSpec) -> str | None:
        """Why this backend cannot serve `spec` (vllm_requests.refusal), for the scheduler's
        checks at submission (an HTTP 400), or None."""
        return refusal(spec, self.limits.max_logprobs)

    def start_sample(
        self, key: str | None, spec: SampleSpec, load: FilesLoader | None, on_done: OnDone
    ) -> None:
        """Check the request, resolve its adapter and post it; `on_done` is called by a later
        `step()`. What vLLM cannot serve raises UserError here."""
        check_sample(spec, self.limits.vocab_size, self.limits.max_context)
        why = self.refusal(spec)
        if why is not None:
            raise UserError(why)
        name = self._adapter_name(key, load)
        self._inflight[name] += 1
        rows = spec.num_samples
        self._rows += rows  # only the worker's thread touches it (here and in step())
        body = completion_body(name, spec)

        def run() -> None:
            try:
                r = self._http.post(f"{self.url}/v1/completions", json=body)
                out: SampleOut | BaseException = (
                    sample_out(r.json(), spec) if r.status_code == 200
                    else error_of(r.status_code, r.text))
            except Exception as e:  # noqa: BLE001 - reported to this request alone
                out = e
            self._done.put((out, on_done, name, rows))

        self._pool.submit(run)

    @property
    def pending(self) -> bool:
        """True while requests are in vLLM: `step()` collects their answers."""
        return self._rows > 0

    @property
    def rows(self) -> int:
        return self._rows

    def step(self) -> None:
        """Complete every request whose answer arrived, waiting up to STEP_WAIT_S for one."""
        try:
            items = [self._done.get(timeout=STEP_WAIT_S)]
        except queue.Empty:
            return
        while True:
            try:
                items.append(self._done.get_nowait())
            except queue.Empty:
                break
        for out, on_done, name, rows in items:
            self._rows -= rows
            self._inflight[name] -= 1
            if self._inflight[name] <= 0:
                del self._inflight[name]
            on_done(out)
        if self._retired:
            self._unload_unused()

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def close(self) -> None:
        """Stop taking answers and stop the vLLM server if this backend started it."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
        if self._process is not None:
            self._process.close()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)


def vllm_sampler(
    *, name: str, model_dir: Path, tokenizer, limits: VllmLimits, adapter_dir: Path,
    snapshot_files: Callable[[WeightsSnapshot], Mapping[str, bytes]],
    url: str | None = None, python: Path | None = None, dtype: str = "float32",
    eager: bool = True, tensor_parallel: int = 1, log_file: Path | None = None,
) -> VllmSampler:
    """The vLLM backend of base model `name`: on the server at `url`, or on one started from
    `python` (vLLM's own environment) and stopped by `close()`."""
    from tinsmith.engine.vllm_server import VllmLaunch, check_python, default_python

    process = None
    if url is None:
        python = python or default_python()
        check_python(python)
        process = VllmProcess(VllmLaunch(
            python=python, model_dir=model_dir, max_loras=limits.max_adapters,
            max_cpu_loras=limits.max_adapters, max_lora_rank=limits.max_lora_rank,
            max_model_len=limits.max_context, max_logprobs=limits.max_logprobs, dtype=dtype,
            eager=eager, tensor_parallel=tensor_parallel, log_file=log_file))
        url = process.start()
    else:
        try:
            models = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30).json()
        except (httpx.HTTPError, ValueError) as e:
            raise ValueError(f"--vllm-url {url}: no vLLM server answers there ({e})") from e
        served = [m.get("id") for m in models.get("data", [])]
        if BASE_NAME not in served:
            raise ValueError(f"--vllm-url {url} serves {served}; start it with "
                             f"--served-model-name {BASE_NAME} --enable-lora (docs/sampling.md)")
    log.info("sampling %s through vLLM at %s", name, url)
    return VllmSampler(url, tokenizer, adapter_dir, limits, snapshot_files, process=process)
