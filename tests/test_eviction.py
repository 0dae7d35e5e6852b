"""Runs outnumbering resident adapters: idle runs move to disk and back with their weights,
pending gradients and AdamW state, and every result is bitwise what it is when all stay in
memory — at the engine, and through the SDK with concurrent clients.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from conftest import TINY, text_datum
from tinker import types
from transformers import AutoTokenizer

import tinsmith
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.checkpoint import optimizer_state_dict
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampling import LocalSampler
from tinsmith.engine.training import LocalTrainer
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.types import AdamSpec, DatumIn, FwdBwdOut, LoraSpec, NotFound, SampleSpec

RUNS = {"a": LoraSpec(rank=2, seed=1), "b": LoraSpec(rank=8, seed=2), "c": LoraSpec(rank=4, seed=3)}


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner(resolve_model_dir(TINY), TINY)


def _engine(runner: ModelRunner, spill: Path, resident: int) -> LocalTrainer:
    engine, _ = local_backends(runner, AutoTokenizer.from_pretrained(runner.model_dir),
                               LossRegistry.load(()), spill_dir=spill, max_resident_runs=resident)
    for name, spec in RUNS.items():
        engine.create_run(name, spec)
    return engine


def _work(run: str, step: int) -> TrainWork:
    rng = np.random.default_rng([ord(run), step])
    data = []
    for _ in range(2):
        n = int(rng.integers(5, 20))
        data.append(DatumIn(rng.integers(3, 200, size=n),
                            {"target_tokens": rng.integers(3, 200, size=n),
                             "weights": rng.random(n).astype(np.float32)}))
    return TrainWork(run, data, "cross_entropy", {})


def _state(engine: LocalTrainer, run: str) -> list[torch.Tensor]:
    adapter = engine._run(run)[0]
    out = [p.detach().clone() for p in adapter.parameters()]
    out += [v.clone() for v in optimizer_state_dict(adapter).values()]
    return out


def test_spilled_runs_compute_what_resident_runs_compute(runner: ModelRunner, tmp_path: Path) -> None:
    """One resident run for three: every call restores one run and spills another, with
    gradients pending between forward_backward and optim_step; the other engine keeps all."""
    tight, roomy = _engine(runner, tmp_path / "spill", 1), _engine(runner, tmp_path / "roomy", 99)
    adam = AdamSpec(learning_rate=1e-2)  # eps 1e-12: any rounding difference would show
    losses: dict[int, list[float]] = {id(tight): [], id(roomy): []}
    for step in range(3):
        for engine in (tight, roomy):
            for run in RUNS:  # every run's gradients pending at once: two of them on disk
                (out,) = engine.forward_backward_many([_work(run, step)], forward_only=False)
                assert isinstance(out, FwdBwdOut)
                losses[id(engine)].append(out.metrics["loss:sum"])
            assert engine.runs.resident == (1 if engine is tight else 3)
            for run in RUNS:
                engine.optim_step(run, adam)
    assert losses[id(tight)] == losses[id(roomy)]
    for run in RUNS:
        for got, want in zip(_state(tight, run), _state(roomy, run), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert tight.runs.spills >= 10 and tight.runs.restores >= 10
    assert roomy.runs.spills == 0
    spilled = list((tmp_path / "spill").iterdir())
    assert len(spilled) == 2  # the two runs out of memory now, one folder each
    for run in RUNS:
        tight.drop_run(run)
    assert list((tmp_path / "spill").iterdir()) == []  # dropping a run deletes its spill


def test_a_packed_pass_keeps_all_its_runs_resident(runner: ModelRunner, tmp_path: Path) -> None:
    tight, roomy = _engine(runner, tmp_path / "spill", 1), _engine(runner, tmp_path / "roomy", 99)
    works = [_work(run, 0) for run in RUNS]
    got = tight.forward_backward_many(works, forward_only=False)
    want = roomy.forward_backward_many(works, forward_only=False)
    assert [o.metrics for o in got] == [o.metrics for o in want]  # type: ignore[union-attr]
    assert tight.runs.resident == 1  # back under the limit once the pass is over
    for run in RUNS:
        for p, q in zip(tight._run(run)[0].parameters(), roomy._run(run)[0].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as rendered
    m = re.search(rf"^{name}\{{{sel}\}} (\S+)$", text, re.MULTILINE)
    assert m, f"{name}{{{sel}}} not in /metrics"
    return float(m.group(1))


def _train(url: str, seeds: list[int]) -> dict[int, list[float]]:
    """Concurrent SDK clients, one run each, 3 steps of forward_backward + optim_step."""
    service = tinker.ServiceClient(base_url=url, api_key="tml-local")
    out: dict[int, list[float]] = {}

    def client(seed: int) -> None:
        tc = service.create_lora_training_client(base_model=TINY, rank=4, seed=seed)
        tok = tc.get_tokenizer()
        data = [text_datum(tok, f"Client {seed} says hello number {i}.") for i in range(3)]
        losses = []
        for _ in range(3):
            losses.append(tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        out[seed] = losses

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_sdk_clients_outnumbering_resident_runs(tmp_path: Path) -> None:
    seeds = [11, 12, 13, 14]
    with tinsmith.local(models=[TINY], data_dir=tmp_path / "tight", max_resident_adapters=2) as url:
        tight = _train(url, seeds)
        assert _metric(url, "tinsmith_resident_runs", model=TINY) <= 2
        assert _metric(url, "tinsmith_run_moves_total", model=TINY, direction="out") > 0
        assert _metric(url, "tinsmith_run_moves_total", model=TINY, direction="in") > 0
    with tinsmith.local(models=[TINY], data_dir=tmp_path / "roomy") as url:
        roomy = _train(url, seeds)
    assert tight == roomy
    assert all(v[-1] < v[0] for v in tight.values())


def _sample(engine: LocalSampler, key: str) -> list[list[int]]:
    box: list = []
    spec = SampleSpec(prompt=np.array([5, 17, 42, 9]), num_samples=2, max_tokens=6, seed=3)
    engine.start_sample(key, spec, None, box.append)
    while engine.pending:
        engine.step()
    (out,) = box
    assert not isinstance(out, BaseException), out
    return [list(s.tokens) for s in out.sequences]


def test_unsaved_samplers_come_back_from_disk(runner: ModelRunner, tmp_path: Path) -> None:
    """save_weights_and_get_sampling_client's samplers have no stored files: evicted from a
    one-adapter cache they go to disk, and sample exactly as before when used again."""
    trainer, sampler = local_backends(runner, AutoTokenizer.from_pretrained(runner.model_dir),
                                      LossRegistry.load(()), max_sampler_adapters=1,
                                      spill_dir=tmp_path / "spill")
    trainer.create_run("a", RUNS["a"])
    before = {}
    for step in range(3):  # three snapshots of a run that keeps training
        trainer.forward_backward_many([_work("a", step)], forward_only=False)
        trainer.optim_step("a", AdamSpec(learning_rate=0.5))
        sampler.put_snapshot(f"snap{step}", trainer.snapshot("a"))
        before[f"snap{step}"] = _sample(sampler, f"snap{step}")
    assert len({str(v) for v in before.values()}) == 3  # the snapshots really differ
    for key in ("snap0", "snap1", "snap2", "snap0"):
        assert _sample(sampler, key) == before[key]
    with pytest.raises(NotFound):
        sampler.start_sample("never-made", SampleSpec(prompt=np.array([1])), None, print)
