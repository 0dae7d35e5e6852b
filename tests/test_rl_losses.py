"""RL losses end to end through the official SDK on the tiny model.

Each built-in policy-gradient loss gets a batch built the way an RL loop builds it
(prompt positions with advantage 0 and sampler logprob 0, sampled positions with the
sampler's logprobs, nudged so ratios land inside and beyond the clip bounds), and its
`loss:sum` must equal the formula evaluated in NumPy on the logprobs the server returns.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, logprobs_of
from tinker import types

from tinsmith.recipes.rl_loop import rl_datum as recipe_rl_datum

ADAM = types.AdamParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def run(service_client):
    return service_client.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()


@pytest.fixture(scope="module")
def rollouts(run, tokenizer):
    """(prompt tokens, sampled sequences) from the run's own sampler, recorded for stable_reinforce."""
    sampler = run.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = tokenizer.encode("Count with me: one, two,")
    resp = sampler.sample(types.ModelInput.from_ints(prompt), 4,
                          types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])).result()
    return prompt, list(resp.sequences)


def rl_datum(prompt: list[int], seq, advantage: float, nudge: np.ndarray | None = None) -> types.Datum:
    """The cookbook's layout (rl_loop.rl_datum) for a sampled sequence; `nudge` shifts the
    sampler logprobs, so ratios differ from 1."""
    lq = np.asarray(seq.logprobs, np.float64) + (0.0 if nudge is None else nudge)
    return recipe_rl_datum(prompt, list(seq.tokens), lq.astype(np.float32).tolist(), advantage)


def _inputs(d: types.Datum, key: str) -> np.ndarray:
    return np.asarray(d.loss_fn_inputs[key].to_numpy(), np.float64)


def formula(loss: str, data: list[types.Datum], lps: list[np.ndarray], cfg: dict) -> float:
    """The hosted formulas (tinker-protocol.md §11.1), in NumPy, on the returned logprobs."""
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    total = 0.0
    for d, lp in zip(data, lps):
        lp = lp.astype(np.float64)
        lq, a = _inputs(d, "logprobs"), _inputs(d, "advantages")
        r = np.exp(np.where(a != 0, lp - lq, 0.0))
        if loss == "importance_sampling":
            total += -(r * a).sum()
        elif loss == "ppo":
            total += -np.minimum(r * a, np.clip(r, lo, hi) * a).sum()
        elif loss == "cispo":
            total += -(np.clip(r, lo, hi) * lp * a).sum()
        elif loss == "dro":
            total += -(lp * a - 0.5 * cfg.get("beta", 0.05) * (lp - lq) ** 2).sum()
        elif loss == "gspo":
            m = _inputs(d, "sequence_ratio_mask") != 0
            s = np.exp((lp - lq)[m].mean()) if m.any() else 1.0
            s = np.where(a != 0, s, 1.0)
            total += -np.minimum(s * a, np.clip(s, lo, hi) * a).sum()
    return float(total)


NUDGES = [np.array([0.0, 0.5, -0.5, 0.1, -0.1, 0.3]), np.array([-0.4, 0.0, 0.2, 0.05, 0.3, -0.2]),
          np.array([0.02, -0.02, 0.6, -0.7, 0.0, 0.1]), np.zeros(6)]
CASES = [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("cispo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.1}),
    ("dro", {"beta": 0.2}),
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
]


@pytest.mark.parametrize(("loss", "cfg"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_policy_loss_matches_formula(loss, cfg, run, rollouts) -> None:
    prompt, seqs = rollouts
    advantages = [1.0, -0.5, 0.75, -1.25]
    data = [rl_datum(prompt, s, a, NUDGES[i][: len(s.tokens)]) for i, (s, a) in enumerate(zip(seqs, advantages))]
    if loss == "gspo":
        n_prompt = len(prompt) - 1
        data = [types.Datum(model_input=d.model_input, loss_fn_inputs={
            **d.loss_fn_inputs,
            "sequence_ratio_mask": [0.0] * n_prompt + [1.0] * (d.model_input.length - n_prompt)})
            for d in data]
    fwd = run.forward(data, loss, cfg or None).result()
    lps = logprobs_of(fwd)
    expected = formula(loss, data, lps, cfg)
    assert fwd.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    out = run.forward_backward(data, loss, cfg or None).result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    n_sampled = sum(len(s.tokens) for s in seqs)
    assert out.metrics["action_tokens:sum"] == n_sampled
    # The sampler-vs-learner metrics describe the nudged ratios: mean r = mean exp(-nudge).
    ratios = np.concatenate([np.exp(-NUDGES[i][: len(s.tokens)]) for i, s in enumerate(seqs)])
    if loss != "gspo":
        assert out.metrics["ratio:mean"] == pytest.approx(ratios.mean(), rel=1e-3)
        assert out.metrics["kl_sampler:mean"] == pytest.approx((ratios - 1 - np.log(ratios)).mean(),
                                                               rel=1e-2, abs=1e-5)
    if loss in ("ppo", "cispo", "gspo"):
        assert 0.0 <= out.metrics["clip_fraction:mean"] <= 1.0
    if loss == "cispo":  # ratios outside [0.7, 1.1]: nudges below log(1/1.1) or above log(1/0.7)
        nudge = np.concatenate([NUDGES[i][: len(s.tokens)] for i, s in enumerate(seqs)])
        outside = (np.exp(-nudge) < 0.7) | (np.exp(-nudge) > 1.1)
        assert out.metrics["clip_fraction:mean"] == pytest.approx(outside.mean())
    run.optim_step(types.AdamParams(learning_rate=0.0)).result()  # clear the gradients


def test_cross_entropy_top_k_targets_dense_and_sparse(run, tokenizer) -> None:
    """[N, K] targets and weights (top-K distillation), sent dense and as the SDK's CSR."""
    import torch

    ids = tokenizer.encode("Teachers give soft targets to students.")
    n, k = len(ids) - 1, 3
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 1000, size=(n, k))
    targets[:, 0] = ids[1:]
    weights = rng.random((n, k)).astype(np.float32)
    weights[:, 2] = 0.0  # a sparse column: CSR leaves these cells out
    dense = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(targets),
                                        "weights": types.TensorData.from_numpy(weights)})
    sparse = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                         loss_fn_inputs={"target_tokens": torch.tensor(targets),
                                         "weights": torch.tensor(weights)})
    a = run.forward([dense], "cross_entropy").result()
    b = run.forward([sparse], "cross_entropy").result()
    lp = logprobs_of(a)[0]
    assert lp.shape == (n, k)
    assert a.metrics["loss:sum"] == pytest.approx(float(-(weights * lp).sum()), rel=1e-5)
    # CSR fills unlisted cells with 0 (token 0, weight 0): same loss, same listed logprobs.
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-6)
    np.testing.assert_allclose(logprobs_of(b)[0][:, :2], lp[:, :2], rtol=1e-6)


def test_all_zero_advantages_change_nothing(service_client, rollouts) -> None:
    run = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    prompt, seqs = rollouts
    data = [rl_datum(prompt, s, 0.0) for s in seqs]
    before = logprobs_of(run.forward(data, "ppo").result())
    out = run.forward_backward(data, "ppo").result()
    assert out.metrics["loss:sum"] == 0.0
    run.optim_step(ADAM).result()
    after = logprobs_of(run.forward(data, "ppo").result())
    for x, y in zip(before, after):
        np.testing.assert_allclose(x, y, atol=1e-6)


# ----- stable_reinforce: the server's own sampling record --------------------------------
def provenance_datum(prompt: list[int], seq, advantage: float, client_lq_shift: float = 0.0) -> types.Datum:
    """An rl_datum with the cookbook's provenance spans (tinker-protocol.md §9.3)."""
    d = rl_datum(prompt, seq, advantage, np.full(len(seq.tokens), client_lq_shift))
    sid = seq.sequence_id
    return d.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
                     types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens) - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(prompt) - 1),
                        types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens))],
    )


def test_stable_reinforce_uses_the_recorded_sampler_logprobs(service_client, rollouts) -> None:
    prompt, seqs = rollouts
    run = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    advantages = [1.0, -1.0, 0.5, -0.5]
    # Train a little first so the learner has drifted from the policy that sampled.
    run.forward_backward([rl_datum(prompt, s, a) for s, a in zip(seqs, advantages)],
                         "importance_sampling").result()
    run.optim_step(types.AdamParams(learning_rate=0.05)).result()
    # The client's logprobs are deliberately wrong: the loss must use the server's record.
    data = [provenance_datum(prompt, s, a, client_lq_shift=-3.0) for s, a in zip(seqs, advantages)]
    cfg = {"kl_coeff": 0.3, "clip_high_threshold": 1.02}
    out = run.forward(data, "stable_reinforce", cfg).result()
    n_prompt = len(prompt) - 1
    expected, ratios = 0.0, []
    for s, a, lp in zip(seqs, advantages, logprobs_of(out)):
        lp_s = lp[n_prompt:].astype(np.float64)
        lr = np.asarray(s.logprobs, np.float64)
        r = np.exp(lp_s - lr)
        ratios.append(r)
        expected += -(np.minimum(r, 1.02) * a * lp_s).sum() + 0.3 * 0.5 * ((lp_s - lr) ** 2).sum()
    ratios = np.concatenate(ratios)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    assert out.metrics["ratio:mean"] == pytest.approx(ratios.mean(), rel=1e-4)
    assert out.metrics["clip_fraction:mean"] == pytest.approx((ratios > 1.02).mean())
    assert out.metrics["action_tokens:sum"] == len(ratios)
    assert 0 < (ratios > 1.02).mean() < 1  # the cap is exercised both ways
    out = run.forward_backward(data, "stable_reinforce", cfg).result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    run.optim_step(ADAM).result()


def test_stable_reinforce_bad_provenance(service_client, run, rollouts, tokenizer) -> None:
    prompt, seqs = rollouts
    good = provenance_datum(prompt, seqs[0], 1.0)
    cases = {
        "needs provenance spans": rl_datum(prompt, seqs[0], 1.0),
        "has no sampling record": good.with_provenance(
            model_input=good.model_input_spans,
            loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id="nobody:sample:0:0:0", offset=1,
                                                       length=len(prompt) - 1),
                            types.SampledProvenanceSpan(sequence_id=seqs[0].sequence_id,
                                                        length=len(seqs[0].tokens))]),
        # seqs[1]'s spans on seqs[0]'s tokens: the recorded tokens do not match the targets.
        "differ from the sampled tokens": good.with_provenance(
            model_input=good.model_input_spans,
            loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=seqs[1].sequence_id, offset=1,
                                                       length=len(prompt) - 1),
                            types.SampledProvenanceSpan(sequence_id=seqs[1].sequence_id,
                                                        length=len(seqs[0].tokens))]),
    }
    for message, datum in cases.items():
        with pytest.raises(Exception, match=message):
            run.forward_backward([datum], "stable_reinforce").result()
    # A sampler without record_stability_info records nothing.
    plain = run.save_weights_and_get_sampling_client().result()
    s = plain.sample(types.ModelInput.from_ints(prompt), 1,
                     types.SamplingParams(max_tokens=3, seed=1, stop=[])).result().sequences[0]
    with pytest.raises(Exception, match="has no sampling record"):
        run.forward_backward([provenance_datum(prompt, s, 1.0)], "stable_reinforce").result()
    out = run.forward_backward([good], "stable_reinforce").result()  # the run is unharmed
    assert np.isfinite(out.metrics["loss:sum"])
    run.optim_step(types.AdamParams(learning_rate=0.0)).result()


# ----- a GRPO-style loop -----------------------------------------------------------------
def test_grpo_loop_raises_reward(service_client, tokenizer) -> None:
    """Groups of samples per prompt, reward 1 for the task's answer token, advantages
    centred in each group (constant groups skipped), importance_sampling updates.

    The task is verifiable and learnable by the random tiny model: under top_k=4 sampling
    each prompt has 4 candidate answers, and only the one the initial model ranks lowest
    among them (found by sampling) earns the reward.
    """
    run = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=21).result()
    prompts = [tokenizer.encode(t) for t in ("Pick a word:", "Say something nice:", "Answer:")]
    params = types.SamplingParams(max_tokens=1, temperature=1.0, top_k=4, stop=[])

    def evaluate(sampler, answers=None) -> tuple[float, list[int]]:
        found, hits = [], []
        for i, p in enumerate(prompts):
            r = sampler.sample(types.ModelInput.from_ints(p), 64,
                               types.SamplingParams(**{**params.model_dump(), "seed": 1000 + i})).result()
            toks = [s.tokens[0] for s in r.sequences]
            found.append(min(set(toks), key=toks.count))
            answer = found[-1] if answers is None else answers[i]
            hits.append(np.mean([t == answer for t in toks]))
        return float(np.mean(hits)), found

    sampler = run.save_weights_and_get_sampling_client().result()
    initial, answers = evaluate(sampler)
    for step in range(8):
        data = []
        for p, answer in zip(prompts, answers):
            group = sampler.sample(types.ModelInput.from_ints(p), 8,
                                   types.SamplingParams(**{**params.model_dump(), "seed": step})).result()
            rewards = np.array([float(s.tokens[0] == answer) for s in group.sequences])
            if rewards.std() == 0:
                continue  # a constant group carries no signal
            for s, adv in zip(group.sequences, rewards - rewards.mean()):
                data.append(rl_datum(p, s, float(adv)))
        if data:
            run.forward_backward(data, "importance_sampling").result()
            # Adam's first steps are ~lr * sign(g) on every weight: keep lr small for a model this tiny.
            run.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        sampler = run.save_weights_and_get_sampling_client().result()
    final, _ = evaluate(sampler, answers)
    assert initial < 0.3
    assert final > initial + 0.3, (initial, final)
