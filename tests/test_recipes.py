"""Recipe smoke tests: every recipe runs two steps on the tiny model against an embedded
server, writes metrics and a checkpoint, and a second run resumes from that checkpoint.

Each `main([...])` call starts its own embedded Tinsmith whose data lives in the run's
`log_path` (as a user's run would), so a resume also exercises a server restart.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

import tinsmith.recipes as recipes_pkg
from tinsmith.cookbook import logs, recipe
from tinsmith.recipes import rl_loop, sl_loop

SL_KEYS = {"step", "nll", "grad_norm", "learning_rate", "num_tokens", "step_s"}
RL_KEYS = {"step", "reward", "correct", "format", "mixed_groups", "response_len", "num_datums",
           "sample_s", "step_s"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_finite(rows: list[dict]) -> None:
    for row in rows:
        for key, value in row.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, row)


def assert_checkpoint_files(log_path: Path, entry: dict) -> None:
    """The state path names a PEFT adapter plus optimizer state in the embedded server's data."""
    run, kind, name = entry["state_path"].removeprefix("tinker://").split("/")
    folder = log_path / "tinsmith-data" / "checkpoints" / run / kind / name
    for file in ("adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"):
        assert (folder / file).is_file(), folder / file


def assert_resumes_at_step_2(main, argv: list[str], log: Path, capsys, state_path: str,
                             *, checkpoints: bool = True) -> list[dict]:
    """Run `main(argv)` (max_steps=3) on a log_path holding a step-2 checkpoint: it must
    resume there, add exactly the row of step 2 and (with `checkpoints`) save at step 3.
    Returns the metrics rows."""
    out = main(argv)
    assert out["start_step"] == 2 and out["resumed"]
    assert f"resuming from {state_path} at step 2" in capsys.readouterr().err
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert_finite(rows)
    if checkpoints:
        assert [c["step"] for c in read_jsonl(log / "checkpoints.jsonl")] == [2, 3]
    return rows


def sl_args(log_path: Path, max_steps: int) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=3", "learning_rate=1e-2", "lora_rank=4", "save_every=2"]


def test_sl_loop_runs_saves_and_resumes(tmp_path: Path, capsys) -> None:
    log = tmp_path / "sl"
    out = sl_loop.main(sl_args(log, 2))
    assert out["start_step"] == 0 and not out["resumed"]
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(set(r) == SL_KEYS for r in rows)
    assert_finite(rows)
    assert rows[1]["nll"] < rows[0]["nll"]  # lr 1e-2 on 32 facts: the loss moves at once
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert ckpts[-1]["model_name"] == TINY and "sampler_path" in ckpts[-1]
    assert_checkpoint_files(log, ckpts[-1])
    assert json.loads((log / "config.json").read_text())["max_steps"] == 2
    capsys.readouterr()

    # Run again with a higher max_steps: it continues at step 2, from the checkpoint.
    assert_resumes_at_step_2(sl_loop.main, sl_args(log, 3), log, capsys, ckpts[-1]["state_path"])
    out = sl_loop.main(sl_args(log, 4))  # and once more, from the resumed run's checkpoint
    assert out["start_step"] == 3

    # A run that never stopped gives the same numbers: the resumed runs trained on the saved
    # weights (step 2) with the saved Adam moments (step 3; fresh moments would differ).
    straight = tmp_path / "straight"
    sl_loop.main(sl_args(straight, 4))
    resumed, reference = read_jsonl(log / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(resumed, reference):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)


def rl_args(log_path: Path, max_steps: int) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log_path}", f"max_steps={max_steps}",
            "batch_size=2", "group_size=4", "max_tokens=6", "lora_rank=4", "save_every=2"]


def test_rl_loop_runs_saves_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    # The random tiny model never writes \boxed{}: every group would score 0 and be skipped.
    # A stand-in grader rewards odd-length answers, so groups are mixed and training runs.
    monkeypatch.setattr(rl_loop, "grade", lambda text, answer: (
        float(len(text) % 2), {"correct": float(len(text) % 2), "format": 1.0}))
    log = tmp_path / "rl"
    out = rl_loop.main(rl_args(log, 2))
    assert out["start_step"] == 0 and not out["resumed"]
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    trained = [r for r in rows if r["num_datums"] > 0]
    assert trained, rows
    for r in rows:
        assert set(r) == RL_KEYS | ({"ratio", "kl_sampler"} if r["num_datums"] else set())
        assert 0.0 <= r["reward"] <= 1.0 and r["response_len"] <= 6
        assert r["num_datums"] == 4 * round(r["mixed_groups"] * 2)  # whole groups, 4 each
    for r in trained:  # exactly on-policy: the learner agrees with the sampler
        assert r["ratio"] == pytest.approx(1.0, abs=1e-3)
        assert abs(r["kl_sampler"]) < 1e-3
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])
    capsys.readouterr()

    assert_resumes_at_step_2(rl_loop.main, rl_args(log, 3), log, capsys, ckpts[-1]["state_path"])


def test_rl_loop_with_the_real_grader_skips_constant_groups(tmp_path: Path) -> None:
    out = rl_loop.main(rl_args(tmp_path / "rl", 1))
    [row] = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert row["reward"] == 0.0 and row["mixed_groups"] == 0.0 and row["num_datums"] == 0
    assert "ratio" not in row  # no group had a signal, so no training step was sent
    assert out["checkpoint"]["step"] == 1


# ----- the command line -----------------------------------------------------------------------
RECIPES = sorted(m.name for m in pkgutil.iter_modules(recipes_pkg.__path__))


def test_every_recipe_is_listed() -> None:
    assert {"sl_loop", "rl_loop", "chat_sl", "dpo", "math_rl", "distillation",
            "prompt_distillation", "multi_agent", "tool_use", "rlhf"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_help_lists_keys_and_the_docstring(name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", f"tinsmith.recipes.{name}", "--help"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: python -m tinsmith.recipes.{name} [key=value ...]" in proc.stdout
    assert "leaves out" in proc.stdout.lower()
    for key in ("model_name", "base_url", "log_path", "max_steps", "learning_rate", "lora_rank"):
        assert f"  {key}: " in proc.stdout


@pytest.mark.parametrize(("arg", "needle"), [("nosuchkey=1", "unknown key 'nosuchkey'"),
                                             ("max_steps=lots", "bad value for max_steps"),
                                             ("max_steps", "expected key=value")])
def test_bad_arguments_exit_with_a_message(arg: str, needle: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tinsmith.recipes.sl_loop", arg, f"log_path={tmp_path}"]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr and "accepted keys: model_name, base_url" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_parse_config_coerces_each_field_type() -> None:
    cfg = recipe.parse_config(rl_loop.Config, [
        "base_url=none", "tensorboard=true", "difficulty=medium", "learning_rate=3e-4",
        "max_steps=7", "wandb_project=demo", "fewshot=0"])
    assert cfg.base_url is None and cfg.tensorboard is True and cfg.fewshot is False
    assert cfg.difficulty == "medium" and cfg.learning_rate == 3e-4 and cfg.max_steps == 7
    assert cfg.wandb_project == "demo" and cfg.log_path == "runs/rl_loop"
    assert recipe.parse_config(rl_loop.Config, ["base_url=http://h:1"]).base_url == "http://h:1"
    for bad in ("difficulty=extreme", "tensorboard=maybe", "group_size=2.5"):
        with pytest.raises(SystemExit) as e:
            recipe.parse_config(rl_loop.Config, [bad])
        assert e.value.code == 2


# ----- the logger -----------------------------------------------------------------------------
def test_metrics_logger_drops_rows_past_the_resume_point(tmp_path: Path, capsys) -> None:
    with logs.MetricsLogger(tmp_path, total_steps=5, table_every=2, progress=False) as log:
        for step in range(5):
            log.log(step, {"loss": 1.0 / (step + 1), "n": step})
    out = capsys.readouterr().out
    assert out.count("loss") == 3  # tables after steps 1, 3 and the last one
    assert "0.3333" in out  # floats shown to 4 significant digits
    # A run resumed from a checkpoint at step 3 drops the rows logged after it, then appends.
    with logs.MetricsLogger(tmp_path, total_steps=5, start_step=3, progress=False) as log:
        log.log(3, {"loss": 0.5, "n": 3})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3] == {"step": 3, "loss": 0.5, "n": 3}


def test_optional_backends_are_skipped_with_a_note_when_absent(tmp_path: Path, capsys) -> None:
    with logs.MetricsLogger(tmp_path, total_steps=1, tensorboard=True, progress=False) as log:
        log.log(0, {"loss": 1.0})
    if importlib.util.find_spec("tensorboard") is None:
        assert "`tensorboard` package is not installed" in capsys.readouterr().err
    else:
        assert any((tmp_path / "tensorboard").iterdir())
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 1.0}]
    if importlib.util.find_spec("wandb") is None:
        logs.MetricsLogger(tmp_path / "w", total_steps=1, wandb_project="p", progress=False).close()
        assert "`wandb` package is not installed" in capsys.readouterr().err


def test_last_checkpoint_and_should_save(tmp_path: Path) -> None:
    assert recipe.last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints.jsonl").write_text(
        '{"step": 2, "state_path": "tinker://a/weights/000002"}\n'
        '{"step": 4, "state_path": "tinker://a/weights/000004"}\n\n')
    assert recipe.last_checkpoint(tmp_path)["step"] == 4
    cfg = sl_loop.Config(max_steps=7, save_every=3)
    assert [s for s in range(1, 8) if recipe.should_save(cfg, s)] == [3, 6, 7]
