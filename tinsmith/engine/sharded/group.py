"""The coordinator's side of a rank group: spawn N rank processes, send each command to all of
them, gather the answers, and notice when one dies.

Commands travel over one `multiprocessing` pipe per rank (spawn context, so CUDA and gloo
start clean in every rank); the ranks talk among themselves only through torch.distributed.
Replies are awaited with `multiprocessing.connection.wait` on the pipes *and* the processes'
sentinels, so a rank that exits (killed, out of memory, a crash in a kernel) is seen at once
instead of leaving the coordinator waiting on a collective that will never finish: the whole
group is then killed (the survivors may be blocked in a collective with the dead rank) and the
call raises `GroupFailed`. A later `call` starts a fresh group.
"""

from __future__ import annotations

import logging
import socket
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import torch.multiprocessing as mp

from tinsmith.engine.sharded.rank import rank_main
from tinsmith.types import UserError

log = logging.getLogger("tinsmith.sharded")
START_TIMEOUT_S = 600.0  # loading a big model on every rank may take minutes
# After one rank failed with an engine error, how long the others may take to answer before
# the group counts as stuck (they may wait in a collective the failed rank never joins).
WEDGED_S = 60.0


class GroupFailed(RuntimeError):
    """A rank process died (or the group could not start): its training runs are lost."""


@dataclass(frozen=True)
class GroupSpec:
    """What every rank needs to build its shard (all picklable)."""

    world: int
    model_dir: str
    name: str
    device_type: str  # "cpu" (gloo) or "cuda" (NCCL, rank k on cuda:k)
    dtype: str  # a key of engine/device.py's DTYPES
    exact_packing: bool | None
    loss_modules: tuple[str, ...]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(10)


class RankGroup:
    """N live rank processes, or none (before the first call, and after a failure)."""

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self._procs: list = []
        self._conns: list[Connection] = []
        self.generation = 0  # how many groups were started: a run belongs to one generation
        self._finalizer: weakref.finalize | None = None

    @property
    def alive(self) -> bool:
        return bool(self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Spawn the ranks and wait until each has its shard (GroupFailed otherwise)."""
        ctx = mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{_free_port()}"
        s = self.spec
        for rank in range(s.world):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=rank_main, name=f"tinsmith-rank-{rank}", daemon=True,
                            args=(rank, s.world, theirs, init, s.model_dir, s.name, s.device_type,
                                  s.dtype, s.exact_packing, s.loss_modules))
            p.start()
            theirs.close()
            self._procs.append(p)
            self._conns.append(ours)
        self.generation += 1
        # Never outlive the coordinator's object (nor the interpreter): daemon processes are
        # also killed by multiprocessing at exit.
        self._finalizer = weakref.finalize(self, _kill, list(self._procs))
        self._collect(timeout=START_TIMEOUT_S)
        log.info("sharded engine: %d ranks up (%s, generation %d)", s.world, s.device_type,
                 self.generation)

    def call(self, method: str, *args: object) -> object:
        """Run `method(*args)` on every rank; rank 0's value, or the exception rank 0 (else
        any rank) raised. GroupFailed when a rank died: the group is gone."""
        if not self._procs:
            self.start()
        try:
            for c in self._conns:
                c.send((method, args))
        except (BrokenPipeError, OSError):
            pass  # a dead rank: _collect sees its sentinel and fails the group
        return self._collect(timeout=None)

    def _collect(self, timeout: float | None) -> object:
        """Every rank's reply to the last command (`timeout`: for all of them, None = no
        limit). A rank that failed with an engine error (not a UserError, which every rank
        raises alike) while others still compute may have left them in a collective it will
        never join: they get WEDGED_S more to answer, then the group fails."""
        replies: dict[int, tuple[str, object]] = {}
        waiting = {c: i for i, c in enumerate(self._conns)}
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
        wedged: float | None = None  # deadline once a rank failed alone
        while waiting:
            limits = [t for t in (timeout, None if wedged is None else wedged - time.monotonic())
                      if t is not None]
            ready = wait([*waiting, *sentinels], max(0.0, min(limits)) if limits else None)
            if not ready:
                late = sorted(waiting.values())
                if wedged is not None:
                    bad = next(i for i, (st, _) in replies.items() if st == "error")
                    self._fail(f"rank {bad} failed ({replies[bad][1]!r}) and ranks {late} did "
                               f"not answer within {WEDGED_S:.0f} s after it")
                self._fail(f"ranks {late} did not answer within {timeout:.0f} s")
            for r in ready:
                if r in waiting:
                    i = waiting.pop(r)
                    try:
                        replies[i] = r.recv()
                    except (EOFError, OSError):
                        continue  # its sentinel follows
                    if timeout is not None and replies[i][0] == "error":  # starting: fail fast
                        self._fail(str(replies[i][1]))
                    if replies[i][0] == "error" and not isinstance(replies[i][1], UserError):
                        wedged = wedged or time.monotonic() + WEDGED_S
                elif r in sentinels:
                    i = sentinels.pop(r)
                    if i not in replies:
                        self._procs[i].join(1)
                        code = self._procs[i].exitcode
                        self._fail(f"rank {i} (pid {self._procs[i].pid}) exited with code {code}")
        status, value = replies[0]
        if status == "error":
            raise value  # type: ignore[misc]
        odd = [(i, v) for i, (st, v) in sorted(replies.items()) if st == "error"]
        if odd:  # rank 0 succeeded where another failed: their states may differ now
            log.error("rank %d failed alone: %r", odd[0][0], odd[0][1])
            self._fail(f"rank {odd[0][0]} failed alone: {type(odd[0][1]).__name__}: {odd[0][1]}")
        return value

    def _fail(self, why: str) -> None:
        self.stop(force=True)
        raise GroupFailed(f"the sharded engine failed: {why}")

    def stop(self, force: bool = False) -> None:
        """Stop the ranks (politely unless `force`), within seconds; idempotent."""
        procs, conns = self._procs, self._conns
        self._procs, self._conns = [], []
        if not force:
            for c in conns:
                try:
                    c.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for p in procs:
                p.join(10)
        _kill(procs)
        for c in conns:
            c.close()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
