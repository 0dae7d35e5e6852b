"""Every built-in loss against an independent NumPy reference, plus the loss registry.

The references below are written from the formulas in the docstrings of
tinsmith/engine/losses/ (the hosted service's, see the protocol notes §11.1), with the
gradient with respect to the learner logprobs `lp` derived by hand. Each reference takes
`sg`, the point where stop-gradient quantities are evaluated, so a central finite
difference of its value at fixed `sg` checks the hand-derived gradient too.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from tinsmith.engine.losses import BUILTIN, LossBatch, LossRegistry, LossSpec
from tinsmith.types import UserError

RTOL, ATOL = 1e-10, 1e-12
LO, HI = 0.8, 1.2  # the default clip thresholds


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def bounds(x: dict, cfg: dict) -> tuple:
    return (x.get("clip_low_threshold", cfg.get("clip_low_threshold", LO)),
            x.get("clip_high_threshold", cfg.get("clip_high_threshold", HI)))


def policy_metrics(lp, lq, mask, clipped=None) -> dict[str, float]:
    r = np.exp(lp[mask] - lq[mask])
    out = {"ratio:mean": r.mean() if mask.any() else 0.0,
           "kl_sampler:mean": (r - 1 - np.log(r)).mean() if mask.any() else 0.0,
           "action_tokens:sum": float(mask.sum())}
    if clipped is not None:
        out["clip_fraction:mean"] = clipped[mask].mean() if mask.any() else 0.0
    return out


def clip_surrogate(r, adv, lo, hi):
    """-sum min(r*A, clip(r)*A): value, the bool mask where the clipped term is active
    (gradient 0; at a bound the unclipped branch counts), and d/d(log r) elsewhere."""
    value = -np.minimum(r * adv, np.clip(r, lo, hi) * adv).sum()
    clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
    return value, clipped, np.where(clipped, 0.0, -adv * r)


def ref_policy(name, lp, x, datum, n, cfg, sg=None):
    """(value, gradient wrt lp, metrics) of a policy loss on concatenated arrays."""
    sg = lp if sg is None else sg
    lq, adv = x["logprobs"], x["advantages"]
    live = adv != 0
    action = live | (lq != 0)
    lo, hi = bounds(x, cfg)
    r = np.exp(np.where(live, lp - lq, 0.0)) if name in ("importance_sampling", "ppo") else None
    if name == "importance_sampling":  # r: 1 on masked positions, never inf * 0
        return -(r * adv).sum(), -adv * r, policy_metrics(lp, lq, action)
    if name == "ppo":
        value, clipped, grad = clip_surrogate(r, adv, lo, hi)
        return value, grad, policy_metrics(lp, lq, action, clipped)
    if name == "cispo":
        rs = np.exp(np.where(live, sg - lq, 0.0))
        c = np.clip(rs, lo, hi)  # sg(clip(r))
        clipped = live & ((rs < lo) | (rs > hi))
        return -(c * lp * adv).sum(), -c * adv, policy_metrics(lp, lq, action, clipped)
    if name == "dro":
        beta = cfg.get("beta", 0.05)
        value = -(lp * adv - beta / 2 * (lp - lq) ** 2).sum()
        return value, -(adv - beta * (lp - lq)), policy_metrics(lp, lq, action)
    if name == "gspo":
        in_seq = x["sequence_ratio_mask"] != 0
        s = np.ones(n)
        for d in range(n):
            m = in_seq & (datum == d)
            if m.any():  # an empty sequence_ratio_mask leaves s = 1
                s[d] = np.exp(np.mean(sg[m] - lq[m]))
        s_t = np.where(live, s[datum] * np.exp(lp - sg), 1.0)  # value s, gradient of lp
        value, clipped, grad = clip_surrogate(s_t, adv, lo, hi)
        metrics = policy_metrics(lp, lq, in_seq | action, clipped)
        has = [d for d in range(n) if (in_seq & (datum == d)).any()]
        metrics["sequence_ratio:mean"] = s[has].mean() if has else 0.0
        return value, grad, metrics
    if name == "stable_reinforce":
        lr, m = x["recorded_logprobs"], x["recorded_mask"] != 0
        cap, k = cfg.get("clip_high_threshold", 2.0), cfg.get("kl_coeff", 0.0)
        diff = np.where(m, lp - lr, 0.0)
        rs = np.exp(np.where(m, sg - lr, 0.0))
        w = np.where(m, np.minimum(rs, cap), 0.0)
        value = -(w * adv * lp).sum() + k / 2 * (diff**2).sum()
        return value, -w * adv + k * diff, policy_metrics(lp, lr, m, m & (rs > cap))
    raise AssertionError(name)


def ref_pairs(name, lp, x, datum, n, cfg, sg=None):
    """dpo / bradley_terry: pair loss through log-sigmoid of z = h_chosen - h_rejected."""
    w, eps = x["weights"], cfg.get("label_smoothing", 0.0)
    beta = cfg.get("beta", 0.1) if name == "dpo" else 1.0
    ref = x["ref_logprobs"] if name == "dpo" else 0.0
    h = beta * np.bincount(datum, weights=w * (lp - ref), minlength=n)
    z = h[0::2] - h[1::2]
    value = ((1 - eps) * np.logaddexp(0, -z) + eps * np.logaddexp(0, z)).sum()  # -log sig = softplus(-z)
    dz = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)
    grad = dz[datum // 2] * np.where(datum % 2 == 0, 1.0, -1.0) * beta * w
    metrics = {"pair_accuracy:mean": (z > 0).mean(), "margin:mean": z.mean(),
               "chosen_reward:mean": h[0::2].mean(), "rejected_reward:mean": h[1::2].mean(),
               "pairs:sum": float(len(z))}
    return value, grad, metrics


def run(spec: LossSpec | str, lps, inputs, **overrides):
    """The torch loss in float64 on per-datum arrays: (value, concatenated grad, metrics)."""
    spec = BUILTIN[spec] if isinstance(spec, str) else spec
    leaves = [torch.tensor(lp, dtype=torch.float64, requires_grad=True) for lp in lps]
    tins = [{k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()} for d in inputs]
    loss, metrics = spec.fn(LossBatch.from_datums(leaves, tins), {**spec.config, **overrides})
    loss.backward()
    grads = [t.grad if t.numel() else torch.zeros_like(t) for t in leaves]
    return float(loss.detach()), torch.cat(grads).numpy(), metrics


def flat(lps, inputs):
    datum = np.repeat(np.arange(len(lps)), [len(lp) for lp in lps])
    return np.concatenate(lps), {k: np.concatenate([d[k] for d in inputs]) for k in inputs[0]}, datum


def check(name, ref, lps, inputs, cfg, fd=True):
    """Torch vs the NumPy reference (value, gradient, metrics), and the reference gradient
    vs a central finite difference of the reference value with stop-gradients held fixed."""
    value, grad, metrics = run(name, lps, inputs, **cfg)
    lp, x, datum = flat(lps, inputs)
    rv, rg, rm = ref(name, lp, x, datum, len(lps), cfg)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert value == pytest.approx(rv, rel=RTOL, abs=ATOL)
    np.testing.assert_allclose(grad, rg, rtol=RTOL, atol=ATOL)
    assert metrics.keys() == rm.keys()
    for k in rm:
        assert metrics[k] == pytest.approx(rm[k], rel=RTOL, abs=ATOL), k
    if fd:
        h, eye = 1e-6, np.eye(len(lp))
        num = [(ref(name, lp + h * e, x, datum, len(lps), cfg, sg=lp)[0]
                - ref(name, lp - h * e, x, datum, len(lps), cfg, sg=lp)[0]) / (2 * h) for e in eye]
        np.testing.assert_allclose(rg, num, rtol=1e-6, atol=1e-6)
    return value, grad, metrics


LENGTHS = (6, 0, 9, 4, 5)  # datum 1 is an empty completion
PROMPT = 2  # leading prompt positions: advantage 0, sampler logprob 0


def policy_batch(seed: int = 0, huge: bool = True, per_position_clip: bool = False):
    """Datums of different lengths with prompt positions, ratios on both sides of [0.8, 1.2]
    under both signs of advantage; with `huge`, a prompt lp - lq of 800 (exp overflows)."""
    rng = np.random.default_rng(seed)
    lps, inputs = [], []
    for d, n in enumerate(LENGTHS):
        p = min(PROMPT, n)
        lq = np.concatenate([np.zeros(p), -rng.uniform(0.2, 3.0, n - p)])
        lp = lq + np.concatenate([np.zeros(p), rng.uniform(-0.9, 0.9, n - p)])
        lp[:p] = -rng.uniform(0.1, 3.0, p)
        if huge and p:
            lp[0] = 800.0
        adv = np.concatenate([np.zeros(p), rng.choice([-1.0, 1.0], n - p) * rng.uniform(0.2, 2.0, n - p)])
        if d == 2:
            adv[-1] = 0.0  # a sampled token with zero advantage: still an action position
        seq = (np.arange(n) >= p).astype(float) * (d != 3)  # datum 3: empty sequence_ratio_mask
        rec = np.where(np.arange(n) >= p, lq + rng.normal(0.0, 0.3, n), 0.0)
        inp = {"logprobs": lq, "advantages": adv, "sequence_ratio_mask": seq,
               "recorded_logprobs": rec, "recorded_mask": (np.arange(n) >= p).astype(float)}
        if per_position_clip:
            inp["clip_low_threshold"] = rng.uniform(0.6, 0.95, n)
            inp["clip_high_threshold"] = rng.uniform(1.05, 1.4, n)
        lps.append(lp)
        inputs.append(inp)
    lp, x, _ = flat(lps, inputs)
    a = x["advantages"]
    r = np.exp(np.where(a != 0, lp - x["logprobs"], 0.0))
    assert ((a == 0) & (x["logprobs"] != 0)).any()
    for side in (r > HI, r < LO):  # the batch really covers every clipping case
        assert (side & (a > 0)).any() and (side & (a < 0)).any()
    m = x["recorded_mask"] != 0
    assert (np.exp(lp[m] - x["recorded_logprobs"][m]) > 1.5).any()
    return lps, inputs


def select(name: str, inputs: list[dict], extra=()) -> list[dict]:
    spec = BUILTIN[name]
    keys = (*spec.required_inputs, *spec.server_inputs, *extra)
    return [{k: d[k] for k in keys} for d in inputs]


@pytest.mark.parametrize("shape_k", [None, 3])
def test_cross_entropy(shape_k) -> None:
    rng = np.random.default_rng(1)
    shapes = [(n,) if shape_k is None else (n, shape_k) for n in (4, 0, 7)]
    lps = [-rng.uniform(0, 5, s) for s in shapes]
    ws = [rng.normal(size=s) for s in shapes]  # negative weights too (forward_backward_custom)
    value, grad, metrics = run("cross_entropy", lps, [{"weights": w} for w in ws])
    lp, w = np.concatenate(lps), np.concatenate(ws)
    assert value == pytest.approx(-(w * lp).sum(), rel=RTOL)  # a plain sum, no normalisation
    np.testing.assert_allclose(grad, -w, rtol=RTOL, atol=ATOL)
    assert metrics == {}
    value, grad, _ = run("cross_entropy", lps, [{"weights": np.zeros_like(w)} for w in ws])
    assert value == 0.0 and not grad.any()


POLICY_CASES = [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
    ("dro", {}),
    ("dro", {"beta": 0.7}),
    ("gspo", {}),
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
    ("stable_reinforce", {}),
    ("stable_reinforce", {"kl_coeff": 0.3, "clip_high_threshold": 1.5}),
]


@pytest.mark.parametrize(("name", "cfg"), POLICY_CASES)
def test_policy_loss_matches_reference(name, cfg) -> None:
    lps, inputs = policy_batch(huge=True)  # masked prompt positions with exp overflow
    check(name, ref_policy, lps, select(name, inputs), cfg, fd=False)
    lps, inputs = policy_batch(seed=2, huge=False)
    check(name, ref_policy, lps, select(name, inputs), cfg, fd=True)


@pytest.mark.parametrize("name", ["ppo", "cispo", "gspo"])
def test_per_position_clip_thresholds(name) -> None:
    lps, inputs = policy_batch(seed=3, huge=False, per_position_clip=True)
    inputs = select(name, inputs, extra=("clip_low_threshold", "clip_high_threshold"))
    # the inputs win over the config values
    value, _, _ = check(name, ref_policy, lps, inputs, {"clip_low_threshold": 0.99, "clip_high_threshold": 1.01})
    value_cfg, _, _ = run(name, lps, select(name, policy_batch(seed=3, huge=False)[1]),
                          clip_low_threshold=0.99, clip_high_threshold=1.01)
    assert value != pytest.approx(value_cfg)


@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo", "gspo", "stable_reinforce"])
def test_all_zero_advantages(name) -> None:
    lps, inputs = policy_batch(huge=True)
    for lp, d in zip(lps, inputs, strict=True):
        d["advantages"] = np.zeros_like(d["advantages"])
        lp[len(lp) // 2:] += 750.0  # exp(lp - lq) overflows on action positions too
    value, grad, metrics = run(name, lps, select(name, inputs))
    assert value == 0.0 and not grad.any()
    assert all(np.isfinite(v) for v in metrics.values())


# Ratios exactly at the clip bounds and beyond them: (r, A, lo, hi, clipped?). At a bound the
# unclipped branch counts; (1.0, -1, 0.5, 1.0) and (1.0, +1, 1.0, 2.0) are smooth points.
AT_BOUNDS = [
    (1.0, 1.0, 0.5, 1.0, False), (1.0, -1.0, 0.5, 1.0, False),
    (1.0, 1.0, 1.0, 2.0, False), (1.0, -1.0, 1.0, 2.0, False),
    (1.5, 1.0, LO, HI, True), (1.5, -1.0, LO, HI, False),
    (0.5, 1.0, LO, HI, False), (0.5, -1.0, LO, HI, True),
]


@pytest.mark.parametrize("name", ["ppo", "gspo"])
@pytest.mark.parametrize(("r", "adv", "lo", "hi", "clipped"), AT_BOUNDS)
def test_clipped_surrogate_at_and_beyond_bounds(name, r, adv, lo, hi, clipped) -> None:
    lq = np.array([-2.0, 0.0])  # position 1: a masked prompt position
    lp = lq + np.log([r, 1.0])
    x = {"logprobs": lq, "advantages": np.array([adv, 0.0]), "sequence_ratio_mask": np.array([1.0, 0.0])}
    cfg = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    value, grad, metrics = check(name, ref_policy, [lp], [select(name, [x])[0]], cfg, fd=False)
    rr = np.exp(lp[0] - lq[0])  # r up to rounding of exp(log r)
    assert value == pytest.approx(-(np.clip(rr, lo, hi) if clipped else rr) * adv, rel=RTOL)
    assert grad == pytest.approx([0.0 if clipped else -adv * rr, 0.0], rel=RTOL)
    assert metrics["clip_fraction:mean"] == float(clipped)


@pytest.mark.parametrize(("r", "adv"), [(1.0, 1.0), (1.0, -1.0), (1.5, 1.0), (1.5, -1.0), (0.5, 1.0), (0.5, -1.0)])
def test_cispo_at_and_beyond_bounds(r, adv) -> None:
    lq = np.array([-2.0])
    lp = lq + np.log(r)
    for lo, hi in ((1.0, 1.2), (0.8, 1.0), (LO, HI)):
        value, grad, metrics = check("cispo", ref_policy, [lp], [{"logprobs": lq, "advantages": np.array([adv])}],
                                     {"clip_low_threshold": lo, "clip_high_threshold": hi})
        c = np.clip(np.exp(lp - lq)[0], lo, hi)
        assert value == pytest.approx(-c * lp[0] * adv, rel=RTOL)
        assert grad == pytest.approx([-c * adv], rel=RTOL)
        assert metrics["clip_fraction:mean"] == float(not lo <= r <= hi)


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo"])
def test_overflowing_ratio_on_clipped_position(name) -> None:
    x = {"logprobs": np.array([-801.0, -1.0]), "advantages": np.array([1.0, 1.0]),
         "sequence_ratio_mask": np.array([1.0, 0.0])}
    value, grad, metrics = run(name, [np.array([-1.0]), np.array([-1.0])],
                               [{k: v[i:i + 1] for k, v in select(name, [x])[0].items()} for i in (0, 1)])
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert all(np.isfinite(v) for v in metrics.values())
    if name == "cispo":  # -sg(clip(r)) * lp * A with clip(r) = hi
        assert value == pytest.approx(HI + 1.0) and grad == pytest.approx([-HI, -1.0])
    else:  # the clip holds the first term constant, -hi * A, with gradient 0
        assert value == pytest.approx(-HI - 1.0) and grad == pytest.approx([0.0, -1.0])


def test_gspo_sequence_ratio_is_per_datum() -> None:
    lq = [np.array([0.0, -1.0, -2.0]), np.array([-1.0, -0.5]), np.array([-0.3])]
    lp = [lq[0] + [9.0, 0.1, 0.3], lq[1] + [-0.2, 0.5], lq[2] + [0.4]]
    x = [{"logprobs": lq[0], "advantages": np.array([0.0, 1.0, -2.0]), "sequence_ratio_mask": np.array([0, 1, 1.0])},
         {"logprobs": lq[1], "advantages": np.array([3.0, 0.5]), "sequence_ratio_mask": np.array([1.0, 0.0])},
         {"logprobs": lq[2], "advantages": np.array([1.0]), "sequence_ratio_mask": np.array([0.0])}]
    cfg = {"clip_low_threshold": 0.0, "clip_high_threshold": 10.0}
    value, grad, metrics = check("gspo", ref_policy, lp, x, cfg)
    s = np.exp([0.2, -0.2, 0.0])  # datum 2: empty mask, ratio 1
    np.testing.assert_allclose(grad, [0.0, -s[0], 2 * s[0], -3 * s[1], -0.5 * s[1], -1.0], rtol=1e-12)
    assert value == pytest.approx(s[0] - 3.5 * s[1] - 1.0, rel=1e-12)
    assert metrics["sequence_ratio:mean"] == pytest.approx((s[0] + s[1]) / 2, rel=1e-12)


def test_stable_reinforce_ignores_unrecorded_positions() -> None:
    lr = np.array([0.0, 0.0, -1.0, -2.0, -0.5])
    lp = np.array([800.0, -3.0, -1.0 + np.log(3.0), -2.0 + np.log(1.5), -0.5 + np.log(0.5)])
    x = {"logprobs": lr, "advantages": np.array([5.0, -4.0, 1.0, -1.0, 2.0]),
         "recorded_logprobs": lr, "recorded_mask": np.array([0.0, 0, 1, 1, 1])}
    value, grad, metrics = check("stable_reinforce", ref_policy, [lp], [x], {"kl_coeff": 0.2}, fd=False)
    d = np.log([3.0, 1.5, 0.5])
    w = np.array([2.0, 1.5, 0.5])  # min(r, cap = 2)
    assert value == pytest.approx(-(w * [1.0, -1.0, 2.0] * lp[2:]).sum() + 0.1 * (d**2).sum(), rel=1e-12)
    np.testing.assert_allclose(grad, np.r_[0.0, 0.0, -w * [1.0, -1.0, 2.0] + 0.2 * d], rtol=1e-12)
    assert metrics["clip_fraction:mean"] == pytest.approx(1 / 3) and metrics["action_tokens:sum"] == 3.0


def pair_batch(seed: int = 1):
    rng = np.random.default_rng(seed)
    lps, inputs = [], []
    for n in (5, 3, 4, 6, 2, 7):  # 3 (chosen, rejected) pairs of different lengths
        w = (np.arange(n) >= 1).astype(float) * rng.uniform(0.5, 1.5, n)  # weight 0 on the prompt
        lps.append(-rng.uniform(0.1, 3.0, n))
        inputs.append({"weights": w, "ref_logprobs": -rng.uniform(0.1, 3.0, n)})
    return lps, inputs


PAIR_CASES = [
    *[(name, {"label_smoothing": eps}) for name in ("dpo", "bradley_terry") for eps in (0.0, 0.1, 0.3)],
    ("dpo", {"beta": 1.0}), ("dpo", {"beta": 0.02}), ("dpo", {"beta": 0.5, "label_smoothing": 0.2}),
]


@pytest.mark.parametrize(("name", "cfg"), PAIR_CASES)
def test_preference_matches_reference(name, cfg) -> None:
    lps, inputs = pair_batch()
    _, _, metrics = check(name, ref_pairs, lps, select(name, inputs), cfg)
    assert metrics["pairs:sum"] == 3.0
    assert 0.0 < metrics["pair_accuracy:mean"] < 1.0  # both signs of the margin occur


def test_registry_builtins_and_unknown_name() -> None:
    reg = LossRegistry.load()
    expected = {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo",
                "stable_reinforce", "dpo", "bradley_terry"}
    assert set(reg.names()) == expected == set(BUILTIN)
    assert reg.get("ppo") is BUILTIN["ppo"] and "ppo" in reg and "nope" not in reg
    with pytest.raises(UserError) as err:
        reg.get("nope")
    assert "nope" in str(err.value) and all(name in str(err.value) for name in expected)


def test_registry_loads_operator_module(tmp_path) -> None:
    path = tmp_path / "my_losses.py"
    path.write_text(textwrap.dedent("""
        from tinsmith.engine.losses import LossSpec

        def my_loss(batch, config):
            return -(config["scale"] * batch.inputs["weights"] * batch.lp).sum(), {"n:sum": 1.0}

        LOSSES = {"my_loss": LossSpec(my_loss, ("weights",), config={"scale": 2.0})}
    """))
    reg = LossRegistry.load([str(path)])
    assert set(reg.names()) == {*BUILTIN, "my_loss"}
    value, grad, metrics = run(reg.get("my_loss"), [np.array([-1.0, -2.0])], [{"weights": np.array([1.0, 0.5])}])
    assert value == pytest.approx(4.0) and grad == pytest.approx([-2.0, -1.0]) and metrics == {"n:sum": 1.0}
    assert "my_loss" not in LossRegistry.load()


@pytest.mark.parametrize(("source", "match"), [
    ("from tinsmith.engine.losses import BUILTIN\nLOSSES = {'ppo': BUILTIN['cross_entropy']}\n", "ppo"),
    ("X = 1\n", "LOSSES"),
    ("LOSSES = {'bad': 42}\n", "LOSSES"),
])
def test_registry_rejects_bad_modules(tmp_path, source, match) -> None:
    path = tmp_path / "bad_losses.py"
    path.write_text(source)
    with pytest.raises(ValueError, match=match):
        LossRegistry.load([str(path)])


@pytest.mark.parametrize(("name", "override"), [
    ("ppo", {"clip_low_threshold": 1.3, "clip_high_threshold": 1.2}),
    ("cispo", {"clip_low_threshold": -0.1}),
    ("gspo", {"clip_low_threshold": 0.0, "clip_high_threshold": 0.0}),
    ("dro", {"beta": -0.01}),
    ("stable_reinforce", {"kl_coeff": -1.0}),
    ("dpo", {"beta": -0.1}),
    ("dpo", {"beta": 0.0}),
    ("dpo", {"label_smoothing": 0.5}),
    ("bradley_terry", {"label_smoothing": 0.5}),
    ("bradley_terry", {"label_smoothing": -0.1}),
])
def test_check_config_rejects_out_of_range(name, override) -> None:
    spec = BUILTIN[name]
    spec.check_config(dict(spec.config))  # the defaults themselves are fine
    with pytest.raises(UserError):
        spec.check_config({**spec.config, **override})
