"""The cookbook's building blocks on their own: hyperparameters, dataset loaders,
arithmetic problems and grading, HTML transcripts. No server needed."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path

import pytest

from tinsmith.cookbook import arithmetic, curves, datasets, hyperparams, transcripts
from tinsmith.cookbook.arithmetic import extract_boxed, grade, make_problems
from tinsmith.cookbook.hyperparams import get_lora_lr, get_lora_lr_for_model, warmup_cosine

# --- hyperparams -------------------------------------------------------------------------


def expected_lr(hidden: int, exponent: float) -> float:
    return 5e-5 * 10 * (2000 / hidden) ** exponent


@pytest.mark.parametrize("hidden", [576, 2048, 4096, 8192])
def test_lora_lr_formula(hidden):
    assert get_lora_lr(hidden, "llama") == pytest.approx(expected_lr(hidden, 0.781), rel=1e-12)
    assert get_lora_lr(hidden, "Qwen") == pytest.approx(expected_lr(hidden, 0.0775), rel=1e-12)


def test_lora_lr_known_values():
    # Hand-computed: H = 2000 is the formula's pivot; 4x wider scales by 4 ** -P.
    assert get_lora_lr(2000, "llama") == pytest.approx(5e-4)
    assert get_lora_lr(8000, "llama") == pytest.approx(5e-4 * 4 ** -0.781)
    assert get_lora_lr(8000, "qwen") == pytest.approx(5e-4 * 4 ** -0.0775)


def test_lora_lr_from_smollm2_config():
    from tinsmith.models.catalog import resolve_model_dir

    config = resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") / "config.json"
    assert json.loads(config.read_text())["hidden_size"] == 576
    want = expected_lr(576, 0.781)
    assert get_lora_lr_for_model(config) == pytest.approx(want, rel=1e-12)
    assert get_lora_lr_for_model(config.parent) == pytest.approx(want, rel=1e-12)
    assert 1.2e-3 < want < 1.4e-3


def test_lora_lr_unknown_family_raises():
    with pytest.raises(ValueError, match="gemma"):
        get_lora_lr(2048, "gemma")
    with pytest.raises(ValueError, match="mistral"):
        get_lora_lr_for_model({"hidden_size": 4096, "model_type": "mistral"})
    assert get_lora_lr_for_model({"hidden_size": 4096, "model_type": "qwen3"}) == pytest.approx(
        expected_lr(4096, 0.0775))


def test_warmup_cosine_schedule():
    peak, total, warm, ratio = 1e-3, 50, 10, 0.1
    lrs = [warmup_cosine(s, total, warm, peak, ratio) for s in range(total)]
    # warmup: a straight line through the origin, reaching the peak at step `warm`
    ramp = lrs[: warm + 1]
    diffs = [b - a for a, b in itertools.pairwise(ramp)]
    assert all(d == pytest.approx(diffs[0]) for d in diffs) and diffs[0] > 0
    assert lrs[0] > 0
    assert lrs[warm] == pytest.approx(peak) and max(lrs) == lrs[warm]
    # cosine: non-increasing after the warmup, ends exactly at the minimum
    decay = lrs[warm:]
    assert all(b <= a for a, b in itertools.pairwise(decay))
    assert lrs[-1] == pytest.approx(peak * ratio)
    mid = warm + (total - 1 - warm) / 2  # halfway through the decay: halfway between
    assert warmup_cosine(int(mid), total, warm, peak, ratio) == pytest.approx(
        peak * ratio + (peak - peak * ratio) * 0.5 * (1 + math.cos(math.pi * (int(mid) - warm)
                                                                    / (total - 1 - warm))))
    assert warmup_cosine(total + 5, total, warm, peak, ratio) == pytest.approx(peak * ratio)
    assert warmup_cosine(0, total, 0, peak) == pytest.approx(peak)
    with pytest.raises(ValueError):
        warmup_cosine(0, 10, 10, peak)


def test_rl_lr_sqrt_batch_scaling():
    assert hyperparams.rl_lr_for_batch(1e-4, 256, 64) == pytest.approx(2e-4)
    assert hyperparams.rl_lr_for_batch(1e-4, 16, 64) == pytest.approx(5e-5)
    assert hyperparams.rl_lr_for_batch(1e-4, 64, 64) == pytest.approx(1e-4)


# --- datasets ----------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_conversation_and_prompt_completion_round_trip(tmp_path):
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>"},
         {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "x": 1}],
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs[:1]] + [""]
                       + [{"messages": convs[1]}])
    assert datasets.load_conversations(path) == convs

    pcs = [{"prompt": "Say hi", "completion": " hi"}, {"prompt": "Q?", "completion": "A."}]
    path = write_jsonl(tmp_path / "pc.jsonl", pcs)
    want = [[{"role": "user", "content": p["prompt"]},
             {"role": "assistant", "content": p["completion"]}] for p in pcs]
    assert datasets.load_prompt_completions(path) == want
    assert datasets.load_conversations(path) == want  # either shape per line


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"messages": [{"role": "user"}]}), "content"),
    (json.dumps({"prompt": "p"}), "completion"),
])
def test_bad_lines_name_the_line_number(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", bad_line, good])
    with pytest.raises(datasets.DatasetFormatError, match=rf"bad\.jsonl:3: .*{message}"):
        datasets.load_conversations(path)


def test_preference_pairs(tmp_path):
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
         "chosen": "yes", "rejected": "no"},
    ]
    pairs = datasets.load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs[0] == datasets.PreferencePair(
        prompt=[{"role": "user", "content": "Capital of France?"}], chosen="Paris.", rejected="Rome.")
    assert pairs[1].prompt == rows[1]["prompt"]
    assert pairs[1].chosen_conversation()[-1] == {"role": "assistant", "content": "yes"}
    assert pairs[1].rejected_conversation()[-1] == {"role": "assistant", "content": "no"}
    bad = write_jsonl(tmp_path / "pb.jsonl", [rows[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(datasets.DatasetFormatError, match=r"pb\.jsonl:2: .*rejected"):
        datasets.load_preference_pairs(bad)


def test_hf_dataset_without_package_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        datasets.load_hf_dataset(tmp_path)


def test_hf_dataset_round_trip(tmp_path):
    hf = pytest.importorskip("datasets")  # optional dependency: skipped when absent
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    hf.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert datasets.load_hf_dataset(tmp_path / "ds") == rows


def test_split_and_batches_are_deterministic_and_cover_everything():
    items = list(range(103))
    train, test = datasets.train_test_split(items, 0.2, seed=7)
    assert (train, test) == datasets.train_test_split(items, 0.2, seed=7)
    assert len(test) == round(103 * 0.2) and sorted(train + test) == items
    assert datasets.train_test_split(items, 0.2, seed=8) != (train, test)

    b0 = datasets.batches(items, 10, seed=1, epoch=0)
    assert b0 == datasets.batches(items, 10, seed=1, epoch=0)
    assert [len(b) for b in b0] == [10] * 10 + [3]
    assert sorted(x for b in b0 for x in b) == items
    b1 = datasets.batches(items, 10, seed=1, epoch=1)
    assert b1 != b0 and sorted(x for b in b1 for x in b) == items
    assert b0[0] != items[:10]  # actually shuffled
    dropped = datasets.batches(items, 10, seed=1, epoch=0, drop_last=True)
    assert dropped == b0[:10]


def test_env_protocols():
    env = arithmetic.ArithmeticEnv(make_problems(1, seed=0)[0])
    assert isinstance(env, datasets.Env)
    assert env.initial_prompt()[0]["content"] == arithmetic.SYSTEM_PROMPT

    class Countdown:
        def __init__(self) -> None:
            self.left = 2

        def initial_observation(self) -> str:
            return "go"

        def step(self, action_text: str) -> datasets.StepResult:
            self.left -= 1
            done = self.left == 0
            return datasets.StepResult(None if done else "again", 1.0, done, {})

    assert isinstance(Countdown(), datasets.MultiStepEnv)
    assert not isinstance(Countdown(), datasets.Env)
    obs, reward, done, metrics = Countdown().step("x")
    assert (obs, reward, done, metrics) == ("again", 1.0, False, {})


# --- arithmetic --------------------------------------------------------------------------

RECOMPUTE = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "multiply_add": lambda a, b, c: a * b + c,
}


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_problems_deterministic_and_correct(difficulty):
    problems = make_problems(200, seed=3, difficulty=difficulty)
    assert problems == make_problems(200, seed=3, difficulty=difficulty)
    assert problems != make_problems(200, seed=4, difficulty=difficulty)
    assert len({p.question for p in problems}) > 150
    for p in problems:
        assert p.answer == RECOMPUTE[p.operation](*p.operands)
        assert p.answer > 0 and isinstance(p.answer, int)
        numbers = [int(x) for x in re.findall(r"\d+", p.question)]
        assert sorted(numbers) == sorted(p.operands), p
    ops = {p.operation for p in problems}
    assert ops >= {"add", "subtract"} and ("multiply" in ops) == (difficulty != "easy")
    with pytest.raises(ValueError):
        make_problems(1, seed=0, difficulty="impossible")  # type: ignore[arg-type]


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{7}.") == "7"
    assert extract_boxed(r"first \boxed{3} then \boxed{ 12 }") == " 12 "
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{a{b{c}}d} and \boxed{e") == "a{b{c}}d"  # unclosed ignored
    assert extract_boxed(r"\boxed{\boxed{3}}") == r"\boxed{3}"
    assert extract_boxed("the answer is 7") is None
    assert extract_boxed(r"\boxed{5") is None
    assert extract_boxed(r"\boxed{}") == ""


def test_grade():
    assert grade(r"3 + 4 = 7, so \boxed{7}", 7) == (1.1, {"correct": 1.0, "format": 1.0})
    assert grade(r"\boxed{8}", 7) == (pytest.approx(0.1), {"correct": 0.0, "format": 1.0})
    assert grade("the answer is 7", 7) == (0.0, {"correct": 0.0, "format": 0.0})
    assert grade(r"\boxed{1,024}", 1024)[0] == pytest.approx(1.1)
    assert grade(r"\boxed{ +7 }", 7)[0] == pytest.approx(1.1)
    assert grade(r"\boxed{7.0}", 7)[0] == pytest.approx(1.1)
    assert grade(r"\boxed{-7}", 7)[0] == pytest.approx(0.1)
    assert grade(r"\boxed{7 apples}", 7)[0] == pytest.approx(0.1)
    assert grade(r"\boxed{7} no wait \boxed{8}", 7)[0] == pytest.approx(0.1)  # last box counts
    p = make_problems(1, seed=11, difficulty="hard")[0]
    assert arithmetic.ArithmeticEnv(p).reward(rf"\boxed{{{p.answer}}}")[0] == pytest.approx(1.1)


# --- transcripts -------------------------------------------------------------------------


def test_html_transcripts(tmp_path):
    episodes = [
        transcripts.Episode(
            messages=[{"role": "system", "content": "sys & co"},
                      {"role": "user", "content": "<script>alert('x')</script>"},
                      {"role": "assistant", "content": r"\boxed{7}"}],
            reward=1.1, metrics={"correct": 1.0}, title="problem <1>"),
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "<img src=x>", "content": "odd role"}],
         "reward": -0.25, "metrics": {"<k>": "v"}},
        {"messages": [{"role": "assistant", "content": "no reward"}]},
    ]
    out = transcripts.write_html_transcripts(tmp_path / "sub" / "t.html", episodes)
    assert out == tmp_path / "sub" / "t.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=x&gt;" in page
    assert "sys &amp; co" in page and "problem &lt;1&gt;" in page and "&lt;k&gt;=v" in page
    assert "reward: 1.1<" in page and "reward: -0.25<" in page
    assert page.count("reward: ") == 2  # the reward-less episode shows none
    assert page.count('class="episode"') == 3
    assert "http://" not in page and "https://" not in page  # self-contained
    assert '<div class="msg user">' in page and '<div class="msg assistant">' in page
    assert "mean reward 0.425" in page


def test_curves_report_reads_metrics_back(tmp_path: Path) -> None:
    rows = [{"step": 0, "loss": 4.0, "step_s": 1.5}, {"step": 1, "loss": 2.0, "step_s": 2.0},
            {"step": 1, "loss": 3.0, "step_s": 2.5, "eval/acc": 0.5},  # a resumed rewrite
            {"step": 2, "loss": 1.0, "step_s": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["loss"] for r in curves.read_rows(tmp_path)] == [4.0, 3.0, 1.0]
    assert curves.sparkline([4.0, 3.0, 1.0]) == "█▆▁"
    text = curves.report(tmp_path, ["loss", "eval/acc", "missing"], every=2)
    assert text.splitlines() == [
        f"{tmp_path}: 3 steps, 5 s of steps",
        "loss: 4 -> 1  █▆▁", "    0:4  2:1",
        "eval/acc: 0.5 -> 0.5  ▁", "    1:0.5",
        "missing: not logged"]
    with pytest.raises(SystemExit, match="no metrics"):
        curves.read_rows(tmp_path / "nowhere")


def test_grouped_advantages_skip_flat_groups() -> None:
    from tinsmith.cookbook.rl import grouped_advantages

    picked, mixed = grouped_advantages([1.0, 1.0, 0.0, 2.0, 3.0, 3.0], group_size=2)
    assert mixed == 1
    assert picked == [(2, -1.0), (3, 1.0)]  # group 0 and 2 are flat, group 1 is centred
    assert grouped_advantages([], 4) == ([], 0)


def test_grpo_datums_lay_out_prompt_and_sample_as_rl_loop_does() -> None:
    """One datum per sample of a mixed group, prompt positions carrying 0 and 0: the same
    datum as the flat rl_loop's `rl_datum`; flat groups give none."""
    from types import SimpleNamespace

    from tinsmith.cookbook.rl import grpo_datums
    from tinsmith.recipes.rl_loop import rl_datum

    long, short = (SimpleNamespace(tokens=[4, 5], logprobs=[-0.5, -2.0]),
                   SimpleNamespace(tokens=[6], logprobs=[-1.0]))
    samples = [([1, 2, 3], long), ([1, 2, 3], short), ([7, 8], long), ([7, 8], short)]
    data, n_sampled, mixed = grpo_datums(samples, [1.0, 0.0, 2.0, 2.0], group_size=2)
    assert n_sampled == [2, 1] and mixed == 1 and len(data) == 2
    d = data[0].loss_fn_inputs
    assert data[0].model_input.to_ints() == [1, 2, 3, 4]
    assert d["target_tokens"].tolist() == [2, 3, 4, 5]
    assert d["logprobs"].tolist() == [0.0, 0.0, -0.5, -2.0]
    assert d["advantages"].tolist() == [0.0, 0.0, 0.5, 0.5]
    for datum, (prompt, seq), a in zip(data, samples, [0.5, -0.5]):
        want = rl_datum(prompt, seq.tokens, seq.logprobs, a)
        assert datum.model_input == want.model_input
        for key in ("target_tokens", "logprobs", "advantages"):
            assert datum.loss_fn_inputs[key].tolist() == want.loss_fn_inputs[key].tolist()
    assert grpo_datums(samples[2:], [2.0, 2.0], group_size=2) == ([], [], 0)
