"""The rlhf recipe on the tiny model against an embedded server: the judge datum's layout,
the three stages' outputs (SFT and reward-model sub-runs, the RL run), that the reward model
scores what the RL stage logs, resume of the RL stage with finished stages skipped, and a
clear error for too little data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tinker
from conftest import API_KEY, TINY
from test_recipes import (
    assert_checkpoint_files,
    assert_finite,
    assert_resumes_at_step_2,
    read_jsonl,
)

from tinsmith.cookbook.renderers import get_renderer
from tinsmith.recipes import rlhf

RL_KEYS = {"step", "reward", "response_len", "mixed_groups", "num_datums", "sample_s",
           "step_s", "eval/reward", "kl_ref", "ratio", "kl_sampler"}


def args(log: Path, max_steps: int, *extra: str) -> list[str]:
    return [f"model_name={TINY}", f"log_path={log}", f"max_steps={max_steps}", "sft_steps=2",
            "rm_steps=2", "sft_batch_size=4", "rm_batch_size=2", "batch_size=2",
            "group_size=2", "max_tokens=6", "lora_rank=4", "save_every=2", "eval_every=2",
            "learning_rate=1e-3", "rm_learning_rate=1e-2", "sft_learning_rate=1e-2", *extra]


def test_judge_datum_weights_only_the_answer(tokenizer) -> None:
    renderer = get_renderer(tokenizer)
    prompt = [{"role": "user", "content": "How do I make tea?"}]
    datum = rlhf.judge_datum(renderer, prompt, "Steep a tea bag.")
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    answer = tokenizer.encode(rlhf.JUDGE_ANSWER, add_special_tokens=False)
    assert weights.sum() == len(answer) and weights[-len(answer):].tolist() == [1.0] * len(answer)
    assert targets[-len(answer):].tolist() == answer
    text = tokenizer.decode(datum.model_input.to_ints())
    assert "user: How do I make tea?" in text and "Reply: Steep a tea bag." in text


def test_rlhf_three_stages_run_and_resume(tmp_path: Path, capsys) -> None:
    log = tmp_path / "rlhf"
    out = rlhf.main(args(log, 2))
    assert out["start_step"] == 0 and not out["resumed"]

    # Stage 1 and 2 are sub-runs with their own metrics and a final checkpoint each.
    sft_rows = read_jsonl(log / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_rows] == [0, 1] and "nll" in sft_rows[0]
    rm_rows = read_jsonl(log / "reward_model" / "metrics.jsonl")
    assert [r["step"] for r in rm_rows] == [0, 1]
    assert {"loss", "pair_accuracy", "margin", "eval/pair_accuracy"} <= set(rm_rows[1])
    assert_finite(sft_rows + rm_rows)
    sft_ckpt = read_jsonl(log / "sft" / "checkpoints.jsonl")[-1]
    rm_ckpt = read_jsonl(log / "reward_model" / "checkpoints.jsonl")[-1]
    assert out["sft_state"] == sft_ckpt["state_path"] and out["rm_state"] == rm_ckpt["state_path"]
    assert sft_ckpt["step"] == rm_ckpt["step"] == 2

    # Stage 3: the main run's metrics and checkpoint, and a transcripts page.
    rows = read_jsonl(log / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert set(rows[0]) <= RL_KEYS and {"reward", "eval/reward"} <= set(rows[0])
    assert_finite(rows)
    assert all(r["reward"] <= 0.0 for r in rows)  # a log-probability
    # RL starts from the SFT weights: at step 0 the sampler IS the KL reference (the SFT
    # model), so the logprob gap is ~0; from the base model's fresh adapter it would not be.
    assert abs(rows[0]["kl_ref"]) < 1e-4
    ckpt = read_jsonl(log / "checkpoints.jsonl")[-1]
    assert ckpt["step"] == 2 and "sampler_path" in ckpt
    assert_checkpoint_files(log, ckpt)
    assert (log / "transcripts" / "step_000000.html").exists()
    config = json.loads((log / "config.json").read_text())
    assert config["rm_state"] == rm_ckpt["state_path"]
    capsys.readouterr()

    # Again with max_steps=3: SFT and reward model are skipped, RL resumes at step 2.
    rows = assert_resumes_at_step_2(rlhf.main, args(log, 3), log, capsys, ckpt["state_path"])
    assert [r["step"] for r in read_jsonl(log / "sft" / "metrics.jsonl")] == [0, 1]
    assert [r["step"] for r in read_jsonl(log / "reward_model" / "metrics.jsonl")] == [0, 1]


def test_reward_model_scores_are_judge_logprobs(tmp_path: Path, base_url: str) -> None:
    """`scores` equals the logprob sum of the answer tokens from an independent forward,
    and a Bradley-Terry step on a pair raises the chosen reply's score over the rejected."""
    service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
    rm = service.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    renderer = get_renderer(rm.get_tokenizer())
    prompt = [{"role": "user", "content": "What is a haiku?"}]
    pair = [rlhf.judge_datum(renderer, prompt, "A short poem, happy to help!"),
            rlhf.judge_datum(renderer, prompt, "Figure it out yourself.")]
    before = rlhf.scores(rm, pair)
    out = rm.forward(pair, "cross_entropy").result()
    for s, d, o in zip(before, pair, out.loss_fn_outputs):
        w = d.loss_fn_inputs["weights"].to_numpy()
        assert s == pytest.approx(float((o["logprobs"].to_numpy() * w).sum()), rel=1e-5)
    for _ in range(3):
        rm.forward_backward(pair, "bradley_terry").result()
        rm.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
    after = rlhf.scores(rm, pair)
    assert after[0] - after[1] > before[0] - before[1] + 0.1
    assert np.isfinite(after).all()


def test_too_few_pairs_is_a_clear_error(tmp_path: Path, capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "No."}) + "\n")
    with pytest.raises(SystemExit, match="training pairs, fewer than a batch"):
        rlhf.main(args(tmp_path / "few", 2, f"data_path={data}"))
    assert not (tmp_path / "few" / "sft").exists()  # nothing half-written
