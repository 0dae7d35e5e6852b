"""Server settings: one typed dataclass, built by the CLI or by `tinsmith.local(...)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path = Path("tinsmith-data")
    """Holds the SQLite metadata database and, by default, the checkpoint files."""
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    """Base models to serve (catalog names or local Hugging Face folders)."""
    host: str = "127.0.0.1"
    port: int = 8000
    allow_open: bool = False
    """Let `serve` listen on a non-loopback host while no API key exists (an open server:
    anyone who reaches it can use it). Without it such a server refuses to start."""
    database_url: str | None = None
    """SQLAlchemy URL; default sqlite:///<data_dir>/tinsmith.db."""
    storage_url: str | None = None
    """Checkpoint store (local folder or fsspec URL); default <data_dir>/checkpoints."""
    cache_dir: Path | None = None
    """Prepared base models; default $TINSMITH_CACHE or ~/.cache/tinsmith."""
    long_poll_s: float = 25.0
    """How long retrieve_future holds a request before answering try_again (< 45 s client timeout)."""
    fwdbwd_max_chunk_len: int = 1024
    """Datums per /forward_backward request the SDK may send (it splits bigger calls)."""
    max_sampler_adapters: int = 16
    """Sampler adapters kept in memory per base model (LRU)."""
    pass_tokens: int = 1024
    """Model-input tokens one training pass packs from different runs' requests (a single
    bigger request still runs, alone). Packing saves per-pass overhead, which matters for
    small requests; a pass's activation memory grows with its tokens (bench/multi_tenant.py
    prints the server's peak memory per row)."""
    checkpoint_sweep_s: float = 60.0
    """How often expired checkpoints (ttl_seconds) are deleted."""
    loss_modules: tuple[str, ...] = ()
    """Python modules (dotted names or .py paths) defining `LOSSES: dict[str, LossSpec]`,
    served beside the built-in losses."""
    stability_max_tokens: int = 8_000_000
    """Tokens of sampling records (record_stability_info) kept in memory, oldest dropped first."""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tinsmith.db').resolve()}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str((self.data_dir / "checkpoints").resolve())
