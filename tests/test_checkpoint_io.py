"""Checkpoint files (PEFT format) and the checkpoint file store.

Runs on the tiny test model (tied embeddings, lm_head a LoRA target) in a few seconds.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.checkpoint import (
    CONFIG_FILE,
    OPTIMIZER_FILE,
    PEFT_PREFIX,
    TINSMITH_FILE,
    WEIGHTS_FILE,
    adapter_from_files,
    adapter_to_files,
    optimizer_state_dict,
    read_lora_spec,
)
from tinsmith.engine.runner import ModelRunner
from tinsmith.models.catalog import resolve_model_dir
from tinsmith.storage.files import MANIFEST, VERSION_PREFIX, CheckpointStore
from tinsmith.types import AdamSpec, DatumIn, LoraSpec

MODEL = "tinsmith/tiny-test"
ADAM = AdamSpec(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model_dir(MODEL)


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, MODEL)


def _datum(seed: int, n: int = 12) -> DatumIn:
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, 49152, size=n + 1).astype(np.int64)
    return DatumIn(toks[:-1], {"target_tokens": toks[1:]})


def _train(runner: ModelRunner, adapter: Adapter, steps: int) -> None:
    slot = runner.attach(adapter)
    try:
        for i in range(steps):
            lps = runner.target_logprobs([(slot, _datum(i)), (slot, _datum(100 + i))], grad=True)
            (-sum(lp.sum() for lp in lps)).backward()
            adapter.optim_step(ADAM)
    finally:
        runner.detach(slot)


def _randomize_b(adapter: Adapter, seed: int, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in adapter.weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * std)


def _same_weights(a: Adapter, b: Adapter) -> bool:
    return a.weights.keys() == b.weights.keys() and all(
        torch.equal(a.weights[p].A, b.weights[p].A) and torch.equal(a.weights[p].B, b.weights[p].B)
        for p in a.weights
    )


# ----- exact round trip -----------------------------------------------------------------
def test_round_trip_with_optimizer_is_exact(runner: ModelRunner) -> None:
    spec = LoraSpec(rank=4, seed=3, alpha=16.0, train_attn=False)
    a = Adapter.create(spec, runner.layers)
    _train(runner, a, steps=3)
    files = adapter_to_files(a, MODEL, include_optimizer=True)
    assert set(files) == {WEIGHTS_FILE, CONFIG_FILE, TINSMITH_FILE, OPTIMIZER_FILE}
    assert read_lora_spec(files) == spec

    b = adapter_from_files(files, runner.layers, load_optimizer=True)
    no_opt = adapter_from_files(files, runner.layers, load_optimizer=False)
    assert b.spec == spec and b.num_steps == a.num_steps == 3
    assert _same_weights(a, b) and _same_weights(a, no_opt)
    assert no_opt.optimizer is None and b.optimizer is not None
    sa, sb = optimizer_state_dict(a), optimizer_state_dict(b)
    assert sa.keys() == sb.keys() and len(sa) == 3 * 2 * len(a.weights)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # Same further steps on the same gradients: bitwise identical weights, while an
    # adapter that lost its Adam moments drifts away (so the check has teeth).
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        for pa, pb, pc in zip(a.parameters(), b.parameters(), no_opt.parameters(), strict=True):
            g = torch.randn(pa.shape, generator=gen)
            pa.grad, pb.grad, pc.grad = g.clone(), g.clone(), g.clone()
        for adapter in (a, b, no_opt):
            adapter.optim_step(ADAM)
    assert _same_weights(a, b) and b.num_steps == 5
    assert not _same_weights(a, no_opt)


def test_round_trip_before_any_step_and_without_optimizer(runner: ModelRunner) -> None:
    a = Adapter.create(LoraSpec(rank=2, seed=5), runner.layers)
    files = adapter_to_files(a, MODEL, include_optimizer=True)  # no Adam state yet
    b = adapter_from_files(files, runner.layers, load_optimizer=True)
    assert _same_weights(a, b) and b.optimizer is None and b.num_steps == 0
    assert OPTIMIZER_FILE not in adapter_to_files(a, MODEL, include_optimizer=False)
    info = json.loads(files[TINSMITH_FILE])
    assert info["base_model"] == MODEL and info["lora_spec"] == a.spec.to_json()


# ----- PEFT compatibility -----------------------------------------------------------------
def _peft_logprobs(model: torch.nn.Module, datum: DatumIn) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(datum.tokens)[None]).logits[0]
    targets = torch.as_tensor(datum.inputs["target_tokens"])
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize(
    "spec",
    [
        LoraSpec(rank=4, seed=1),
        LoraSpec(rank=4, seed=1, train_unembed=False),
        LoraSpec(rank=4, seed=1, train_attn=False),
    ],
    ids=["all", "no_unembed", "no_attn"],
)
def test_peft_loads_our_checkpoint(
    runner: ModelRunner, model_dir: Path, tmp_path: Path, spec: LoraSpec
) -> None:
    import peft
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    adapter = Adapter.create(spec, runner.layers)
    _randomize_b(adapter, seed=11)
    datum = _datum(42, n=16)
    slot = runner.attach(adapter)
    try:
        ours = runner.target_logprobs([(slot, datum)], grad=False)[0]
        base = runner.target_logprobs([(None, datum)], grad=False)[0]
    finally:
        runner.detach(slot)

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name, data in adapter_to_files(adapter, MODEL, include_optimizer=False).items():
        (folder / name).write_bytes(data)
    config = json.loads((folder / CONFIG_FILE).read_text())
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapter.weights})
    assert config["target_modules"] == leaves and config["r"] == 4 and config["lora_alpha"] == 32.0
    assert ("lm_head" in leaves) == spec.train_unembed and ("q_proj" in leaves) == spec.train_attn

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    embed_before = hf.get_input_embeddings().weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the tied lm_head (see report)
        pm = peft.PeftModel.from_pretrained(hf, str(folder))
    pm.eval()

    # Every one of our LoRA layers is a PEFT LoRA layer holding the same factors: none dropped.
    lora_modules = {
        name.removeprefix("base_model.model."): m
        for name, m in pm.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }
    assert set(lora_modules) == set(adapter.weights)
    for path, w in adapter.weights.items():
        assert torch.equal(lora_modules[path].lora_A["default"].weight, w.A)
        assert torch.equal(lora_modules[path].lora_B["default"].weight, w.B)
    assert torch.equal(pm.get_input_embeddings().weight, embed_before)  # tied embedding untouched

    theirs = _peft_logprobs(pm, datum)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    with pm.disable_adapter():
        torch.testing.assert_close(_peft_logprobs(pm, datum), base, atol=1e-5, rtol=0)

    if spec.train_unembed:
        # The lm_head LoRA alone moves the output by far more than the tolerance, so the
        # match above proves PEFT applied it on the tied head.
        no_head = adapter.clone_frozen()
        no_head.weights["lm_head"].B.zero_()
        slot = runner.attach(no_head)
        try:
            without = runner.target_logprobs([(slot, datum)], grad=False)[0]
        finally:
            runner.detach(slot)
        assert (without - ours).abs().max() > 1e-3

        # And the other way: a folder PEFT saves reads back as the same adapter.
        out = tmp_path / "peft_saved"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Setting `save_embedding_layers` to `True`"
            pm.save_pretrained(str(out))
        plain = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert TINSMITH_FILE not in plain
        back = adapter_from_files(plain, runner.layers, load_optimizer=False)
        assert back.spec.rank == 4 and back.spec.alpha == 32.0 and back.spec.train_unembed
        assert _same_weights(adapter, back)


# ----- errors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank4_files(runner: ModelRunner) -> dict[str, bytes]:
    a = Adapter.create(LoraSpec(rank=4, seed=2), runner.layers)
    _train(runner, a, steps=1)
    return adapter_to_files(a, MODEL, include_optimizer=True)


def _with(files: dict[str, bytes], **changes: bytes | None) -> dict[str, bytes]:
    out = dict(files)
    for key, value in changes.items():
        name = {
            "weights": WEIGHTS_FILE,
            "config": CONFIG_FILE,
            "info": TINSMITH_FILE,
            "opt": OPTIMIZER_FILE,
        }[key]
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def test_errors_missing_files_and_bad_json(
    runner: ModelRunner, rank4_files: dict[str, bytes]
) -> None:
    assert adapter_from_files(rank4_files, runner.layers, load_optimizer=True).num_steps == 1
    cases = [
        (_with(rank4_files, weights=None), "missing adapter_model.safetensors"),
        (_with(rank4_files, config=None), "missing adapter_config.json"),
        (_with(rank4_files, config=b"{not json"), "adapter_config.json is not valid JSON"),
        (_with(rank4_files, info=b"[1, 2"), "tinsmith.json is not valid JSON"),
        (_with(rank4_files, weights=b"garbage"), "not a readable safetensors"),
    ]
    # Without tinsmith.json the spec comes from the PEFT config, which must be one we compute
    # the same way (rsLoRA scales by alpha / sqrt(r)).
    plain = _with(rank4_files, info=None)
    assert read_lora_spec(plain) == LoraSpec(rank=4, alpha=32.0)
    rslora = {**json.loads(rank4_files[CONFIG_FILE]), "use_rslora": True}
    cases.append((_with(plain, config=json.dumps(rslora).encode()), "unsupported LoRA options"))
    for files, message in cases:
        with pytest.raises(ValueError, match=message):
            adapter_from_files(files, runner.layers, load_optimizer=True)


def test_errors_tensors_that_do_not_fit(runner: ModelRunner, rank4_files: dict[str, bytes]) -> None:
    def load(files: dict[str, bytes]) -> Adapter:
        return adapter_from_files(files, runner.layers, load_optimizer=False)

    tensors = safetensors.torch.load(rank4_files[WEIGHTS_FILE])
    reshaped = {  # rank-4 factors A [4, in] -> [2, 2 in], B [out, 4] -> [2 out, 2]
        k: t.reshape(2, -1) if k.endswith("lora_A.weight") else t.reshape(-1, 2)
        for k, t in tensors.items()
    }
    bad = _with(rank4_files, weights=safetensors.torch.save(reshaped))
    with pytest.raises(ValueError, match="do not fit this base model"):
        load(bad)

    key = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    moved = {k.replace("layers.0.", "layers.7."): t for k, t in tensors.items()}
    with pytest.raises(ValueError, match="does not have"):
        load(_with(rank4_files, weights=safetensors.torch.save(moved)))
    dropped = {k: t for k, t in tensors.items() if k != key.replace("lora_A", "lora_B")}
    with pytest.raises(ValueError, match="missing tensors .*layers.0.self_attn.q_proj"):
        load(_with(rank4_files, weights=safetensors.torch.save(dropped)))

    # PEFT's save_pretrained adds the base lm_head weight: accepted only if it is the base's.
    head_key = f"{PEFT_PREFIX}lm_head.base_layer.weight"
    head = runner.layers["lm_head"].base.weight.detach()
    with_head = _with(rank4_files, weights=safetensors.torch.save({**tensors, head_key: head + 0}))
    assert _same_weights(load(with_head), load(rank4_files))
    other_head = _with(rank4_files, weights=safetensors.torch.save({**tensors, head_key: head + 1}))
    with pytest.raises(ValueError, match="lm_head.base_layer.weight' differs from this base model"):
        load(other_head)

    info = json.loads(rank4_files[TINSMITH_FILE])
    info["lora_spec"]["rank"] = 8
    with pytest.raises(ValueError, match="do not fit"):
        load(_with(rank4_files, info=json.dumps(info).encode()))

    opt = safetensors.torch.load(rank4_files[OPTIMIZER_FILE])
    opt[f"{key}.exp_avg"] = opt[f"{key}.exp_avg"].reshape(2, -1)
    bad_opt = _with(rank4_files, opt=safetensors.torch.save(opt))
    with pytest.raises(ValueError, match="optimizer.safetensors.*shape"):
        adapter_from_files(bad_opt, runner.layers, load_optimizer=True)
    assert load(bad_opt).optimizer is None


# ----- the checkpoint store ----------------------------------------------------------------
@pytest.fixture(params=["local", "file_url", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointStore:
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "ckpts"))
    if request.param == "file_url":
        return CheckpointStore(f"file://{tmp_path}/ckpts")
    return CheckpointStore(f"memory://tinsmith-test-{uuid.uuid4().hex}/ckpts")


KEY = "sess-1:train:0/weights/000020"


def test_store_put_get_exists_size_delete(store: CheckpointStore) -> None:
    files = {"a.bin": b"x" * 100, "b.json": b"{}", "empty": b""}
    assert not store.exists(KEY)
    assert store.put(KEY, files) == 102
    assert store.exists(KEY) and store.get(KEY) == files and store.size(KEY) == 102
    assert not store.exists("sess-1:train:0/weights")  # a parent folder is not a checkpoint

    assert store.put(KEY, {"c.bin": b"new"}) == 3  # overwrite replaces, old files gone
    assert store.get(KEY) == {"c.bin": b"new"} and store.size(KEY) == 3
    siblings = store.fs.ls(store.root + "/sess-1:train:0/weights", detail=False)
    assert [s.rsplit("/", 1)[-1] for s in siblings] == ["000020"]  # no tmp/old leftovers
    inside = [p.removeprefix(f"{store.root}/{KEY}/") for p in store.fs.find(f"{store.root}/{KEY}")]
    if not store.local:  # object stores: the files sit in the version folder the manifest names
        inside = [p.rsplit("/", 1)[-1] if p.startswith(VERSION_PREFIX) else p for p in inside]
    assert sorted(inside) == sorted(["c.bin", MANIFEST])

    store.delete(KEY)
    store.delete(KEY)  # absent: no error
    assert not store.exists(KEY)
    with pytest.raises(FileNotFoundError):
        store.get(KEY)
    with pytest.raises(FileNotFoundError):
        store.size(KEY)


def test_store_crash_leftovers_are_invisible(store: CheckpointStore) -> None:
    fs, folder = store.fs, store.root + "/run/weights"
    # A writer that died mid-put: a temp sibling, and (object-store style) a key folder
    # holding files but no manifest yet.
    fs.makedirs(f"{folder}/000001.tmp-deadbeef", exist_ok=True)
    fs.pipe_file(f"{folder}/000001.tmp-deadbeef/adapter_model.safetensors", b"partial")
    fs.makedirs(f"{folder}/000002", exist_ok=True)
    fs.pipe_file(f"{folder}/000002/adapter_model.safetensors", b"partial")
    for key in ("run/weights/000001", "run/weights/000002"):
        assert not store.exists(key)
        with pytest.raises(FileNotFoundError):
            store.get(key)
    store.put("run/weights/000002", {"f": b"ok"})  # a later put over the debris works
    assert store.get("run/weights/000002") == {"f": b"ok"}
    assert fs.isfile(f"{folder}/000002/{MANIFEST}")


def test_store_failed_put_keeps_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(str(tmp_path))
    store.put(KEY, {"old": b"1"})
    calls = {"n": 0}
    real_fsync = os.fsync

    def flaky_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk on fire")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        store.put(KEY, {"new1": b"a", "new2": b"b"})
    assert store.get(KEY) == {"old": b"1"}
    assert sorted(p.name for p in (tmp_path / "sess-1:train:0" / "weights").iterdir()) == ["000020"]


def test_store_readers_never_see_a_mix(tmp_path: Path) -> None:
    import threading

    store = CheckpointStore(str(tmp_path))
    versions = [{f"f{i}": bytes([v]) * 1000 for i in range(4)} for v in range(2)]
    store.put(KEY, versions[0])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(v: int) -> None:
        try:
            while not stop.is_set():
                store.put(KEY, versions[v])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (0, 1)]
    for t in threads:
        t.start()
    seen = 0
    try:
        for _ in range(300):
            try:
                got = store.get(KEY)
            except FileNotFoundError:  # mid-overwrite the key may be briefly absent
                continue
            assert got in versions
            seen += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and seen > 0
    assert store.get(KEY) in versions
    assert [p.name for p in (tmp_path / "sess-1:train:0" / "weights").iterdir()] == ["000020"]


@pytest.mark.parametrize(
    "key", ["", "/abs/key", "../up", "a/../b", "a/..", "a//b", "./a", "a/b.tmp-1", "a\\b"]
)
def test_store_rejects_bad_keys(store: CheckpointStore, key: str) -> None:
    calls = [
        lambda: store.put(key, {"f": b""}),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="bad checkpoint key"):
            call()


def test_store_rejects_bad_file_names(store: CheckpointStore) -> None:
    for name in ("sub/file", "..", MANIFEST, ""):
        with pytest.raises(ValueError, match="bad checkpoint file name"):
            store.put("k", {name: b"x"})
    assert not store.exists("k")


def test_checkpoint_through_store(
    runner: ModelRunner, rank4_files: dict[str, bytes], tmp_path: Path
) -> None:
    store = CheckpointStore(str(tmp_path))
    store.put(KEY, rank4_files)
    a = adapter_from_files(rank4_files, runner.layers, load_optimizer=True)
    b = adapter_from_files(store.get(KEY), runner.layers, load_optimizer=True)
    assert _same_weights(a, b) and b.num_steps == 1
