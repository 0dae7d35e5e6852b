"""Shared fixtures: a real Tinsmith HTTP server on a loopback port, and SDK clients for it.

The server runs the tiny test model (`tinsmith/tiny-test`) and is shared by the whole
session; tests that need their own server (restart, bad input isolation) start one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

import tinsmith

if TYPE_CHECKING:
    from tinsmith.scheduler.access import NewKey

TINY = "tinsmith/tiny-test"
API_KEY = "tml-test"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tinsmith-data")


@pytest.fixture(scope="session")
def base_url(data_dir: Path) -> Iterator[str]:
    with tinsmith.local(models=[TINY], data_dir=data_dir) as url:
        yield url


@pytest.fixture(scope="session")
def service_client(base_url: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=base_url, api_key=API_KEY)


@pytest.fixture(scope="session")
def rest_client(base_url: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=base_url, api_key=API_KEY)


@pytest.fixture(scope="session")
def tokenizer(service_client: tinker.ServiceClient):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    return tc.get_tokenizer()


def text_datum(tokenizer, text: str, weight: float = 1.0) -> types.Datum:
    """A next-token-prediction datum over `text` with every target weighted `weight`."""
    ids = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [weight] * (len(ids) - 1)},
    )


def logprobs_of(out: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].to_numpy()) for o in out.loss_fn_outputs]


def attach_random_adapter(runner, rank: int, seed: int) -> int:
    """A LoRA adapter with seeded non-zero B (a fresh one adds nothing) attached to a new
    slot of an engine-level ModelRunner; the slot."""
    import torch

    from tinsmith.engine.adapter import Adapter
    from tinsmith.types import LoraSpec

    adapter = Adapter.create(LoraSpec(rank=rank, seed=seed), runner.layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in adapter.weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.2)  # drawn on the CPU, any device
    return runner.attach(adapter)


def token_array(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), np.int64)


def assert_same_samples(got, want, tol: dict[str, float]) -> None:
    """Two samplers' SampleOut (engine level) for one request: equal tokens and stop
    reasons, logprobs (sampled, top-k, prompt) within `tol` (np.testing.assert_allclose)."""
    assert len(got.sequences) == len(want.sequences)
    for g, w in zip(got.sequences, want.sequences):
        np.testing.assert_array_equal(g.tokens, w.tokens)
        assert g.stop_reason == w.stop_reason
        np.testing.assert_allclose(g.logprobs, w.logprobs, **tol)
        if w.topk_ids is not None:
            np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
            np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, **tol)
    if want.prompt_logprobs is not None:
        np.testing.assert_allclose(got.prompt_logprobs, want.prompt_logprobs, **tol)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Callable[[], str], timeout: float = 180) -> None:
    """Poll `url`/readyz until the server answers 200; fail with `log()` if the process
    exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log()
        assert time.monotonic() < deadline, "server did not come up:\n" + log()
        time.sleep(0.1)


class ServeProcess:
    """`python -m tinsmith.cli serve` in a subprocess on a fixed port: started (again) on
    demand, stopped or killed with any signal; each start logs to `<log_dir>/server-<n>.log`."""

    def __init__(self, log_dir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log_dir, self.args = log_dir, args
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, **extra_env: str) -> None:
        self.starts += 1
        with open(self.log_dir / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tinsmith.cli", "serve", "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env={**self.env, **extra_env})
        wait_until_up(self.url, self.proc, self.log)

    def log(self) -> str:
        return (self.log_dir / f"server-{self.starts}.log").read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "server died before the kill"
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tinsmiths shape sheet metal with hammers and snips.",
    "A LoRA adapter adds a low-rank update to each weight matrix.",
    "Lighthouses guide ships past dangerous rocks at night.",
]


@dataclass(frozen=True)
class KeyedServer:
    """A server with API keys: `keys` by role ("a", "b", "admin", "revoked" - revoked before
    the server started), made through tinsmith.embedded.create_api_key."""

    url: str
    data_dir: Path
    keys: dict[str, NewKey]

    def key(self, who: str) -> str:
        return self.keys[who].key

    def headers(self, who: str) -> dict[str, str]:
        return {"X-API-Key": self.key(who)}


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """A second shared server that requires API keys (its own SQLite file and data dir)."""
    from tinsmith.config import ServerSettings
    from tinsmith.embedded import create_api_key
    from tinsmith.scheduler.access import ApiKeys
    from tinsmith.storage.db import MetadataStore

    d = tmp_path_factory.mktemp("tinsmith-keyed")
    keys = {"a": create_api_key(d, name="alice"), "b": create_api_key(d, name="bob"),
            "admin": create_api_key(d, name="ops", admin=True),
            "revoked": create_api_key(d, name="gone")}
    db = MetadataStore(ServerSettings(data_dir=d).resolved_database_url())
    ApiKeys(db).revoke(keys["revoked"].key_id)
    db.close()
    with tinsmith.local(models=[TINY], data_dir=d) as url:
        yield KeyedServer(url, d, keys)


# --- PostgreSQL ---------------------------------------------------------------------------

REQUIRE_POSTGRES = "TINSMITH_REQUIRE_POSTGRES"


def _postgres_bin() -> Path | None:
    """The folder holding initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/*/bin
    (the newest version), else None."""
    import shutil

    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
                         reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server: `initdb` into a temporary folder, `postgres` on a free
    loopback port (its unix socket in that folder too), stopped and removed at the end.
    Yields the URL of its `postgres` database (user `postgres`, trust auth).

    Skips when no PostgreSQL binaries are installed, unless TINSMITH_REQUIRE_POSTGRES=1 (CI),
    then fails. PostgreSQL refuses to run as root: as root, it runs as user `nobody`."""
    import pwd
    import shutil
    import tempfile

    import psycopg

    bindir = _postgres_bin()
    if bindir is None:
        msg = "PostgreSQL binaries (initdb, postgres) not found"
        if os.environ.get(REQUIRE_POSTGRES) == "1":
            pytest.fail(f"{msg}, and {REQUIRE_POSTGRES}=1")
        pytest.skip(msg)
    # Not pytest's tmp_path: its folders are private to the user running the tests (0700),
    # and as root the server runs as another user that must reach its data dir.
    root = Path(tempfile.mkdtemp(prefix="tinsmith-pg-"))
    data, sock, logfile = root / "data", root / "sock", root / "postgres.log"
    sock.mkdir()
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        for p in (root, sock):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    port = free_port()  # a race with another process is unlikely
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                       cwd=root, check=True, capture_output=True, **as_user)  # type: ignore[arg-type]
        with open(logfile, "wb") as log:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                cwd=root, stdout=log, stderr=subprocess.STDOUT, **as_user)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="postgres",
                                dbname="postgres", connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start:\n"
                                       + logfile.read_text(errors="replace")[-3000:]) from None
                time.sleep(0.1)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends open sessions too
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's PostgreSQL server, for one test."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server.replace("postgresql+psycopg", "postgresql"),
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"
