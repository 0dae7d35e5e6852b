"""The README's "Use it from your own scripts" section, run as a new user runs it.

Its bash block is taken as written: `tinsmith serve` is started from its first line, and each of
the README's Python blocks is saved as `my_training_loop.py` and run with its second line (the
environment it sets, then the interpreter it names). Only two things are substituted, and
nothing else is touched:

- the model: `HuggingFaceTB/SmolLM2-135M-Instruct` becomes `tinsmith/tiny-test` wherever it
  appears (in the serve command and in the blocks), so the test takes seconds;
- the port: 8000 becomes a free loopback port (in `--port` and in `TINKER_BASE_URL`).

`.venv/bin/X` in a command is X from the virtual environment running the tests (the README's
`.venv` under scripts/test.sh). Each block runs with the user's environment as the README
gives it: no TINKER_* or HF_HUB_OFFLINE variables of the test session leak into it. A block
fails the test if it exits non-zero, prints any warning, or prints a raw response object; a
block that saves a checkpoint must print its tinker:// path, and `tinsmith checkpoints` run in
the same folder (no --data-dir) must list it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY, free_port, wait_until_up

README = Path(__file__).resolve().parent.parent / "README.md"
README_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
README_PORT = "8000"
SECTION = "## Use it from your own scripts"
WARNING = re.compile(r"\b\w*Warning\b")
RAW_REPR = re.compile(r"\b\w+(Response|Output)\(")


def _section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:] if end < 0 else text[start:end]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _commands() -> tuple[list[str], list[str]]:
    """The serve command and the client command of the section's bash block, as argv lists."""
    (bash,) = _blocks(_section(), "bash")
    serve, client = [shlex.split(line) for line in bash.strip().splitlines()]
    return serve, client


def _swap(text: str, port: str) -> str:
    """The two substitutions: the model, and the port (as `--port` and in the base URL)."""
    return (text.replace(README_MODEL, TINY).replace(f"--port {README_PORT}", f"--port {port}")
            .replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}"))


def _program(word: str) -> str:
    assert word.startswith(".venv/bin/"), f"the README runs {word!r}, not a program in .venv/bin/"
    path = Path(sys.executable).parent / word.removeprefix(".venv/bin/")
    assert path.is_file(), f"{path} does not exist"
    return str(path)


def _user_env(assignments: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TINKER_") and k != "HF_HUB_OFFLINE"}
    env.update(a.split("=", 1) for a in assignments)
    return env


PYTHON_BLOCKS = _blocks(README.read_text(), "python")


def test_the_section_has_the_commands_and_a_loop() -> None:
    serve, client = _commands()
    assert serve[:2] == [".venv/bin/tinsmith", "serve"] and README_MODEL in serve
    env = [w for w in client if "=" in w]
    assert client[len(env):] == [".venv/bin/python", "my_training_loop.py"], client
    assert dict(a.split("=", 1) for a in env)["TINKER_API_KEY"].startswith("tml-")
    assert "`tml-`" in _section()  # the README says why the key looks like that
    assert len(PYTHON_BLOCKS) >= 2 and all(README_MODEL in b for b in PYTHON_BLOCKS)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The README's `tinsmith serve` line, run in a fresh folder: (that folder, port)."""
    folder, port = tmp_path_factory.mktemp("terminal-1"), str(free_port())
    serve, _ = _commands()
    argv = shlex.split(_swap(shlex.join(serve), port))
    assert f"--port {port}" in shlex.join(argv)
    server = subprocess.Popen([_program(argv[0]), *argv[1:]], cwd=folder, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, lambda: server.stdout.read())
        yield folder, port
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


def _checkpoints_listed(folder: Path) -> str:
    out = subprocess.run([_program(".venv/bin/tinsmith"), "checkpoints"], cwd=folder,
                         capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index: int, served: tuple[Path, str],
                                      tmp_path: Path) -> None:
    folder, port = served
    block = PYTHON_BLOCKS[index]
    _, client = _commands()
    client = shlex.split(_swap(shlex.join(client), port))
    env = [w for w in client if "=" in w]
    program, script = client[len(env):]
    # The block's own folder: one that starts an embedded server keeps its ./tinsmith-data there.
    (tmp_path / script).write_text(_swap(block, port))
    run = subprocess.run([_program(program), script], cwd=tmp_path, env=_user_env(env),
                         capture_output=True, text=True, timeout=600)
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed
    assert not WARNING.search(printed), f"the block printed a warning:\n{printed}"
    assert not RAW_REPR.search(run.stdout), f"the block printed a raw response:\n{run.stdout}"
    if "save_state" in block or "save_weights_for_sampler" in block:
        paths = re.findall(r"tinker://\S+", run.stdout)
        assert paths, f"the block saves a checkpoint but never prints its path:\n{run.stdout}"
        listed = _checkpoints_listed(folder) + _checkpoints_listed(tmp_path)
        assert all(p in listed for p in paths), listed
    if ".sample(" in block:  # the sampled text, decoded: words, not token ids
        last = run.stdout.strip().splitlines()[-1]
        assert re.search(r"[A-Za-z]{3,}", last) and not re.search(r"\d+, \d+", last), run.stdout
