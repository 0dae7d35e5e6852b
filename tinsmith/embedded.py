"""Run Tinsmith in-process: the same HTTP server, on a free loopback port, in a thread.

    with tinsmith.local(models=["tinsmith/tiny-test"], data_dir="./data") as base_url:
        client = tinker.ServiceClient(base_url=base_url, api_key="tml-local")

`serve()` is the blocking variant the CLI uses.

A server is open (any key, or none, is accepted) until its metadata database holds an API
key; `create_api_key(data_dir)` makes one, before or while the server runs (see
docs/operating.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from tinsmith.api.app import create_app
from tinsmith.config import DEFAULT_MODEL, ServerSettings
from tinsmith.scheduler.access import ApiKeys, NewKey
from tinsmith.scheduler.build import build_service
from tinsmith.scheduler.service import Service
from tinsmith.storage.db import MetadataStore

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
        svc = build_service(cfg)
        stack.callback(svc.close)
        if not svc.keys.enabled():
            log.info("embedded Tinsmith server is open (no API keys); it listens on loopback only")
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


def create_api_key(
    data_dir: str | Path | None = None, *, database_url: str | None = None,
    name: str | None = None, admin: bool = False,
) -> NewKey:
    """Create an API key in a server's metadata database (its data dir, or `database_url`).
    The returned `NewKey.key` is the only copy of the secret. A running server sees it at once."""
    settings = ServerSettings(data_dir=Path(data_dir or "tinsmith-data"), database_url=database_url)
    db = MetadataStore(settings.resolved_database_url())
    try:
        return ApiKeys(db).create(name, admin=admin)
    finally:
        db.close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(settings: ServerSettings, db: MetadataStore | None = None) -> bool:
    """Whether the server has API keys. Without any, warn loudly that it is open, and
    refuse (ValueError) to listen beyond loopback unless `settings.allow_open`. `db`: the
    server's open store (else the database is opened, and closed, for this check)."""
    if db is None:
        db = MetadataStore(settings.resolved_database_url())
        try:
            return check_exposure(settings, db)
        finally:
            db.close()
    if ApiKeys(db).enabled():
        log.info("API keys exist: every request needs a valid X-API-Key")
        return True
    if not is_loopback(settings.host) and not settings.allow_open:
        raise ValueError(
            f"refusing to listen on {settings.host} with no API keys: anyone who can reach it "
            f"could use the server. Create a key first (tinsmith keys create --data-dir "
            f"{settings.data_dir}), or pass --allow-open to serve openly on purpose"
        )
    where = "loopback only" if is_loopback(settings.host) else f"{settings.host} (--allow-open)"
    bar = "!" * 78
    log.warning("\n%s\n  THIS SERVER IS OPEN: no API keys exist, so every request is accepted and can\n"
                "  read, train, sample and delete everything. Listening on %s.\n"
                "  Require keys: tinsmith keys create --data-dir %s\n%s",
                bar, where, settings.data_dir, bar)
    return False


def serve(settings: ServerSettings, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    db = MetadataStore(settings.resolved_database_url())  # opened (and migrated) once, here
    try:
        keyed = check_exposure(settings, db)
        svc = build_service(settings, db)
    except BaseException:
        db.close()
        raise
    url = f"http://{settings.host}:{settings.port}"
    key = "<your tml- key>" if keyed else "tml-local"
    print(f"Tinsmith serving {', '.join(settings.models)} on {url}\n"
          f"  TINKER_BASE_URL={url} TINKER_API_KEY={key} .venv/bin/python your_loop.py", flush=True)
    try:
        uvicorn.Server(_uvicorn_config(svc, settings.host, settings.port, log_level)).run()
    finally:
        svc.close()
