"""Smoke tests of the chat_sl and dpo recipes: two steps on the tiny model against an
embedded server, metrics and a checkpoint written, and a second run resumes from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY
from test_recipes import assert_checkpoint_files, assert_finite, read_jsonl

from tinsmith.recipes import chat_sl, dpo


def _common(log: Path, steps: int) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log}", f"max_steps={steps}", "lora_rank=4",
            "save_every=2", "eval_every=1"]


def test_chat_sl_runs_evaluates_and_resumes(tmp_path: Path, capsys) -> None:
    log = tmp_path / "chat"
    out = chat_sl.main([*_common(log, 2), "batch_size=4", "learning_rate=1e-2", "train_on=last_assistant"])
    assert not out["resumed"]
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and all("eval/nll" in r for r in rows)
    assert_finite(rows)
    assert rows[1]["eval/nll"] < rows[0]["eval/nll"]  # held-out NLL falls at lr 1e-2
    ckpts = read_jsonl(log / "checkpoints.jsonl")
    assert [c["step"] for c in ckpts] == [2]
    assert_checkpoint_files(log, ckpts[-1])
    capsys.readouterr()
    out = chat_sl.main([*_common(log, 3), "batch_size=4", "learning_rate=1e-2", "train_on=last_assistant"])
    assert out["start_step"] == 2 and out["resumed"]
    assert [r["step"] for r in read_jsonl(log / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.parametrize("loss", ["server", "client"])
def test_dpo_runs_and_resumes(tmp_path: Path, loss: str) -> None:
    log = tmp_path / "dpo"
    dpo.main([*_common(log, 2), f"loss={loss}", "batch_size=2", "learning_rate=1e-2"])
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert_finite(rows)
    # Step 0 is the reference policy itself: margin exactly 0; one step later it prefers chosen.
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["margin"] > 0 and rows[1]["eval/margin"] > rows[0]["eval/margin"]
    assert_checkpoint_files(log, read_jsonl(log / "checkpoints.jsonl")[-1])
    out = dpo.main([*_common(log, 3), f"loss={loss}", "batch_size=2", "learning_rate=1e-2"])
    assert out["start_step"] == 2 and [r["step"] for r in read_jsonl(log / "metrics.jsonl")] == [0, 1, 2]


def test_server_and_client_dpo_recipes_agree(tmp_path: Path) -> None:
    """The recipe's two loss paths are the same DPO: equal losses step by step."""
    for loss in ("server", "client"):
        dpo.main([*_common(tmp_path / loss, 3), f"loss={loss}", "batch_size=2", "learning_rate=1e-2"])
    a, b = (read_jsonl(tmp_path / loss / "metrics.jsonl") for loss in ("server", "client"))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
