"""Run Tinsmith in-process: the same HTTP server, on a free loopback port, in a thread.

    with tinsmith.local(models=["tinsmith/tiny-test"], data_dir="./data") as base_url:
        client = tinker.ServiceClient(base_url=base_url, api_key="tml-local")

`serve()` is the blocking variant the CLI uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from tinsmith.api.app import create_app
from tinsmith.config import DEFAULT_MODEL, ServerSettings
from tinsmith.scheduler.service import Service

log = logging.getLogger("tinsmith")


def _uvicorn_config(svc: Service, host: str, port: int, log_level: str) -> uvicorn.Config:
    # HTTP/1.1 keep-alive over h11; asyncio sets TCP_NODELAY on its sockets, which matters:
    # without it every small round trip costs ~40 ms (Nagle + delayed ACK).
    return uvicorn.Config(
        create_app(svc), host=host, port=port, log_level=log_level, access_log=False,
        timeout_keep_alive=75, lifespan="off",
    )


@contextlib.contextmanager
def local(
    models: Sequence[str] = (DEFAULT_MODEL,),
    data_dir: str | Path | None = None,
    *,
    log_level: str = "warning",
    **settings: object,
) -> Iterator[str]:
    """Start an embedded server and yield its base URL; stop it on exit.

    Extra keyword arguments are ServerSettings fields (e.g. long_poll_s, storage_url).
    Without `data_dir` a temporary folder is used and removed afterwards.
    """
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            import tempfile

            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tinsmith-"))
        cfg = ServerSettings(data_dir=Path(data_dir), models=tuple(models), port=0, **settings)  # type: ignore[arg-type]
        svc = Service(cfg)
        stack.callback(svc.close)
        server = uvicorn.Server(_uvicorn_config(svc, "127.0.0.1", 0, log_level))
        thread = threading.Thread(target=server.run, name="tinsmith-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded Tinsmith server did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(10)


def serve(settings: ServerSettings, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("Tinsmith has no API keys yet: anyone who can reach %s can use it", settings.host)
    svc = Service(settings)
    url = f"http://{settings.host}:{settings.port}"
    print(f"Tinsmith serving {', '.join(settings.models)} on {url}\n"
          f"  TINKER_BASE_URL={url} TINKER_API_KEY=tml-local python your_loop.py", flush=True)
    try:
        uvicorn.Server(_uvicorn_config(svc, settings.host, settings.port, log_level)).run()
    finally:
        svc.close()
