"""Adapter <-> checkpoint files, in the PEFT on-disk format plus Tinsmith's own facts.

A checkpoint is a flat mapping of file name -> bytes (the storage layer decides where it
lives):

- `adapter_model.safetensors`: the LoRA factors, named as PEFT saves them
  (`base_model.model.<module path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]);
  MoE experts' per-expert factors in PEFT's `target_parameters` naming and layout
  (moe_checkpoint.py).
- `adapter_config.json`: a PEFT `LoraConfig`, so `peft.PeftModel.from_pretrained(base,
  folder)` loads the folder as it is.
- `tinsmith.json`: what PEFT has no field for, so a checkpoint round-trips exactly: the
  `LoraSpec` (seed and train_* flags included), the number of optimizer steps taken, the
  run's optimizer family (`"optimizer": {"type": "adamw"}` or `{"type": "dimuon", "version":
  1}`; absent in older checkpoints, which are all AdamW), the base model name and the format
  version.
- `optimizer.safetensors` (only when saved with the optimizer): the optimizer's state in the
  factors' naming, a float32 `<factor name>.step` [1] per factor plus, for AdamW,
  `.exp_avg` / `.exp_avg_sq`, for Dimuon `.momentum` (each the factor's shape); empty when
  no optimizer step was taken yet.

Everything about names and files lives here; `Adapter` holds only tensors and training.

Reading also accepts a plain PEFT LoRA folder (no `tinsmith.json`): the spec is derived
from `adapter_config.json`, as long as it describes a LoRA that Tinsmith computes the same
way (no rsLoRA, DoRA, per-module rank/alpha, biases or fan_in_fan_out).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from tinsmith.engine.adapter import Adapter, target_leaves
from tinsmith.engine.families import (
    ALL_ATTN,
    ALL_MLP,
    ALL_UNEMBED,
    VISION_TOWER_EXCLUDE,
    VL_LANGUAGE_PREFIX,
)
from tinsmith.engine.lora import (
    LoraWeights,
    MultiLoraLinear,
    leaf_name,
)
from tinsmith.engine.moe_checkpoint import (
    experts_from_peft,
    experts_to_peft,
    is_expert_path,
    target_parameters,
)
from tinsmith.types import ADAMW, LoraSpec, OptimizerConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
TINSMITH_FILE = "tinsmith.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PEFT_PREFIX = "base_model.model."
# Per factor, besides `.step`: the optimizer state tensors of each family (factor-shaped).
_BUFFERS = {"adamw": ("exp_avg", "exp_avg_sq"), "dimuon": ("momentum",)}


# ----- PEFT tensor names ----------------------------------------------------------------
def peft_key(path: str, factor: str) -> str:
    """The name PEFT saves factor `"A"` or `"B"` of the layer at `path` under."""
    return f"{PEFT_PREFIX}{path}.lora_{factor}.weight"


def split_peft_key(key: str) -> tuple[str, str] | None:
    """(layer path, `"A"` or `"B"`) of a PEFT LoRA factor's name; None for any other name."""
    path, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
    if not key.startswith(PEFT_PREFIX) or factor not in ("A.weight", "B.weight"):
        return None
    return path, factor[0]


def _named_factors(adapter: Adapter) -> list[tuple[str, torch.Tensor]]:
    """(PEFT name, tensor) of every factor: per layer A then B, in the adapter's order."""
    return [(peft_key(path, f), t) for path, w in adapter.weights.items()
            for f, t in (("A", w.A), ("B", w.B))]


def peft_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The factors on the CPU, named as PEFT saves them (`adapter_model.safetensors`);
    per-expert factors of MoE experts in PEFT's target_parameters naming and layout."""
    state = {key: t.detach().cpu().contiguous() for key, t in _named_factors(adapter)}
    return experts_to_peft(state, peft_key)


def optimizer_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The optimizer's state on the CPU, named `<factor name>.<buffer>` (AdamW: `exp_avg`,
    `exp_avg_sq`; Dimuon: `momentum`) and `.step` (a float32 [1]); empty before the first
    optimizer step."""
    out: dict[str, torch.Tensor] = {}
    for key, t in _named_factors(adapter):
        st = adapter.optimizer_state(t)
        if not st:
            continue
        for buf in _BUFFERS[adapter.optimizer_config.type]:
            out[f"{key}.{buf}"] = st[buf].cpu().contiguous()
        out[f"{key}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    return out


# ----- writing ------------------------------------------------------------------------
def _peft_config(adapter: Adapter, base_model: str) -> dict[str, Any]:
    from peft import LoraConfig

    leaves = sorted({leaf_name(path) for path in adapter.weights if not is_expert_path(path)})
    alpha = adapter.spec.alpha
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=adapter.spec.rank,
        # PEFT types lora_alpha as int; write 32 rather than 32.0 when it is whole.
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=leaves or None,  # None: only MoE experts (target_parameters)
        target_parameters=target_parameters(adapter.weights) or None,  # MoE experts
        # A VL model's vision tower may share leaf names with its language model: not a target.
        exclude_modules=VISION_TOWER_EXCLUDE if any(
            p.startswith(VL_LANGUAGE_PREFIX) for p in adapter.weights) else None,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=False,
        use_rslora=False,
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=base_model,
    )
    out = config.to_dict()
    for key, value in out.items():  # as PeftConfig.save_pretrained does: sets -> lists
        if isinstance(value, set):
            out[key] = sorted(value)
    out["peft_type"] = str(getattr(out["peft_type"], "value", out["peft_type"]))
    out["task_type"] = str(getattr(out["task_type"], "value", out["task_type"]))
    return out


def adapter_to_files(
    adapter: Adapter, base_model: str, *, include_optimizer: bool
) -> dict[str, bytes]:
    """Serialise an adapter (and, if asked, its optimizer state) into checkpoint files."""
    files = {
        WEIGHTS_FILE: safetensors.torch.save(peft_state_dict(adapter), metadata={"format": "pt"}),
        CONFIG_FILE: _json_bytes(_peft_config(adapter, base_model)),
    }
    info = {
        "format": "tinsmith-lora",
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "lora_spec": adapter.spec.to_json(),
        "num_steps": adapter.num_steps,
        "has_optimizer": include_optimizer,
        "optimizer": adapter.optimizer_config.to_json(),
    }
    files[TINSMITH_FILE] = _json_bytes(info)
    if include_optimizer:
        state = optimizer_state_dict(adapter)  # empty before the first optim_step
        files[OPTIMIZER_FILE] = safetensors.torch.save(state, metadata={"format": "pt"})
    return files


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()


# ----- reading ------------------------------------------------------------------------
def _json_file(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    if name not in files:
        raise ValueError(f"checkpoint is missing {name}")
    try:
        value = json.loads(files[name])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint file {name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint file {name} must hold a JSON object")
    return value


def _tensors(files: Mapping[str, bytes], name: str) -> dict[str, torch.Tensor]:
    if name not in files:
        raise ValueError(f"checkpoint is missing {name}")
    try:
        return safetensors.torch.load(bytes(files[name]))
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ValueError(f"checkpoint file {name} is not a readable safetensors file: {e}") from e


def _spec_from_peft_config(config: Mapping[str, Any]) -> LoraSpec:
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = {
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") not in ("none", None),
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        raise ValueError(f"{CONFIG_FILE}: unsupported LoRA options {bad}")
    targets = config.get("target_modules")
    if targets is None and config.get("target_parameters"):  # only MoE experts
        targets = []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(
            f"{CONFIG_FILE}: target_modules must be a list of module names, got {targets!r}"
        )
    leaves = {t.rsplit(".", 1)[-1] for t in targets + list(config.get("target_parameters") or [])}
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{CONFIG_FILE}: bad or missing r / lora_alpha ({e})") from e
    return LoraSpec(
        rank=rank,
        alpha=alpha,
        train_attn=bool(leaves & set(ALL_ATTN)),
        train_mlp=bool(leaves & set(ALL_MLP)),
        train_unembed=bool(leaves & set(ALL_UNEMBED)),
    )


def read_lora_spec(files: Mapping[str, bytes]) -> LoraSpec:
    """The LoraSpec of a checkpoint: from tinsmith.json, else derived from the PEFT config."""
    if TINSMITH_FILE in files:
        info = _json_file(files, TINSMITH_FILE)
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{TINSMITH_FILE}: unsupported format_version {version!r}")
        raw = info.get("lora_spec")
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("rank"), int)
            or not isinstance(raw.get("alpha", 32.0), int | float)
        ):
            raise ValueError(f"{TINSMITH_FILE}: missing or malformed lora_spec {raw!r}")
        try:
            return LoraSpec.from_json(raw)
        except TypeError as e:
            raise ValueError(f"{TINSMITH_FILE}: malformed lora_spec ({e})") from e
    return _spec_from_peft_config(_json_file(files, CONFIG_FILE))


def read_optimizer_config(files: Mapping[str, bytes]) -> OptimizerConfig:
    """The optimizer family a checkpoint was trained with (from tinsmith.json; AdamW when it
    has none: older checkpoints and plain PEFT folders). ValueError if it is malformed."""
    if TINSMITH_FILE not in files:
        return ADAMW
    raw = _json_file(files, TINSMITH_FILE).get("optimizer")
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{TINSMITH_FILE}: malformed optimizer {raw!r}")
    try:
        return OptimizerConfig.from_json(raw)
    except ValueError as e:
        raise ValueError(f"{TINSMITH_FILE}: {e}") from e


def adapter_from_files(
    files: Mapping[str, bytes], layers: dict[str, MultiLoraLinear], *, load_optimizer: bool,
    optimizer: OptimizerConfig | None = None,
) -> Adapter:
    """Rebuild an adapter against a model's LoRA layers; ValueError if the files do not fit.

    `optimizer`: the family the adapter gets (None: the checkpoint's own, as a spill's
    restore wants). Loading optimizer state of another family is refused (ValueError): a
    run's family is fixed, and AdamW's moments mean nothing to Dimuon or back."""
    peft_config = _json_file(files, CONFIG_FILE)  # must exist and parse, as PEFT needs it too
    spec = read_lora_spec(files)
    if spec.rank < 1:
        raise ValueError(f"checkpoint LoRA rank must be >= 1, got {spec.rank}")
    saved = read_optimizer_config(files)
    family = saved if optimizer is None else optimizer
    if load_optimizer and OPTIMIZER_FILE in files and family != saved:
        raise ValueError(f"it holds {saved.type} optimizer state and this run's optimizer is "
                         f"{family.type}; load its weights only (load_state / "
                         "create_training_client_from_state)")
    complete = TINSMITH_FILE in files  # our own checkpoints hold every layer the spec trains
    # Expert factors back to Tinsmith's naming and 3-D layout (moe_checkpoint.py).
    raw = experts_from_peft(_tensors(files, WEIGHTS_FILE), layers, peft_config, peft_key)
    tensors = _lora_tensors(raw, spec, layers, complete=complete)
    adapter = _adapter_from_tensors(spec, tensors, layers, family)  # checks shapes
    if TINSMITH_FILE in files:
        steps = _json_file(files, TINSMITH_FILE).get("num_steps", 0)
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{TINSMITH_FILE}: bad num_steps {steps!r}")
        adapter.num_steps = steps
    if load_optimizer and OPTIMIZER_FILE in files:
        state = _tensors(files, OPTIMIZER_FILE)
        _check_optimizer_state(adapter, state)
        _load_optimizer_state(adapter, state)
    return adapter


def _load_optimizer_state(adapter: Adapter, state: Mapping[str, torch.Tensor]) -> None:
    """Give `adapter` the optimizer state of `optimizer_state_dict`'s naming (none if empty)."""
    if not state:
        return
    buffers = _BUFFERS[adapter.optimizer_config.type]
    adapter.set_optimizer_state({
        t: {"step": state[f"{key}.step"].reshape(()),
            **{buf: state[f"{key}.{buf}"] for buf in buffers}}
        for key, t in _named_factors(adapter) if f"{key}.step" in state
    })


def _adapter_from_tensors(spec: LoraSpec, tensors: Mapping[str, torch.Tensor],
                          layers: Mapping[str, MultiLoraLinear],
                          optimizer: OptimizerConfig = ADAMW) -> Adapter:
    """An adapter of PEFT-named factors, each in float32 on its layer's device; shapes are
    checked against the model."""
    scale = spec.alpha / spec.rank
    weights: dict[str, LoraWeights] = {}
    for path, layer in layers.items():
        a, b = tensors.get(peft_key(path, "A")), tensors.get(peft_key(path, "B"))
        if a is None or b is None:
            continue
        if (tuple(a.shape), tuple(b.shape)) != layer.factor_shapes(spec.rank):
            raise ValueError(
                f"checkpoint tensor shapes for {path} do not fit this base model "
                f"(A {tuple(a.shape)}, B {tuple(b.shape)})"
            )
        dev = layer.weight.device
        weights[path] = LoraWeights(
            a.to(dev, torch.float32, copy=True).requires_grad_(),
            b.to(dev, torch.float32, copy=True).requires_grad_(), scale,
        )
    if not weights:
        raise ValueError("checkpoint holds no LoRA tensors for this base model")
    return Adapter(spec, weights, optimizer)


def _lora_tensors(
    tensors: dict[str, torch.Tensor],
    spec: LoraSpec,
    layers: Mapping[str, MultiLoraLinear],
    *,
    complete: bool,
) -> dict[str, torch.Tensor]:
    """The LoRA factors of `tensors`, checked to name layers of this model that `spec` trains.

    `complete`: every layer the spec trains must be present (true of our own checkpoints;
    a plain PEFT folder may target fewer modules). A `<path>.base_layer.weight` tensor, which
    PEFT's save_pretrained adds for an adapted lm_head, is accepted only if it equals the
    base model's weight, and dropped.
    """
    factors: dict[str, set[str]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        path, _, kind = name.rpartition(".base_layer.")
        if key.startswith(PEFT_PREFIX) and kind == "weight" and path in layers:
            base = layers[path].base.weight
            if tensor.shape != base.shape or not torch.equal(tensor, base.to("cpu", tensor.dtype)):
                raise ValueError(f"{WEIGHTS_FILE}: {key!r} differs from this base model's weight")
            continue
        named = split_peft_key(key)
        if named is None:
            raise ValueError(f"{WEIGHTS_FILE}: unexpected tensor {key!r} (not a PEFT LoRA factor)")
        factors.setdefault(named[0], set()).add(named[1])
        out[key] = tensor
    leaves = set(target_leaves(spec))
    wanted = [p for p in layers if leaf_name(p) in leaves] if complete else []
    problems = {
        "tensors for layers this base model does not have": sorted(set(factors) - set(layers)),
        "tensors for layers the LoRA spec does not train": sorted(
            p for p in factors if p in layers and leaf_name(p) not in leaves
        ),
        "missing tensors (lora_A or lora_B) for layers": sorted(
            {p for p, f in factors.items() if len(f) != 2} | {p for p in wanted if p not in factors}
        ),
    }
    for problem, paths in problems.items():
        if paths:
            raise ValueError(f"{WEIGHTS_FILE}: {problem}: {paths[:5]}")
    return out


def _check_optimizer_state(adapter: Adapter, state: Mapping[str, torch.Tensor]) -> None:
    family = adapter.optimizer_config.type
    buffers = _BUFFERS[family]
    expected: dict[str, tuple[int, ...]] = {}
    for key, t in _named_factors(adapter):
        for buf in buffers:
            expected[f"{key}.{buf}"] = tuple(t.shape)
        expected[f"{key}.step"] = (1,)
    for key, tensor in state.items():
        if key not in expected:
            raise ValueError(f"{OPTIMIZER_FILE}: unexpected tensor {key!r}")
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{OPTIMIZER_FILE}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {expected[key]}"
            )
    for key in state:
        base = key.rsplit(".", 1)[0]
        if not all(f"{base}.{s}" in state for s in (*buffers, "step")):
            name = {"adamw": "Adam", "dimuon": "Dimuon"}[family]
            raise ValueError(f"{OPTIMIZER_FILE}: incomplete {name} state for {base!r}")
