"""Every command of the installed `tinker` CLI, run once against a real server.

The commands are enumerated from the CLI's click groups, so a newer SDK's new command shows
up as a failure until it is added here and works. Each runs as its own process
(`python -m tinker.cli`) with `TINKER_BASE_URL` and `TINKER_API_KEY` pointing at a Tinsmith
server with API keys, `HOME` in a temporary folder (the CLI's credential store), and must
exit 0 with the output checked, except the one command whose work is outside the server
(`checkpoint push-hf` uploads to the Hugging Face Hub, unreachable offline), which must fail
with the CLI's own clear message. tests/test_sdk_surface.py walks the SDK's methods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
import tinker
from tinker import types
from tinker.cli.__main__ import main_cli

import tinsmith
from tests.conftest import TINY


def commands() -> list[str]:
    """Every leaf command of the CLI, as its words ("checkpoint list")."""
    ctx = click.Context(main_cli)
    out: list[str] = []

    def walk(group: click.Group, prefix: list[str]) -> None:
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if isinstance(cmd, click.Group):
                walk(cmd, [*prefix, name])
            else:
                out.append(" ".join([*prefix, name]))

    walk(main_cli, [])
    return sorted(out)


@dataclass
class Cli:
    url: str
    key: str
    home: Path
    run_id: str
    session_id: str
    tc: tinker.TrainingClient

    def state(self, name: str) -> str:
        return self.tc.save_state(name).result().path

    def run(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            fmt: str = "json") -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "TINKER_BASE_URL": self.url, "TINKER_API_KEY": self.key,
                    "HOME": str(self.home), "TINKER_TELEMETRY": "0", **(env or {})}
        return subprocess.run([sys.executable, "-m", "tinker.cli", "--format", fmt, *args],
                              input=stdin, capture_output=True, text=True, env=full_env,
                              timeout=120, check=False)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    from tinsmith.embedded import create_api_key

    d = tmp_path_factory.mktemp("tinsmith-cli-surface")
    key = create_api_key(d, name="cli-user").key
    create_api_key(d, name="ops", admin=True)
    home = tmp_path_factory.mktemp("home")
    with tinsmith.local(models=[TINY], data_dir=d) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=key)
        tc = sc.create_lora_training_client(base_model=TINY, rank=2, seed=0).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                            loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0] * 3})
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        yield Cli(url, key, home, tc.model_id, sc.holder.get_session_id(), tc)


def _json(p: subprocess.CompletedProcess[str]) -> object:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _window() -> tuple[str, str]:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    return start.isoformat(), (start + timedelta(hours=3)).isoformat()


def _version(c: Cli) -> None:
    p = c.run("version", fmt="table")
    assert p.returncode == 0 and tinker.__version__ in p.stdout, p.stderr


def _model_list(c: Cli) -> None:
    out = _json(c.run("model", "list"))
    assert TINY in json.dumps(out)


def _run_list(c: Cli) -> None:
    assert c.run_id in json.dumps(_json(c.run("run", "list")))


def _run_info(c: Cli) -> None:
    assert c.run_id in json.dumps(_json(c.run("run", "info", c.run_id)))


def _checkpoint_list(c: Cli) -> None:
    path = c.state("cli-listed")
    assert path in json.dumps(_json(c.run("checkpoint", "list", "--run-id", c.run_id)))


def _checkpoint_info(c: Cli) -> None:
    path = c.state("cli-info")
    assert path in json.dumps(_json(c.run("checkpoint", "info", path)))


def _checkpoint_set_ttl(c: Cli) -> None:
    path = c.state("cli-ttl")
    p = c.run("checkpoint", "set-ttl", path, "--ttl", "7200")  # prints nothing
    assert p.returncode == 0, p.stderr
    info = json.dumps(_json(c.run("checkpoint", "info", path)))
    assert '"expires_at": null' not in info and "expires_at" in info


def _checkpoint_publish(c: Cli) -> None:
    path = c.state("cli-publish")
    p = c.run("checkpoint", "publish", path)
    assert p.returncode == 0, p.stderr
    assert '"public": true' in json.dumps(_json(c.run("checkpoint", "info", path)))


def _checkpoint_unpublish(c: Cli) -> None:
    path = c.state("cli-unpublish")
    assert c.run("checkpoint", "publish", path).returncode == 0
    p = c.run("checkpoint", "unpublish", path)
    assert p.returncode == 0, p.stderr
    assert '"public": false' in json.dumps(_json(c.run("checkpoint", "info", path)))


def _checkpoint_download(c: Cli) -> None:
    path = c.state("cli-download")
    out = c.home / "download"
    p = c.run("checkpoint", "download", path, "--output", str(out), fmt="table")
    assert p.returncode == 0, p.stderr
    assert any(f.name.endswith(".safetensors") for f in out.rglob("*")), list(out.rglob("*"))


def _checkpoint_delete(c: Cli) -> None:
    path = c.state("cli-delete")
    p = c.run("checkpoint", "delete", path, "--yes")
    assert p.returncode == 0, p.stderr
    assert path not in json.dumps(_json(c.run("checkpoint", "list", "--run-id", c.run_id)))


def _checkpoint_push_hf(c: Cli) -> None:
    # Uploading goes to the Hugging Face Hub, which this machine cannot reach: the CLI says so
    # itself before it asks Tinsmith for anything.
    p = c.run("checkpoint", "push-hf", c.state("cli-hf"), "--repo", "me/x",
              env={"HF_HUB_OFFLINE": "1"}, fmt="table")
    assert p.returncode != 0 and "hf auth login" in p.stderr, p.stderr


def _session_export_trace(c: Cli) -> None:
    out = c.home / "trace.json"
    p = c.run("session", "export-trace", c.session_id, "--output", str(out), fmt="table")
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size > 0 and c.run_id in out.read_text()


def _billing_usage(c: Cli) -> None:
    p = c.run("billing", "usage", *_window())
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)


def _billing_checkpoint_storage(c: Cli) -> None:
    p = c.run("billing", "checkpoint-storage")
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)


def _auth(c: Cli) -> None:
    """login (the key pasted on stdin), status, whoami, logout: the credential store's round."""
    env = {"TINKER_API_KEY": ""}
    p = c.run("auth", "login", stdin=c.key + "\n", env=env, fmt="table")
    assert p.returncode == 0 and "Logged in" in p.stdout, p.stdout + p.stderr
    p = c.run("auth", "status", env=env, fmt="table")
    assert p.returncode == 0 and "accessible: yes" in p.stdout, p.stdout + p.stderr
    who = _json(c.run("auth", "whoami", env=env))
    assert "cli-user" in json.dumps(who)
    p = c.run("auth", "logout", env=env, fmt="table")
    assert p.returncode == 0 and "Removed credential" in p.stdout, p.stdout + p.stderr


RUNS: dict[str, Callable[[Cli], None]] = {
    "version": _version, "model list": _model_list, "run list": _run_list,
    "run info": _run_info, "checkpoint list": _checkpoint_list,
    "checkpoint info": _checkpoint_info, "checkpoint set-ttl": _checkpoint_set_ttl,
    "checkpoint publish": _checkpoint_publish, "checkpoint unpublish": _checkpoint_unpublish,
    "checkpoint download": _checkpoint_download, "checkpoint delete": _checkpoint_delete,
    "checkpoint push-hf": _checkpoint_push_hf, "session export-trace": _session_export_trace,
    "billing usage": _billing_usage, "billing checkpoint-storage": _billing_checkpoint_storage,
    "auth login": _auth, "auth status": _auth, "auth whoami": _auth, "auth logout": _auth,
}


def test_the_walk_covers_exactly_the_cli() -> None:
    assert set(commands()) == RUNS.keys()
    page = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    missing = [c for c in commands() if f"`tinker {c}`" not in page]
    assert not missing, f"docs/compatibility.md lacks: {missing}"


@pytest.mark.parametrize("command", sorted({c for c in RUNS if not c.startswith("auth ")})
                         + ["auth"])
def test_every_cli_command_works(cli: Cli, command: str) -> None:
    RUNS["auth login" if command == "auth" else command](cli)
