"""The coordinator's door for rank processes on other machines: a TCP listener that
`tinsmith worker --join HOST:PORT` connects to (docs/scale-out.md, "Several machines").

Every connection first proves it knows the group's shared token (the HMAC challenge of
`multiprocessing.connection`, both ways: the worker checks the server too); a wrong token is
refused and logged. Then it says what it is:

- `("worker", WorkerHello)`: a worker's control connection. It stays open for the worker's
  life: the coordinator sends `("ranks", Assignment)` (start these ranks of generation g) and
  `("stop",)` (the group is gone; stop them), the worker sends `("beat",)` every HEARTBEAT_S
  and `("lost", why)` when one of its rank processes exited. A reader thread per worker
  drains it; no message for MISSED_S, or the connection closing, counts as the worker's
  death.
- `("rank", generation, rank)`: a rank process the worker spawned, connecting back; from
  then on the connection carries that rank's commands exactly as a local rank's pipe.

A death (a worker's, or a rank it reports) while its ranks are in the live group makes the
group *broken*: `broken` holds why, and `wake` (a pipe end the coordinator waits on together
with the ranks' connections) becomes readable, so a call in flight fails at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import (
    AuthenticationError,
    Connection,
    answer_challenge,
    deliver_challenge,
)

log = logging.getLogger("tinsmith.sharded")
HEARTBEAT_S = 2.0  # a worker's beat interval
MISSED_S = 20.0  # no message from a worker for this long: it (or its machine) is gone
HELLO_S = 10.0  # a connection must authenticate and say what it is within this long


@dataclass(frozen=True)
class WorkerHello:
    """What a worker says when it joins."""

    local_ranks: int
    device_type: str  # "cpu" or "cuda"
    host: str
    pid: int


@dataclass(frozen=True)
class Assignment:
    """What a worker needs to start its ranks `first .. first + count - 1` of a group."""

    generation: int
    first: int
    count: int
    world: int
    store_port: int  # the torch.distributed TCPStore, on the server machine (hosted by rank 0)
    model_dir: str  # the server's path: used when it exists on the worker too
    name: str
    device_type: str
    dtype: str
    exact_packing: bool | None
    loss_modules: tuple[str, ...]


@dataclass(eq=False)
class Worker:
    conn: Connection
    hello: WorkerHello
    peer: str
    generation: int | None = None  # the group generation its ranks are in, if any
    first: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def label(self) -> str:
        return f"worker {self.hello.host} pid {self.hello.pid} ({self.peer})"

    def send(self, msg: object) -> None:
        with self.send_lock:
            self.conn.send(msg)


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv4 address or a host name) -> (host, port); ValueError naming the
    problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a HOST:PORT address (IPv4 or a host name): {text!r}")
    return host, int(port)


def hangup(conn: Connection) -> None:
    """End a socket connection for both sides, even while another thread waits on it."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class JoinDesk:
    """The listener and the workers that joined through it (threads: one accepting, one per
    connection while it says hello, one reading each worker)."""

    def __init__(self, address: str, token: bytes, *, device_type: str, remote_ranks: int) -> None:
        self.host, self.port = parse_address(address)
        self.token, self.device_type, self.remote_ranks = token, device_type, remote_ranks
        self.cond = threading.Condition()
        self.workers: list[Worker] = []  # in join order
        self.rank_conns: dict[tuple[int, int], Connection] = {}  # (generation, rank) -> conn
        self.live: int | None = None  # the generation of the live group
        self.broken: str | None = None  # why the live group is dead, once it is
        self.refused = 0  # connections refused (a wrong token, a worker that does not fit)
        self.wake, self._wake_w = Pipe(duplex=False)
        self._closed = False
        self._sock = socket.create_server((self.host, self.port), backlog=64)
        threading.Thread(target=self._accept, name="tinsmith-group-desk", daemon=True).start()
        log.info("sharded engine: waiting for workers on %s:%d (%d remote rank(s))",
                 self.host, self.port, remote_ranks)

    # ----- connections -------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, peer = self._sock.accept()
            except OSError:
                return  # closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn = Connection(sock.detach())
            threading.Thread(target=self._hello, args=(conn, f"{peer[0]}:{peer[1]}"),
                             name="tinsmith-group-hello", daemon=True).start()

    def _hello(self, conn: Connection, peer: str) -> None:
        timer = threading.Timer(HELLO_S, hangup, (conn,))  # a peer that never finishes
        timer.start()
        try:
            deliver_challenge(conn, self.token)
            answer_challenge(conn, self.token)
            msg = conn.recv()
        except AuthenticationError:
            with self.cond:
                self.refused += 1
            log.warning("sharded engine: refused a connection from %s: wrong group token", peer)
            conn.close()
            return
        except (EOFError, OSError) as e:
            log.warning("sharded engine: a connection from %s closed before joining (%s)", peer, e)
            conn.close()
            return
        finally:
            timer.cancel()
        if not isinstance(msg, tuple) or len(msg) < 2:
            msg = ("?", None)
        if msg[0] == "rank" and len(msg) == 3:
            with self.cond:
                if msg[1] == self.live:  # else a late rank of a group that is gone
                    self.rank_conns[(int(msg[1]), int(msg[2]))] = conn
                    self.cond.notify_all()
                    return
            conn.close()
        elif msg[0] == "worker" and isinstance(msg[1], WorkerHello):
            self._join(Worker(conn, msg[1], peer))
        else:
            log.warning("sharded engine: refused a connection from %s: unknown hello", peer)
            conn.close()

    def _join(self, w: Worker) -> None:
        why = None
        if w.hello.device_type != self.device_type:
            why = (f"this group runs on {self.device_type} (the server's --device), the worker "
                   f"on {w.hello.device_type}: start it with --device {self.device_type}")
        elif not 1 <= w.hello.local_ranks <= self.remote_ranks:
            why = (f"the group needs {self.remote_ranks} remote rank(s) in all; this worker "
                   f"offers {w.hello.local_ranks} (--local-ranks)")
        if why is not None:
            log.warning("sharded engine: refused %s: %s", w.label, why)
            with self.cond:
                self.refused += 1
            try:
                w.send(("refused", why))
            except OSError:
                pass
            w.conn.close()
            return
        with self.cond:
            self.workers.append(w)
            self.cond.notify_all()
        log.info("sharded engine: %s joined with %d rank(s)", w.label, w.hello.local_ranks)
        threading.Thread(target=self._read, args=(w,), name="tinsmith-group-worker",
                         daemon=True).start()

    def _read(self, w: Worker) -> None:
        """Drain a worker's beats until it dies; then forget it (and break its group)."""
        why = "disconnected"
        while True:
            try:
                if not w.conn.poll(MISSED_S):
                    why = f"sent no heartbeat for {MISSED_S:.0f} s"
                    break
                msg = w.conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "lost":
                self._break(w, str(msg[1]))
        with self.cond:
            if w in self.workers:
                self.workers.remove(w)
            self.cond.notify_all()
        w.conn.close()
        if not self._closed:
            log.error("sharded engine: %s %s", w.label, why)
            self._break(w, why)

    def _break(self, w: Worker, why: str) -> None:
        with self.cond:
            if self.broken is not None or w.generation is None or w.generation != self.live:
                return
            self.broken = f"{w.label}, holding ranks {w.first}..{w.first + w.hello.local_ranks - 1}: {why}"
            self.cond.notify_all()
        self._wake_w.send(None)

    # ----- the coordinator's side --------------------------------------------------------
    def joined_ranks(self) -> int:
        """Remote ranks offered by the workers connected now (those of a group that just
        failed included: they are released, and reused, when the coordinator notices)."""
        with self.cond:
            return min(self.remote_ranks, sum(w.hello.local_ranks for w in self.workers))

    def _pick(self) -> list[Worker] | None:
        chosen, total = [], 0
        for w in self.workers:
            if w.generation is None and total + w.hello.local_ranks <= self.remote_ranks:
                chosen.append(w)
                total += w.hello.local_ranks
        return chosen if total == self.remote_ranks else None

    def assign(self, make: object, generation: int, first: int, timeout: float) -> list[Worker]:
        """Wait (up to `timeout` s) until joined workers offer the remote ranks exactly, then
        send each its ranks (`make(first, count)` -> Assignment). RuntimeError on timeout."""
        with self.cond:
            chosen = self.cond.wait_for(self._pick, timeout)
            if not chosen:
                joined = sum(w.hello.local_ranks for w in self.workers if w.generation is None)
                raise RuntimeError(
                    f"only {joined} of {self.remote_ranks} remote rank(s) joined within "
                    f"{timeout:.0f} s: start `tinsmith worker --join {self.host}:{self.port}` on "
                    f"the other machine(s) ({self.refused} connection(s) refused so far)")
            self.live, self.broken = generation, None
            while self.wake.poll():
                self.wake.recv()
            for w in chosen:
                w.generation, w.first = generation, first
                first += w.hello.local_ranks
        for w in chosen:
            try:
                w.send(("ranks", make(w.first, w.hello.local_ranks)))  # type: ignore[operator]
            except OSError:
                pass  # its reader thread breaks the group
        return chosen

    def rank_connections(self, generation: int, ranks: range, timeout: float) -> list[Connection]:
        """The connections of `ranks` of `generation`, once all connected back."""
        def ready() -> bool:
            return self.broken is not None or all((generation, r) in self.rank_conns for r in ranks)

        with self.cond:
            if not self.cond.wait_for(ready, timeout):
                missing = [r for r in ranks if (generation, r) not in self.rank_conns]
                raise RuntimeError(f"ranks {missing} did not connect within {timeout:.0f} s")
            if self.broken is not None:
                raise RuntimeError(self.broken)
            return [self.rank_conns.pop((generation, r)) for r in ranks]

    def release(self, generation: int) -> None:
        """The group of `generation` is gone: tell its workers to stop their ranks; they stay
        joined for the next group."""
        with self.cond:
            held = [w for w in self.workers if w.generation == generation]
            for w in held:
                w.generation = None
            if self.live == generation:
                self.live = None
            for key in [k for k in self.rank_conns if k[0] == generation]:
                self.rank_conns.pop(key).close()
            self.cond.notify_all()
        for w in held:
            try:
                w.send(("stop",))
            except OSError:
                pass

    def close(self) -> None:
        """Stop listening and let every worker go (their connections close)."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self.cond:
            workers, self.workers = list(self.workers), []
        for w in workers:
            hangup(w.conn)  # its reader thread sees the end and closes it
