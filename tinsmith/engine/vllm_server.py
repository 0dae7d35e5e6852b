"""A vLLM OpenAI-compatible server as a child process, for the vLLM sampling backend.

vLLM pins its own torch and transformers, so it lives in its own virtual environment (made
by scripts/setup_vllm.sh, `.venv-vllm`) and Tinsmith talks to it over HTTP on a loopback
port. `VllmProcess.start` runs `python -m vllm.entrypoints.openai.api_server` from that
environment with LoRA enabled and runtime adapter loading allowed
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), then waits for its `/health`; `close` stops the whole
process group (vLLM spawns an engine-core and worker processes). A server given by URL
(`--vllm-url`) is not managed here at all: it must have been started with the same flags
and read the adapter folders this server writes (same filesystem).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tinsmith.engine.loopback import free_port

log = logging.getLogger("tinsmith.vllm")

# The CPU build's KV cache, in GiB (VLLM_CPU_KVCACHE_SPACE); a GPU build ignores it.
CPU_KV_CACHE_GIB = 2
# The name the base model is served under; adapters are served under their own names.
BASE_NAME = "base"
# Logged with the URL once a started server answers (tests read it).
UP_MESSAGE = "vLLM is up at %s"


@dataclass(frozen=True)
class VllmLaunch:
    """How to start a vLLM server for one base model."""

    python: Path  # the interpreter of vLLM's own environment
    model_dir: Path  # the base model's Hugging Face folder
    max_loras: int  # adapters one batch may mix (vLLM's --max-loras)
    max_cpu_loras: int  # adapters vLLM keeps loaded (its own LRU; more are re-read from disk)
    max_lora_rank: int  # the largest LoRA rank it accepts (--max-lora-rank)
    max_model_len: int  # prompt + sampled tokens, at most
    max_logprobs: int  # the most top-k logprobs a request may ask for (--max-logprobs)
    dtype: str = "float32"  # the native sampler computes in float32 on a CPU
    # Eager mode (no graph capture or compile at start): on a CPU, where the CPU build's
    # compile takes minutes; on a GPU vLLM captures its CUDA graphs.
    eager: bool = True
    tensor_parallel: int = 1  # vLLM's --tensor-parallel-size: a base that needs several GPUs
    log_file: Path | None = None
    start_timeout_s: float = 600.0  # a cold CPU start takes ~35 s alone, minutes when busy


def check_python(python: Path) -> None:
    """ValueError naming the fix when `python` is not an environment with vLLM."""
    if not Path(python).exists():
        raise ValueError(f"--sampler vllm: no Python at {python}; create vLLM's environment "
                         "with scripts/setup_vllm.sh, or pass --vllm-python or --vllm-url")
    probe = subprocess.run([str(python), "-c", "import vllm"], check=False, capture_output=True,
                           text=True, timeout=300)
    if probe.returncode != 0:
        raise ValueError(f"--sampler vllm: {python} cannot import vllm: "
                         f"{probe.stderr.strip().splitlines()[-1:] or probe.returncode}")


class VllmProcess:
    """A vLLM server started and owned by Tinsmith; `url` once `start` returned."""

    def __init__(self, launch: VllmLaunch) -> None:
        self.launch = launch
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        s = self.launch
        return [
            str(s.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(s.model_dir), "--served-model-name", BASE_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
            "--enable-lora", "--max-loras", str(s.max_loras),
            "--max-cpu-loras", str(max(s.max_cpu_loras, s.max_loras)),
            "--max-lora-rank", str(s.max_lora_rank), "--max-logprobs", str(s.max_logprobs),
            "--tensor-parallel-size", str(s.tensor_parallel), "--disable-log-stats",
        ] + (["--enforce-eager"] if s.eager else [])

    def start(self) -> str:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        # The parent's venv must not leak into vLLM's (its own torch, transformers).
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        out = open(self.launch.log_file, "ab") if self.launch.log_file else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting vLLM for %s: %s", self.launch.model_dir, " ".join(self.argv()))
        self._proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)  # its own group: close() stops all
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + self.launch.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self._proc.returncode} while starting"
                                   + (f"; see {self.launch.log_file}" if self.launch.log_file else ""))
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    log.info(UP_MESSAGE, self.url)
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"vLLM did not come up within {self.launch.start_timeout_s} s")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the server and its engine processes (SIGTERM to the group, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def default_python(root: Path | None = None) -> Path:
    """`.venv-vllm/bin/python` beside the Tinsmith checkout (scripts/setup_vllm.sh makes it),
    or next to the current working directory."""
    here = Path(__file__).resolve().parents[2]
    for base in (root, here, Path.cwd()):
        if base is not None and (base / ".venv-vllm" / "bin" / "python").exists():
            return base / ".venv-vllm" / "bin" / "python"
    return (root or here) / ".venv-vllm" / "bin" / "python"

