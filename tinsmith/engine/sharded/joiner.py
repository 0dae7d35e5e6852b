"""The worker's side of a group spanning machines: `tinsmith worker --join HOST:PORT`.

A worker connects to the server's group address (desk.py), proves the shared token, says how
many ranks it offers and on which device, then waits. When the coordinator starts a group it
sends an `Assignment`; the worker spawns one process per rank (`joined_rank_main`), each of
which connects back to the server on its own socket and then runs the ordinary `rank_main`
command loop. The worker meanwhile sends a heartbeat every HEARTBEAT_S, reports a rank
process that exited (`("lost", why)`), and on `("stop",)` (the group is gone) or the server's
connection closing stops its ranks. With `retry` it then connects again, in a loop, so a
restarted server (or a network that came back) finds it; without, it exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import AuthenticationError, Client, Connection, wait

import torch.multiprocessing as mp

from tinsmith.engine.sharded.desk import HEARTBEAT_S, Assignment, WorkerHello
from tinsmith.engine.sharded.rank import rank_main

log = logging.getLogger("tinsmith.group_worker")
RETRY_S = 2.0  # pause between connection attempts with `retry`
STOP_GRACE_S = 10.0  # a rank told to stop gets this long to exit before it is killed


class TokenRefused(RuntimeError):
    """The server refused the group token (retrying cannot help)."""


@dataclass(frozen=True)
class WorkerOptions:
    address: tuple[str, int]
    token: bytes
    local_ranks: int
    device_type: str  # "cpu" or "cuda" (rank i of this machine on cuda:i)
    retry: bool
    resolve_model: Callable[[str, str], str]  # (name, server's model dir) -> a local folder


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the worker) dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def joined_rank_main(address: tuple[str, int], token: bytes, a: Assignment, rank: int,
                     local_rank: int, model_dir: str) -> None:
    """A rank process on a worker's machine: connect back to the coordinator, then serve it."""
    _die_with_parent()
    conn = Client(address, authkey=token)
    conn.send(("rank", a.generation, rank))
    init = f"tcp://{address[0]}:{a.store_port}"
    rank_main(rank, a.world, conn, init, model_dir, a.name, a.device_type, a.dtype,
              a.exact_packing, a.loss_modules, local_rank=local_rank)


class _Ranks:
    """The rank processes of the current assignment."""

    def __init__(self) -> None:
        self.procs: dict[int, object] = {}  # rank -> process

    def start(self, opts: WorkerOptions, a: Assignment) -> None:
        ctx = mp.get_context("spawn")
        model_dir = opts.resolve_model(a.name, a.model_dir)
        for i in range(a.count):
            p = ctx.Process(target=joined_rank_main, name=f"tinsmith-rank-{a.first + i}",
                            args=(opts.address, opts.token, a, a.first + i, i, model_dir),
                            daemon=True)
            p.start()
            self.procs[a.first + i] = p
        log.info("started ranks %d..%d of %d (generation %d)", a.first, a.first + a.count - 1,
                 a.world, a.generation)

    def stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))  # type: ignore[attr-defined]
            if p.is_alive():  # type: ignore[attr-defined]
                p.kill()  # type: ignore[attr-defined]
                p.join(5)  # type: ignore[attr-defined]
        self.procs.clear()


def _beat(conn: Connection, lock: threading.Lock, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        try:
            with lock:
                conn.send(("beat",))
        except OSError:
            return


def serve_once(opts: WorkerOptions) -> str:
    """One connection to the server, until it ends: why it ended. TokenRefused for a wrong
    token; OSError when the server cannot be reached; RuntimeError when it refuses us."""
    try:
        conn = Client(opts.address, authkey=opts.token)
    except AuthenticationError as e:
        raise TokenRefused(f"the server at {opts.address[0]}:{opts.address[1]} refused the "
                           "group token (TINSMITH_GROUP_TOKEN / --token-file must match the "
                           "server's)") from e
    lock, done, ranks = threading.Lock(), threading.Event(), _Ranks()
    with lock:
        conn.send(("worker", WorkerHello(opts.local_ranks, opts.device_type, socket.gethostname(),
                                         os.getpid())))
    log.info("joined the group at %s:%d with %d rank(s) on %s", *opts.address, opts.local_ranks,
             opts.device_type)
    threading.Thread(target=_beat, args=(conn, lock, done), daemon=True).start()
    try:
        while True:
            sentinels = {p.sentinel: r for r, p in ranks.procs.items()}  # type: ignore[attr-defined]
            for r in wait([conn, *sentinels]):
                if r in sentinels:  # one of our ranks exited: tell the server, stop the rest
                    rank = sentinels[r]
                    ranks.procs[rank].join(5)  # type: ignore[attr-defined]
                    code = ranks.procs[rank].exitcode  # type: ignore[attr-defined]
                    with lock:
                        conn.send(("lost", f"rank {rank} exited with code {code}"))
                    ranks.stop(grace=0)
                    break
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    return "the server closed the connection"
                if msg[0] == "ranks":
                    ranks.stop(grace=STOP_GRACE_S)  # a previous group's, if still there
                    try:
                        ranks.start(opts, msg[1])
                    except Exception as e:  # noqa: BLE001 - e.g. the model is not here
                        log.error("cannot start ranks: %s: %s", type(e).__name__, e)
                        ranks.stop(grace=0)
                        with lock:
                            conn.send(("lost", f"cannot start its ranks: {type(e).__name__}: {e}"))
                elif msg[0] == "stop":
                    ranks.stop(grace=STOP_GRACE_S)
                    log.info("the group stopped; waiting for the next one")
                elif msg[0] == "refused":
                    raise RuntimeError(f"the server refused this worker: {msg[1]}")
    except OSError:
        return "the connection to the server broke"
    finally:
        done.set()
        ranks.stop(grace=STOP_GRACE_S)
        conn.close()


def run_worker(opts: WorkerOptions) -> int:
    """Serve the group until the server goes (or forever with `retry`): an exit status."""
    while True:
        try:
            why = serve_once(opts)
            log.warning("%s", why)
        except TokenRefused as e:
            log.error("%s", e)
            return 3
        except RuntimeError as e:
            log.error("%s", e)
            return 2
        except OSError as e:
            log.warning("cannot reach the server at %s:%d: %s", *opts.address, e)
            if not opts.retry:
                return 1
        else:
            if not opts.retry:
                return 0
        time.sleep(RETRY_S)
