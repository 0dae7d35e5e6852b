"""The two-terminal flow: `tinsmith serve` in one process, an unmodified SDK script that
finds it through TINKER_BASE_URL in another, then the CLI listing what was stored."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY, wait_until_up

from tinsmith.cli import format_bytes, main

USER_SCRIPT = textwrap.dedent(
    """
    import tinker
    from tinker import types
    sc = tinker.ServiceClient()   # base URL and key come from the environment
    tc = sc.create_lora_training_client(base_model="%s", rank=4)
    tok = tc.get_tokenizer()
    ids = tok.encode("Tinsmiths shape tin with small hammers.")
    d = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    losses = []
    for _ in range(3):
        fb = tc.forward_backward([d], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
    print("PATH", tc.save_state("final").result().path)
    print("LOSSES", losses)
    assert losses[-1] < losses[0]
    """
) % TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_then_user_script(tmp_path: Path) -> None:
    port = _free_port()
    tinsmith = [sys.executable, "-m", "tinsmith.cli"]
    server = subprocess.Popen(
        tinsmith + ["serve", "--port", str(port), "--data-dir", str(tmp_path), "--models", TINY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, lambda: server.stdout.read())
        env = dict(os.environ, TINKER_BASE_URL=f"http://127.0.0.1:{port}", TINKER_API_KEY="tml-local")
        user = subprocess.run([sys.executable, "-c", USER_SCRIPT], env=env, capture_output=True,
                              text=True, timeout=300)
        assert user.returncode == 0, user.stdout + user.stderr
        path = next(line.split()[1] for line in user.stdout.splitlines() if line.startswith("PATH"))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    runs = subprocess.run(tinsmith + ["runs", "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert f"1 training run in {tmp_path.resolve()}\n" in runs.stdout and TINY in runs.stdout
    ckpts = subprocess.run(tinsmith + ["checkpoints", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert f"1 checkpoint in {tmp_path.resolve()}\n" in ckpts.stdout and path in ckpts.stdout
    # The size in the dashboard's units: what the checkpoint's files take on disk.
    run_id, kind, name = path.removeprefix("tinker://").split("/")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / run_id / kind / name).rglob("*")
                  if f.is_file())
    assert f" {format_bytes(on_disk)} " in ckpts.stdout.splitlines()[1], ckpts.stdout
    deleted = subprocess.run(tinsmith + ["checkpoints", "--data-dir", str(tmp_path), "--delete", path],
                             capture_output=True, text=True)
    assert deleted.returncode == 0
    ckpts = subprocess.run(tinsmith + ["checkpoints", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert "0 checkpoints" in ckpts.stdout and path not in ckpts.stdout


def test_listing_reads_serves_default_and_creates_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without --data-dir, `runs`, `checkpoints` and `keys` read ./tinsmith-data, as
    `tinsmith serve` writes it; where there is none they say so and create nothing."""
    monkeypatch.chdir(tmp_path)
    for argv in (["runs"], ["checkpoints"], ["keys", "revoke", "key-x"],
                 ["checkpoints", "--delete", "tinker://r:train:0/weights/x"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"no Tinsmith data in {tmp_path.resolve() / 'tinsmith-data'}: `tinsmith serve`" in err
    assert main(["runs", "--data-dir", "elsewhere"]) == 1
    assert f"no Tinsmith data in {tmp_path.resolve() / 'elsewhere'}\n" in capsys.readouterr().err
    assert main(["keys", "list"]) == 0  # no database: no keys, and none made to say so
    assert "the server is open" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    # Once serve's database exists there, the same commands read it.
    from tinsmith.embedded import create_api_key

    create_api_key("tinsmith-data", name="ci")
    assert main(["runs"]) == 0
    assert capsys.readouterr().out == f"0 training runs in {tmp_path.resolve() / 'tinsmith-data'}\n"
    assert main(["checkpoints"]) == 0
    assert capsys.readouterr().out == f"0 checkpoints in {tmp_path.resolve() / 'tinsmith-data'}\n"
    assert main(["keys", "list"]) == 0
    assert capsys.readouterr().out.startswith("1 API key (1 active)\n")


# Sizes whose text is easy to get wrong: unit edges, a tie at the first decimal (1280 B is
# 1.25 KiB exactly: JavaScript rounds it up, Python's own formatting to even), what the issue
# saw (68.4 MB), and the largest unit.
SIZES = [0, 1, 1023, 1024, 1075, 1280, 1331, 1024**2 - 1, 1024**2, 68_400_000, 9_825_000,
         3 * 1024**3 + 5, 2**41 + 2**39, 5 * 1024**5]


def test_format_bytes_names_binary_units() -> None:
    assert [format_bytes(n) for n in (1, 1280, 68_400_000, 2**41 + 2**39)] == [
        "1 B", "1.3 KiB", "65.2 MiB", "2.5 TiB"]
    assert format_bytes(None) == "–"


def test_cli_and_dashboard_format_sizes_alike() -> None:
    """`tinsmith checkpoints` and the dashboard's checkpoint table show the same text for a
    size: app.js's fmtBytes, run in node, against tinsmith.cli.format_bytes."""
    import json
    import re
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    app = (Path(__file__).resolve().parent.parent / "tinsmith/api/dashboard/app.js").read_text()
    fn = re.search(r"^function fmtBytes\(n\) \{.*?^\}$", app, re.DOTALL | re.MULTILINE)
    assert fn, "fmtBytes not found in app.js"
    script = f"{fn.group(0)}\nconsole.log(JSON.stringify({json.dumps(SIZES + [None])}.map(fmtBytes)));"
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [format_bytes(n) for n in SIZES + [None]]


def test_serve_flags_reach_the_settings(tmp_path: Path) -> None:
    """Each `serve` flag of a setting arrives in ServerSettings; the defaults are the settings'."""
    from tinsmith.cli import _settings, build_parser
    from tinsmith.config import ServerSettings

    parse = build_parser().parse_args
    s = _settings(parse(["serve", "--data-dir", str(tmp_path), "--sampler-kv-cache", "dynamic",
                         "--prefill-chunk-tokens", "0", "--max-image-bytes", "1000",
                         "--max-image-pixels", "4096", "--devices", "2"]))
    assert (s.sampler_kv_cache, s.prefill_chunk_tokens, s.max_image_bytes, s.max_image_pixels,
            s.devices) == ("dynamic", 0, 1000, 4096, 2)
    d = _settings(parse(["serve", "--data-dir", str(tmp_path)]))
    base = ServerSettings(data_dir=tmp_path)
    for name in ("sampler_kv_cache", "prefill_chunk_tokens", "max_image_bytes", "max_image_pixels",
                 "devices"):
        assert getattr(d, name) == getattr(base, name), name
