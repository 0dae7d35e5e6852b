"""Hosted model names (`meta-llama/Llama-3.2-1B`, `Qwen/Qwen3-8B`) found on this machine, offline.

Two places are searched, in this order:

1. `$TINSMITH_MODELS_DIR` (several folders may be given, separated by `os.pathsep`): a
   folder of `<org>/<name>/` model folders, each an ordinary HF folder with config.json;
2. the local Hugging Face cache, through huggingface_hub's own offline lookup
   (`snapshot_download(..., local_files_only=True)`, which never touches the network): the
   snapshot `refs/main` points at, under `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
   `~/.cache/huggingface/hub` (huggingface_hub.constants.HF_HUB_CACHE).

A name found in neither gets a UserError (catalog.resolve_model_dir) that lists where it
looked and how to get the model there once: `hf download <name>` on a machine with
network, or passing a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR_ENV = "TINSMITH_MODELS_DIR"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class LocalModel:
    name: str  # the hosted name, org/name
    path: Path  # the HF folder (a snapshot folder for the HF cache)
    source: str  # "models dir" or "HF cache"


def models_dirs() -> list[Path]:
    """The folders of `$TINSMITH_MODELS_DIR`, in order (none if unset)."""
    raw = os.environ.get(MODELS_DIR_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def hf_cache_dir() -> Path:
    """The HF hub cache huggingface_hub uses (read from its constants on every call, so a
    test or an embedding program may change it)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def find_in_models_dirs(name: str) -> LocalModel | None:
    if not _looks_like_repo_id(name):
        return None
    for root in models_dirs():
        folder = root / name
        if (folder / "config.json").is_file():
            return LocalModel(name, folder, "models dir")
    return None


def find_in_hf_cache(name: str) -> LocalModel | None:
    """The cached snapshot of repo `name` (its `main` revision) if it has a config.json."""
    if not _looks_like_repo_id(name):
        return None
    from huggingface_hub import snapshot_download

    try:
        # local_files_only: resolve refs/main -> snapshots/<rev> on disk, no HTTP at all.
        folder = Path(snapshot_download(name, local_files_only=True, cache_dir=hf_cache_dir()))
    except (OSError, ValueError):  # LocalEntryNotFoundError (an OSError), a bad repo id
        return None
    if not (folder / "config.json").is_file():
        return None
    return LocalModel(name, folder, "HF cache")


def find_local(name: str) -> LocalModel | None:
    """`name` in the models dirs, else in the HF cache, else None."""
    return find_in_models_dirs(name) or find_in_hf_cache(name)


def where_looked(name: str) -> list[str]:
    """Human-readable places `find_local` searched for `name`, for error messages."""
    places = [f"{root / name} ({MODELS_DIR_ENV})" for root in models_dirs()]
    if not models_dirs():
        places.append(f"no {MODELS_DIR_ENV} set")
    org, _, model = name.partition("/")
    places.append(f"{hf_cache_dir() / f'models--{org}--{model}'} (Hugging Face cache)")
    return places


def list_local() -> list[LocalModel]:
    """Every model folder in the models dirs and every cached model repo with a config.json
    in its `main` snapshot (else its newest); none of this touches the network."""
    found: list[LocalModel] = []
    for root in models_dirs():
        for config in sorted(root.glob("*/*/config.json")):
            found.append(LocalModel(f"{config.parent.parent.name}/{config.parent.name}",
                                    config.parent, "models dir"))
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return found
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        main = [r for r in repo.revisions if "main" in r.refs]
        rev = main[0] if main else max(repo.revisions, key=lambda r: r.last_modified)
        if (rev.snapshot_path / "config.json").is_file():
            found.append(LocalModel(repo.repo_id, rev.snapshot_path, "HF cache"))
    return found
