"""The coordinator's side of a rank group: spawn N rank processes, send each command to all of
them, gather the answers, and notice when one dies.

Commands travel over one `multiprocessing` pipe per rank (spawn context, so CUDA and gloo
start clean in every rank); the ranks talk among themselves only through torch.distributed.
Replies are awaited with `multiprocessing.connection.wait` on the pipes *and* the processes'
sentinels, so a rank that exits (killed, out of memory, a crash in a kernel) is seen at once
instead of leaving the coordinator waiting on a collective that will never finish: the whole
group is then killed (the survivors may be blocked in a collective with the dead rank) and the
call raises `GroupFailed`. A later `call` starts a fresh group.

With `GroupSpec.listen` the group spans machines: ranks `0 .. local_ranks-1` are spawned here
as above, the others are started by `tinsmith worker` processes that joined through a
`JoinDesk` (desk.py) and connect back, one socket per rank, carrying the same commands as a
pipe. A remote rank's connection closing, or its worker's (or the worker's heartbeats
stopping), fails the group exactly like a local rank's sentinel; the next call starts a new
group from the workers joined by then (waiting up to `join_timeout_s` for them).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import NoReturn

import torch.multiprocessing as mp

from tinsmith.engine.loopback import free_port
from tinsmith.engine.sharded.desk import Assignment, JoinDesk
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
    # Several machines (desk.py): listen on HOST:PORT for `tinsmith worker --join`; ranks
    # 0..local_ranks-1 are spawned here (rank 0 hosts the torch.distributed store), the
    # others come from workers. None: every rank is local (the fields below are unused).
    listen: str | None = None
    local_ranks: int = 1
    token: bytes | None = field(default=None, repr=False)  # the shared secret joins prove
    join_timeout_s: float = 600.0  # how long a start waits for the workers' ranks

    @property
    def remote_ranks(self) -> int:
        return self.world - self.local_ranks if self.listen else 0


@dataclass(frozen=True)
class GroupState:
    """The group as /readyz reports it."""

    state: str  # "up", "starting", or "down" (not started yet, or failed)
    world: int
    remote_expected: int  # ranks that come from workers (0: a one-machine group)
    remote_joined: int  # of those, offered by the workers connected now
    generation: int
    last_failure: str | None

    @property
    def ready(self) -> bool:
        """A training request can be served without waiting for anyone to join: the group
        is up, or a start would find all its ranks (a local group restarts on demand)."""
        return self.state == "up" or (self.state == "down"
                                      and self.remote_joined >= self.remote_expected)

    def describe(self) -> str:
        joined = (f"; {self.remote_joined} of {self.remote_expected} remote rank(s) joined"
                  if self.remote_expected else "")
        failed = f"; last failure: {self.last_failure}" if self.last_failure else ""
        then = ("" if self.state != "down" else
                "; starts on the next training request" if self.ready else
                "; waiting for workers to join")
        return f"{self.state}, {self.world} ranks (generation {self.generation}){joined}{then}{failed}"


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
        self._procs: list = []  # the local ranks' processes (ranks 0..len-1)
        self._conns: list[Connection] = []  # every rank's, by rank: pipes, then sockets
        self._where: list[str] = []  # a remote rank's worker, for messages
        self.generation = 0  # how many groups were started: a run belongs to one generation
        self._finalizer: weakref.finalize | None = None
        self._starting = False
        self.last_failure: str | None = None
        self._desk: JoinDesk | None = None
        if spec.listen:
            if not 1 <= spec.local_ranks < spec.world:
                raise ValueError(f"local ranks must be 1..{spec.world - 1} with a group address "
                                 f"(--devices {spec.world}), got {spec.local_ranks}")
            if not spec.token:
                raise ValueError("a group that workers join needs a shared token "
                                 "(TINSMITH_GROUP_TOKEN or --group-token-file)")
            self._desk = JoinDesk(spec.listen, spec.token, device_type=spec.device_type,
                                  remote_ranks=spec.remote_ranks)

    @property
    def alive(self) -> bool:
        return bool(self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def state(self) -> GroupState:
        """What /readyz shows (read from other threads: plain attribute reads)."""
        s, desk = self.spec, self._desk
        broken = desk.broken if desk is not None and self._procs else None
        state = ("starting" if self._starting else
                 "up" if self._procs and broken is None else "down")
        joined = s.remote_ranks if state == "up" else desk.joined_ranks() if desk else 0
        return GroupState(state, s.world, s.remote_ranks, joined, self.generation,
                          broken or self.last_failure)

    def start(self) -> None:
        """Start the ranks and wait until each has its shard (GroupFailed otherwise)."""
        self._starting = True
        try:
            if self._desk is None:
                self._spawn(range(self.spec.world), f"tcp://127.0.0.1:{free_port()}")
                self.generation += 1
            else:
                self._start_joined(self._desk)
            self._collect(timeout=START_TIMEOUT_S)
        finally:
            self._starting = False
        self.last_failure = None
        log.info("sharded engine: %d ranks up (%s, generation %d)", self.spec.world,
                 self.spec.device_type, self.generation)

    def _start_joined(self, desk: JoinDesk) -> None:
        """Local ranks spawned here, the others assigned to joined workers, which connect
        back (rank 0 hosts the rendezvous store on a free port of this machine)."""
        s = self.spec
        self.generation += 1
        gen, port = self.generation, free_port()

        def assignment(first: int, count: int) -> Assignment:
            return Assignment(gen, first, count, s.world, port, s.model_dir, s.name,
                              s.device_type, s.dtype, s.exact_packing, s.loss_modules)

        try:
            workers = desk.assign(assignment, gen, s.local_ranks, s.join_timeout_s)
        except RuntimeError as e:
            self._fail(str(e))
        host = desk.host if desk.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        self._spawn(range(s.local_ranks), f"tcp://{host}:{port}")
        for w in workers:
            self._where += [w.label] * w.hello.local_ranks
        try:
            self._conns += desk.rank_connections(gen, range(s.local_ranks, s.world),
                                                 START_TIMEOUT_S)
        except RuntimeError as e:
            self._fail(str(e))

    def _spawn(self, ranks: range, init: str) -> None:
        ctx = mp.get_context("spawn")
        s = self.spec
        for rank in ranks:
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=rank_main, name=f"tinsmith-rank-{rank}", daemon=True,
                            args=(rank, s.world, theirs, init, s.model_dir, s.name, s.device_type,
                                  s.dtype, s.exact_packing, s.loss_modules))
            p.start()
            theirs.close()
            self._procs.append(p)
            self._conns.append(ours)
            self._where.append(f"pid {p.pid}")
        # Never outlive the coordinator's object (nor the interpreter): daemon processes are
        # also killed by multiprocessing at exit.
        self._finalizer = weakref.finalize(self, _kill, list(self._procs))

    def call(self, method: str, *args: object) -> object:
        """Run `method(*args)` on every rank; rank 0's value, or the exception rank 0 (else
        any rank) raised. GroupFailed when a rank died: the group is gone."""
        if not self._procs:
            self.start()
        if self._desk is not None and self._desk.broken is not None:  # died while idle
            self._fail(self._desk.broken)
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
        wake = [] if self._desk is None else [self._desk.wake]  # a worker died
        wedged: float | None = None  # deadline once a rank failed alone
        while waiting:
            limits = [t for t in (timeout, None if wedged is None else wedged - time.monotonic())
                      if t is not None]
            ready = wait([*waiting, *sentinels, *wake], max(0.0, min(limits)) if limits else None)
            if wake and wake[0] in ready:
                self._fail(self._desk.broken or "a worker died")  # type: ignore[union-attr]
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
                        if i < len(self._procs):
                            continue  # a local rank: its sentinel follows
                        self._fail(f"rank {i} ({self._where[i]}) closed its connection: its "
                                   "process or its machine is gone")
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

    def _fail(self, why: str) -> NoReturn:
        self.last_failure = why
        self.stop(force=True)
        raise GroupFailed(f"the sharded engine failed: {why}")

    def stop(self, force: bool = False) -> None:
        """Stop the ranks (politely unless `force`), within seconds; idempotent."""
        procs, conns = self._procs, self._conns
        self._procs, self._conns, self._where = [], [], []
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
        if self._desk is not None:  # its workers stop their ranks and stay joined
            self._desk.release(self.generation)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def close(self) -> None:
        """Stop the ranks and, for a group of several machines, stop listening: the
        workers' connections close (the server is going away)."""
        self.stop()
        if self._desk is not None:
            self._desk.close()
