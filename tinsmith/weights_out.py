"""`tinsmith checkpoints download|export`: a checkpoint's weights from a running server.

Over HTTP with the caller's API key, so a key gets only what it may see (another key's
checkpoint answers not-found): the signed file URLs of the checkpoint
(`.../external_weights_urls`), then the files, then a PEFT adapter folder or, with the base
model prepared locally as the server prepares it, a merged Hugging Face model folder
(tinsmith.engine.export).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from tinsmith.engine.checkpoint import OPTIMIZER_FILE
from tinsmith.scheduler.paths import parse_path
from tinsmith.types import NotFound, UserError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Remote:
    base_url: str
    api_key: str | None

    @classmethod
    def from_args(cls, base_url: str | None, api_key: str | None) -> Remote:
        return cls((base_url or os.environ.get("TINKER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/"),
                   api_key or os.environ.get("TINKER_API_KEY"))

    def _client(self) -> httpx.Client:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120)


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code == 404:
        raise NotFound(_detail(r))
    if r.status_code >= 400:
        raise UserError(f"the server answered {r.status_code}: {_detail(r)}", r.status_code)
    return r


def _detail(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail", r.text))
    except ValueError:
        return r.text


def fetch_checkpoint(remote: Remote, tinker_path: str) -> dict[str, bytes]:
    """The checkpoint's files, but its optimizer state (AdamW moments are no weights)."""
    ref = parse_path(tinker_path)
    with remote._client() as c:
        urls = _check(c.get(f"/api/v1/training_runs/{quote(ref.run_id, safe=':')}/checkpoints/"
                            f"{ref.kind}/{ref.name}/external_weights_urls")).json()["urls"]
        return {name: _check(c.get(url)).content
                for name, url in sorted(urls.items()) if name != OPTIMIZER_FILE}


def base_model_of(remote: Remote, tinker_path: str) -> str:
    with remote._client() as c:
        info = _check(c.post("/api/v1/weights_info", json={"tinker_path": tinker_path})).json()
    return str(info["base_model"])


def export_checkpoint(remote: Remote, tinker_path: str, out_dir: Path, *, merged: bool,
                      base_model_dir: Path | None = None) -> Path:
    """Write a PEFT adapter folder (or, `merged`, a merged HF model) into `out_dir`."""
    from tinsmith.engine.export import write_merged_model, write_peft_folder

    files = fetch_checkpoint(remote, tinker_path)
    if not merged:
        write_peft_folder(files, out_dir)
        return out_dir
    if base_model_dir is None:
        from tinsmith.models import resolve_model_dir

        base_model_dir = resolve_model_dir(base_model_of(remote, tinker_path))
    return write_merged_model(files, base_model_dir, out_dir)
