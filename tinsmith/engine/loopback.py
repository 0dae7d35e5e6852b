"""A free TCP port on this machine, for the engine's own child processes: a rank group's
rendezvous (engine/sharded/group.py) and a vLLM server Tinsmith starts (engine/vllm_server.py).
The port is free when asked; whoever binds it next wins, which the callers accept (a start
that loses the race fails and is retried by its caller or reported)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
