"""A rank of the sharded engine: one process, one shard of the base model and of every run.

`rank_main` is the spawned process's entry point: it joins the process group
(torch.distributed, gloo on CPUs, NCCL on GPUs), loads the base model through the ordinary
`ModelRunner` (LoRA layers injected as in one process), shards it with FSDP2 and then serves
the coordinator's commands from its pipe until told to stop or the pipe closes.

Sharding: `fully_shard` on each decoder layer, then on a small root module (`_Pass`) that
holds the causal LM and whose forward is one `runner.target_logprobs` call, so the root group
(embeddings, final norm, the tied or untied lm_head) is gathered for the whole pass, whatever
the runner calls inside. The LoRA layers' adapter slots are not module parameters, so FSDP
never sees them: each run's factors are sharded by hand as DTensors (shards.py).

Each command runs on every rank with the same arguments; rank 0's return value is the
answer (the others send None). An exception is sent back as the reply.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.device import DTYPES, Placement
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sharded.passes import sharded_pass
from tinsmith.engine.sharded.shards import ShardedRun
from tinsmith.types import FwdBwdOut, LoraSpec, NotFound, OptimizerConfig, OptimSpec, UserError

log = logging.getLogger("tinsmith.sharded")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting on a dead peer gives up


class _Pass(nn.Module):
    """The FSDP root: the causal LM as its child, one pass of the runner as its forward."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__()
        self.lm = runner.model
        self.__dict__["runner"] = runner  # not a submodule
        self.hidden: torch.Tensor | None = None  # the last pass's final hidden states
        runner.model.model.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, args, output) -> None:
        self.hidden = output.last_hidden_state

    def forward(self, rows, grad: bool, active, parts) -> list[torch.Tensor]:
        lps = self.runner.target_logprobs(rows, grad=grad, active=active, parts=parts)
        return [lp.clone() for lp in lps]  # views of one buffer: FSDP hooks outputs, not views


class RankEngine:
    """The commands a rank serves (see ShardedTrainer for their contracts)."""

    def __init__(self, runner: ModelRunner, root: _Pass, mesh, losses: LossRegistry) -> None:
        self.runner, self.root, self.mesh, self.losses = runner, root, mesh, losses
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.runs: dict[str, tuple[ShardedRun, int]] = {}  # run id -> (state, runner slot)

    def _answer(self, value):
        return value if self.rank == 0 else None

    def _put(self, run_id: str, full: Adapter) -> None:
        self.drop_run(run_id)
        state = ShardedRun(full, self.mesh)
        self.runs[run_id] = (state, self.runner.attach(state.full))

    def _run(self, run_id: str) -> ShardedRun:
        got = self.runs.get(run_id)
        if got is None:
            raise NotFound(f"training run {run_id!r} is not loaded on this server")
        return got[0]

    def _slot(self, run_id: str) -> int:
        self._run(run_id)  # NotFound for an unknown run
        return self.runs[run_id][1]

    def create_run(self, run_id: str, spec: LoraSpec, optimizer: OptimizerConfig) -> None:
        try:
            full = Adapter.create(spec, self.runner.layers, optimizer)  # seeded: equal on every rank
        except ValueError as e:
            raise UserError(str(e)) from e
        self._put(run_id, full)

    def drop_run(self, run_id: str) -> None:
        got = self.runs.pop(run_id, None)
        if got is not None:
            self.runner.detach(got[1])

    def forward_backward_many(self, works: Sequence[TrainWork], forward_only: bool
                              ) -> list[FwdBwdOut | Exception] | None:
        try:
            out = sharded_pass(
                works, forward_only=forward_only, slot_of=self._slot,
                losses=self.losses, compute=self.root, hidden=lambda: self.root.hidden,
                mark_grad=lambda r: setattr(self._run(r), "has_grad", True),
                rank=self.rank, world=self.world)
        finally:
            self.root.hidden = None
            for m in self.root.modules():  # free the gathered weights whatever happened
                if isinstance(m, FSDPModule):
                    m.reshard()
        return self._answer(out)

    def optim_step(self, run_id: str, params: OptimSpec) -> dict[str, float] | None:
        run = self._run(run_id)  # NotFound (a 404) as it is
        try:
            return self._answer(run.optim_step(params))
        except ValueError as e:  # params of the other optimizer family
            raise UserError(str(e)) from e

    def export_run(self, run_id: str, base_model: str, include_optimizer: bool) -> dict[str, bytes] | None:
        full = self._run(run_id).export(include_optimizer)  # collective: every rank gathers
        if self.rank != 0:
            return None
        return adapter_to_files(full, base_model, include_optimizer=include_optimizer)

    def load_run(self, run_id: str, files: Mapping[str, bytes], with_optimizer: bool,
                 optimizer: OptimizerConfig) -> LoraSpec | None:
        try:
            full = adapter_from_files(files, self.runner.layers, load_optimizer=with_optimizer,
                                      optimizer=optimizer)
        except ValueError as e:
            raise UserError(f"cannot load checkpoint: {e}") from e
        self._put(run_id, full)
        return self._answer(full.spec)

    def snapshot(self, run_id: str) -> tuple[LoraSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
        """The run's factors on the host, for the coordinator's sampler (rank 0 holds them
        whole: the compute copy is gathered)."""
        state = self._run(run_id)
        if self.rank != 0:
            return None
        return state.spec, {p: (w.A.detach().cpu().clone(), w.B.detach().cpu().clone())
                            for p, w in state.full.weights.items()}

    def resident(self) -> int:
        return self._answer(len(self.runs))


def _build(model_dir: Path, name: str, device_type: str, dtype: str,
           exact_packing: bool | None, local_rank: int) -> tuple[ModelRunner, _Pass, object]:
    world = dist.get_world_size()
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    # Loaded on the host first (FSDP moves each group to the mesh's device as it shards it).
    runner = ModelRunner(model_dir, name, Placement(torch.device("cpu"), DTYPES[dtype]),
                         exact_packing=exact_packing)
    if runner.moe_blocks:
        raise ValueError(f"{name}: mixture-of-experts models are not supported by the sharded engine yet")
    mesh = init_device_mesh(device_type, (world,))
    for layer in runner.model.model.layers:
        fully_shard(layer, mesh=mesh)
    root = _Pass(runner)
    fully_shard(root, mesh=mesh)
    runner.placement = Placement(device, DTYPES[dtype])  # where the pass's inputs go
    return runner, root, mesh


def rank_main(rank: int, world: int, conn: Connection, init_method: str, model_dir: str,
              name: str, device_type: str, dtype: str, exact_packing: bool | None,
              loss_modules: tuple[str, ...], local_rank: int | None = None) -> None:
    """A rank's process: join the group, build, then serve commands `(method, args)` until
    `None` or a closed connection (a pipe from the coordinator, or a socket to it for a rank
    a worker started: joiner.py). Replies: ("ok", value) or ("error", exception).
    `local_rank`: the rank's GPU index on its machine (default: `rank`)."""
    local_rank = rank if local_rank is None else local_rank
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the coordinator stops us
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=init_method,
                                rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        runner, root, mesh = _build(Path(model_dir), name, device_type, dtype, exact_packing,
                                    local_rank)
        engine = RankEngine(runner, root, mesh, LossRegistry.load(loss_modules))
    except BaseException as e:
        conn.send(("error", RuntimeError(f"rank {rank} failed to start: {type(e).__name__}: {e}")))
        raise
    conn.send(("ok", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the coordinator is gone
            break
        if msg is None:
            break
        method, args = msg
        try:
            reply = ("ok", getattr(engine, method)(*args))
        except Exception as e:  # noqa: BLE001 - the coordinator raises it for the caller
            reply = ("error", e)
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - an unpicklable value or exception
            conn.send(("error", RuntimeError(f"rank {rank}: {type(e).__name__}: {e}")))
    dist.destroy_process_group()
