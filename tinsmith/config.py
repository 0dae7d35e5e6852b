"""Server settings: one typed dataclass, built by the CLI or by `tinsmith.local(...)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MAX_REQUEST_TOKENS = 1_000_000


@dataclass(frozen=True)
class Prices:
    """What usage costs, in USD, for the billing report (docs/operating.md, "Accounting").
    All 0 by default: usage is still counted, only its cost reads 0."""

    train_per_mtok: float = 0.0
    """Per million tokens of forward_backward."""
    forward_per_mtok: float = 0.0
    """Per million tokens of forward (no backward pass)."""
    prefill_per_mtok: float = 0.0
    """Per million prompt tokens of sampling requests (each prompt prefilled once)."""
    sample_per_mtok: float = 0.0
    """Per million tokens sampled (generated)."""
    storage_per_gb_month: float = 0.0
    """Per GB (10^9 bytes) of stored checkpoints per month (720 hours)."""

    @classmethod
    def parse(cls, items: Sequence[str]) -> Prices:
        """From `KIND=USD` items (`train=0.4`, `sample=1.2`...; KIND is a field less its
        unit). Raises ValueError naming the bad item."""
        units = {f.name.rsplit("_per_", 1)[0]: f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for item in items:
            kind, _, usd = item.partition("=")
            try:
                price = float(usd)
            except ValueError:
                price = -1.0
            if kind.strip() not in units or not 0 <= price < float("inf"):
                raise ValueError(f"invalid price {item!r}: use KIND=USD with KIND one of "
                                 + ", ".join(units) + " and USD a number >= 0")
            values[units[kind.strip()]] = price
        return cls(**values)


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
    sampler_kv_cache: str = "slab"
    """How sampling decodes (docs/sampling.md): "slab", a preallocated KV cache that rows
    join and leave without copying the others' cache, or "dynamic", the Hugging Face
    DynamicCache batch (the old path, kept for comparison)."""
    sampler_cuda_graphs: str = "auto"
    """Sampling's decoding step in static shapes, replayed from CUDA graphs per batch-size
    bucket (docs/sampling.md): "auto" (on when the model runs on CUDA), "on" (on a CPU the
    static step runs eagerly), "off" (the eager slab step)."""
    prefill_chunk_tokens: int = 512
    """A sampling prompt longer than this is prefilled in chunks of this many tokens, one
    chunk per decoding step of the rows in flight, so it does not stall them. 0: whole."""
    sampler: str = "native"
    """Which engine samples: "native" (Tinsmith's own sampler) or "vllm", a vLLM server with
    its multi-LoRA (docs/sampling.md "vLLM as the sampler"); training stays native."""
    vllm_url: str | None = None
    """With sampler "vllm": an existing vLLM server's URL; None starts one per model."""
    vllm_python: Path | None = None
    """With sampler "vllm" and no URL: the Python of vLLM's own environment; None:
    `.venv-vllm/bin/python` (scripts/setup_vllm.sh makes it)."""
    vllm_max_lora_rank: int = 64
    """The largest LoRA rank the vLLM sampler loads (vLLM's --max-lora-rank)."""
    vllm_max_logprobs: int = 64
    """The most top-k logprobs a request may ask the vLLM sampler for (--max-logprobs)."""
    vllm_tensor_parallel: int = 1
    """GPUs the vLLM sampler a Tinsmith server starts spreads the base model over (vLLM's
    --tensor-parallel-size): the sampling side of a model too big for one GPU."""
    device: str = "auto"
    """Where base models run: "auto" (the first CUDA GPU when there is one, else the CPU),
    "cuda", "cuda:N" or "cpu" (engine/device.py)."""
    dtype: str = "auto"
    """The base model's dtype: "auto" (bfloat16 on a GPU, float32 on a CPU), "bfloat16",
    "float16" or "float32". LoRA factors and optimizer state are float32 whatever it is."""
    devices: int = 1
    """Devices each served model's training is sharded over (FSDP2, docs/scale-out.md): 1 is
    the single-process engine; N > 1 spawns N rank processes, one per GPU (cuda:0..N-1, NCCL)
    when `device` is a GPU, else N CPU processes (gloo). Sampling stays in the server process."""
    group_listen: str | None = None
    """HOST:PORT where `tinsmith worker --join` processes on other machines join the rank
    group (docs/scale-out.md, "Several machines"): `local_ranks` of the `devices` ranks run
    here, the others on workers. None: every rank is spawned on this machine."""
    local_ranks: int = 1
    """With `group_listen`: ranks spawned on this machine (rank 0 among them), 1..devices-1."""
    group_token: bytes | None = field(default=None, repr=False)
    """The shared secret workers must prove to join (TINSMITH_GROUP_TOKEN or
    --group-token-file); required with `group_listen`."""
    group_join_timeout_s: float = 600.0
    """How long starting a group waits for the workers' ranks before failing with a message
    naming how many joined."""
    replicas: int = 1
    """Engine replicas per served model (docs/scale-out.md, Replicas): M > 1 starts M
    independent rank groups of `devices` ranks each (replica k on GPUs [k*devices,
    (k+1)*devices), or CPU processes); each training run lives on one, placed by load and
    moved when loads are uneven. 1: one engine, as without the option."""
    sharded: bool = False
    """Train through the rank-group engine even when `devices` is 1 (one rank process): the
    group path without sharding, to measure its overhead against the single-process engine
    (bench/gpu). Always the case when `devices` > 1."""
    exact_packing: bool | None = None
    """Packed passes compute every request's products on its own block, bitwise equal to the
    request alone (slower on a GPU). None: on a CPU only, where it costs nothing measurable;
    False shares the base GEMMs across requests (equal within float tolerance)."""
    compile_passes: bool = False
    """Shared training passes run their decoder layers through `torch.compile` (dense text
    models; engine/compiled.py). The first passes compile (seconds to minutes); later ones
    launch fewer, fused kernels. Off by default: not yet measured on a GPU."""
    pack_linger_ms: float | None = None
    """How long a small training pass may wait for runs that were just in a pass and have
    nothing queued (they are between a result and their next request), so they share it
    instead of needing a pass of their own. None: 10 ms on a GPU, where a small pass costs
    about the same whatever it holds; 0 (never wait) on a CPU, where a pass's cost grows
    with what it holds."""
    pass_tokens: int | None = None
    """Padded tokens (rows x longest row) one training pass may hold: what a pass packs from
    different runs' requests, and the micro-batch size a bigger request is split into.
    None derives it per model from the memory free at load time (engine/budget.py)."""
    pass_memory_fraction: float | None = None
    """With `pass_tokens` None: the share of free memory one pass's activations may take.
    None: 0.25 on a CPU (where a pass is capped at 1024 tokens anyway), 0.5 on a GPU, where
    a pass split into micro-batches costs an extra forward and the estimate is already about
    1.2x what a bf16 pass measured (docs/gpu.md)."""
    max_resident_adapters: int | None = None
    """Training runs per model kept in memory; idle runs beyond it are spilled to
    `<data_dir>/spill` (weights, gradients, optimizer state, bit-exact) and restored on use.
    None derives it from free memory at load time (a quarter of it, at rank 32)."""
    checkpoint_sweep_s: float = 60.0
    """How often expired checkpoints (ttl_seconds) are deleted."""
    download_url_ttl_s: float = 3600.0
    """How long the signed checkpoint-file URLs (get_external_weights_urls) stay valid."""
    max_concurrent: int | None = None
    """Default per-key limit on requests not yet completed (queued or running); over it a
    request gets 429. None: unlimited. A key's own limit (tinsmith keys limits) wins."""
    max_request_tokens: int | None = DEFAULT_MAX_REQUEST_TOKENS
    """Default per-key limit on one request's tokens (forward/forward_backward: all datums;
    sample: prompt + max_tokens * num_samples); over it, 413. None: unlimited."""
    max_stored_bytes: int | None = None
    """Default per-key limit on the bytes of its stored checkpoints; a save past it fails
    (413 at submission, or a "user" future error). None: unlimited."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest HTTP request body accepted; bigger ones get 413 before being parsed."""
    max_image_bytes: int = 16 * 1024 * 1024
    """Largest encoded image (PNG or JPEG bytes) one image chunk may hold; over it, 400."""
    max_image_pixels: int = 4096 * 4096
    """Most pixels (width x height, read from the image header before decoding) of one image
    chunk; over it, 400. The model's image processor then resizes within its own pixel range."""
    seq_gap_timeout_s: float | None = 10.0
    """A training run's requests waiting behind a seq_id the client never sent (e.g. after
    its own client-side validation error) are released, and that seq_id skipped, once the
    run has had no new request for this long; 60 s at least after a 429/5xx the SDK will
    retry (tinsmith/scheduler/ordering.py). None or 0: wait forever."""
    loss_modules: tuple[str, ...] = ()
    """Python modules (dotted names or .py paths) defining `LOSSES: dict[str, LossSpec]`,
    served beside the built-in losses."""
    stability_max_tokens: int = 8_000_000
    """Tokens of sampling records (record_stability_info) kept in memory, oldest dropped first."""
    debug_slow_writes_s: float = 0.0
    """Testing only: pause this long after each checkpoint file is written, so a test can kill
    the server mid-write. `tinsmith serve` reads it from TINSMITH_DEBUG_SLOW_WRITES_S."""
    metric_history_points: int = 10_000
    """Training metric points (forward_backward, optim_step) kept in memory per run for the
    dashboard's curves (GET /api/v1/training_runs/{id}/metrics), oldest dropped first."""

    prices: Prices = Prices()
    """Prices of usage, for the cost in billing reports (`tinsmith serve --price KIND=USD`)."""
    auth_token_ttl_s: float = 3600.0
    """How long a token from POST /api/v1/auth/token (the SDK's JWT mode) stays valid."""
    accounting_flush_s: float = 5.0
    """How often usage counts and audit entries gathered in memory are written to the
    database (also at shutdown); a killed server loses at most this much of them."""

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tinsmith.db').resolve()}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str((self.data_dir / "checkpoints").resolve())
