"""The static-shape decoding step over the KV slab, captured in CUDA graphs on a GPU.

A decoding step on a GPU is launch-bound: a few hundred small kernels per step, whatever
the batch. A CUDA graph replays them all with one launch, but only for fixed shapes and
addresses, so this step reads every input from static buffers and computes over fixed
shapes:

- rows are padded to a bucket Bp (1, 2, 4, 8, ..., the power of two >= B); a padded row
  feeds token 0 at position 0, writes column 0 of a scratch slab row (a free row below H)
  and its outputs are ignored;
- attention reads the slab's [H, Hkv, Wb, D] view, H and Wb the powers of two >= the
  eager step's hi and W (Wb >= 64): at most twice what the eager step reads, in a few
  shapes. It is masked per slab row by `limit` [H]: a live row attends to its columns
  [0, len] (the one written now included), every other row to column 0 only;
- the LoRA delta comes from the static adapter-slot table (engine/bgmv.py) through a
  per-row one-hot [Bp, N], so any mix of adapters runs in the same shapes.

Static buffers (per shape): tok, pos, rows [Bp] long, onehot [Bp, N] (model dtype),
limit [H] long; output logits [Bp, V] (model dtype). One step per shape (Bp, H, Wb) is kept
for the current slab tensors and table generation; when the slab grows (new tensors) or the
table grows (N or r), every step is rebuilt and its graph recaptured lazily.

On CUDA (`capture=True`) a step is captured with `torch.cuda.CUDAGraph` the first time its
bucket is used (after warm-up runs on a side stream, as torch's docs require; the warm-ups
are real steps on the same inputs, so their cache writes are the ones the replay makes),
then replayed. Graphs share one memory pool: each replay's logits are copied to the host
before the next replay. Elsewhere (`capture=False`, the CPU tests) the same step runs
eagerly; a capture that fails is logged and the static step then runs eagerly. Models with
mixture-of-experts blocks (data-dependent routing) or a vision tower (per-request RoPE
offsets) keep the eager slab step (`supported`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from tinsmith.engine.bgmv import SlotTable, pow2
from tinsmith.engine.kv_cache import SlabCache, route_of
from tinsmith.engine.runner import ModelRunner

log = logging.getLogger("tinsmith.graph_decode")

# ServerSettings.sampler_cuda_graphs: "auto" = on when the model runs on CUDA.
CUDA_GRAPH_MODES = ("auto", "on", "off")

# The narrowest attention view (columns) a static step reads: fewer shapes to capture.
MIN_WIDTH = 64


def graphs_wanted(mode: str, device: torch.device) -> bool:
    """Whether the static step is used for `mode` on `device` ("on" on a CPU: eagerly)."""
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"sampler_cuda_graphs must be one of {CUDA_GRAPH_MODES}, not {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def bucket_of(rows: int) -> int:
    """The padded row count of a step of `rows` rows: the power of two >= rows."""
    return pow2(rows)


class _Step:
    """Static buffers of one bucket, and its graph once captured."""

    def __init__(self, bucket: int, slab_rows: int, width: int, table_slots: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.bucket, self.hi, self.width = bucket, slab_rows, width  # Bp, H, Wb
        self.tok = torch.zeros(bucket, dtype=torch.long, device=device)  # [Bp] token fed
        self.pos = torch.zeros(bucket, dtype=torch.long, device=device)  # [Bp] its position = column
        self.rows = torch.zeros(bucket, dtype=torch.long, device=device)  # [Bp] its slab row
        self.limit = torch.ones(slab_rows, dtype=torch.long, device=device)  # [H] columns attended
        self.onehot = torch.zeros(bucket, max(table_slots, 1), dtype=dtype, device=device)  # [Bp, N]
        self.logits: torch.Tensor | None = None  # [Bp, V], the graph's output once captured
        self.graph: torch.cuda.CUDAGraph | None = None


class GraphDecoder:
    """Static decode steps for one runner's model; used by SlabBatch when graphs are on."""

    def __init__(self, runner: ModelRunner, capture: bool, min_bucket: int = 1) -> None:
        self.runner = runner
        self.capture = capture  # True: CUDA graphs; False: the same step, eagerly
        self.min_bucket = min_bucket  # pad every step to at least this many rows (tests)
        self.table = SlotTable(runner.layers, runner.dtype, runner.device)
        self.route = route_of(runner.model)
        self._steps: dict[tuple[int, int, int], _Step] = {}  # (Bp, H, Wb) -> its static step
        self._key: tuple | None = None  # (slab tensor, S, C, table generation) of _steps
        self._pool = None  # the graphs' shared memory pool
        # Counters for tests and logs: static steps run, step sets rebuilt (slab or table
        # grew), graphs captured.
        self.steps = self.rebuilds = self.captures = 0

    @staticmethod
    def supported(runner: ModelRunner) -> bool:
        """Dense text models only (see the module docstring)."""
        return runner.vision is None and not runner.moe_blocks

    def step(self, slab: SlabCache, tokens: torch.Tensor, lens: torch.Tensor,
             slab_rows: Sequence[int], slots: Sequence[int | None]) -> torch.Tensor:
        """Feed batch row b token tokens[b] at position lens[b] (host [B] long tensors) into
        slab row slab_rows[b] under adapter slots[b]; fp32 logits [B, V] on the host. Grows
        the slab when the step's view needs more rows or columns."""
        b = len(slab_rows)
        bucket = bucket_of(max(b, self.min_bucket))
        used = set(slab_rows)
        hi = max(slab_rows) + 1
        h = pow2(hi)
        if bucket > b and len(used) >= h:  # padded rows need a free (scratch) row below H
            h = pow2(hi + 1)
        width = pow2(max(int(lens.max()) + 1, MIN_WIDTH))
        slab.reserve(h, width)
        s, c = slab.capacity
        scratch = next((r for r in range(h - 1, -1, -1) if r not in used), 0)
        table_idx = self.table.assign(slots)
        key = (slab.k, s, c, self.table.generation)  # the tensor by identity, the rest by value
        if self._key is None or self._key[0] is not slab.k or self._key[1:] != key[1:]:
            self._steps.clear()  # new slab tensors or table: every graph is stale
            self._key = key
            self.rebuilds += 1
        st = self._steps.get((bucket, h, width))
        if st is None:
            st = self._steps[(bucket, h, width)] = _Step(bucket, h, width, self.table.n, self.runner.dtype,
                                                         self.runner.device)
        # The host-side inputs, padded to the bucket, then one copy each into the buffers.
        pad = bucket - b
        rows = torch.tensor(list(slab_rows) + [scratch] * pad, dtype=torch.long)
        limit = torch.ones(h, dtype=torch.long)
        limit[rows[:b]] = lens + 1
        onehot = torch.zeros(st.onehot.shape, dtype=st.onehot.dtype)
        idx = torch.tensor(table_idx, dtype=torch.long)
        live = idx >= 0
        onehot[torch.arange(b)[live], idx[live]] = 1
        st.tok.copy_(torch.cat([tokens, tokens.new_zeros(pad)]))
        st.pos.copy_(torch.cat([lens, lens.new_zeros(pad)]))
        st.rows.copy_(rows)
        st.limit.copy_(limit)
        st.onehot.copy_(onehot)
        if self.capture and st.graph is None:
            try:
                self._capture(st, slab)
            except Exception:  # a capture failure costs speed, not the request
                log.exception("CUDA graph capture failed; decoding with the eager static step from now on")
                self.capture = False
                self._steps.clear()
                self._key = None
                return self.step(slab, tokens, lens, slab_rows, slots)
        if self.capture:
            assert st.graph is not None and st.logits is not None
            st.graph.replay()
            logits = st.logits
        else:
            logits = self._run(st, slab)
        if not self.steps:
            log.info("%s: first static decode step (%s)", self.runner.name,
                     "CUDA graphs" if self.capture else "run eagerly")
        self.steps += 1
        return logits[:b].float().cpu()

    def _run(self, st: _Step, slab: SlabCache) -> torch.Tensor:
        """The step itself, on the static buffers only: logits [Bp, V] in the model's dtype."""
        h, w = st.hi, st.width
        dev = st.tok.device
        slab.prepare(st.rows, st.pos, h, w)  # write index, computed on the device; view [H, Wb]
        route = self.route
        route.rows, route.hi, route.identity = st.rows, h, False
        route.mask = (torch.arange(w, device=dev)[None, :] < st.limit[:, None])[:, None, None, :]  # [H,1,1,Wb]
        ctx = self.runner.ctx
        if self.table.n:
            self.table.onehot = st.onehot
            ctx.table = self.table
        try:
            with ctx.rows([]):  # no row groups: the table (or nothing) gives the LoRA delta
                out = self.runner.model(
                    input_ids=st.tok[:, None], position_ids=st.pos[:, None],
                    past_key_values=slab, use_cache=True,
                )
        finally:
            route.rows = route.mask = None
            slab.flat_dev = None
            ctx.table = None
            self.table.onehot = None
        return out.logits[:, -1]

    def _capture(self, st: _Step, slab: SlabCache) -> None:
        """Warm up on a side stream, then capture the step into st.graph (CUDA only)."""
        current = torch.cuda.current_stream(st.tok.device)
        side = torch.cuda.Stream(st.tok.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(st, slab)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other models' worker threads may use the device meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            st.logits = self._run(st, slab)
        st.graph = graph
        self.captures += 1
