"""The two-terminal flow: `tinsmith serve` in one process, an unmodified SDK script that
finds it through TINKER_BASE_URL in another, then the CLI listing what was stored."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
from conftest import TINY

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
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        env = dict(os.environ, TINKER_BASE_URL=f"http://127.0.0.1:{port}", TINKER_API_KEY="tml-local")
        user = subprocess.run([sys.executable, "-c", USER_SCRIPT], env=env, capture_output=True,
                              text=True, timeout=300)
        assert user.returncode == 0, user.stdout + user.stderr
        path = next(line.split()[1] for line in user.stdout.splitlines() if line.startswith("PATH"))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    runs = subprocess.run(tinsmith + ["runs", "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert "1 training runs" in runs.stdout and TINY in runs.stdout
    ckpts = subprocess.run(tinsmith + ["checkpoints", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert path in ckpts.stdout
    deleted = subprocess.run(tinsmith + ["checkpoints", "--data-dir", str(tmp_path), "--delete", path],
                             capture_output=True, text=True)
    assert deleted.returncode == 0
    ckpts = subprocess.run(tinsmith + ["checkpoints", "--data-dir", str(tmp_path)],
                           capture_output=True, text=True)
    assert "0 checkpoints" in ckpts.stdout and path not in ckpts.stdout
