"""Weights out: checkpoint files -> a PEFT adapter folder, or a merged Hugging Face model.

- PEFT adapter: exactly the two files `peft.PeftModel.from_pretrained(base, folder)` reads,
  `adapter_config.json` and `adapter_model.safetensors` (Tinsmith's own files left out).
  This is also what `save_weights_external` stores.
- Merged model: the base model's Hugging Face folder loaded with transformers in float32
  (as the server computes; a synthetic folder's seeded weights built as the runner builds
  them), `W += (alpha / rank) * B @ A` for every adapted Linear, and for a fused MoE expert
  weight [E, out, in] `W[e] += (alpha / rank) * B_e @ A_e` for every expert e (the factors
  in PEFT's target_parameters layout, engine/moe_checkpoint.py), saved with
  `save_pretrained` next to the base folder's tokenizer files, so
  `AutoModelForCausalLM.from_pretrained(folder)` needs neither peft nor Tinsmith. An
  adapted `lm_head` tied to the input embeddings is untied first: the update belongs to
  the unembedding only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from tinsmith.engine.checkpoint import (
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    read_lora_spec,
    split_peft_key,
)
from tinsmith.engine.moe_checkpoint import configured_paths, from_peft, is_expert_path, peft_paths

PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json", "READY",
               "synthetic.json"}  # the merged folder has weights: not a synthetic one


def peft_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The PEFT adapter files of a checkpoint; ValueError if one is missing."""
    missing = [n for n in PEFT_FILES if n not in files]
    if missing:
        raise ValueError(f"checkpoint is missing {missing}: it is not a LoRA adapter")
    return {n: bytes(files[n]) for n in PEFT_FILES}


def write_peft_folder(files: Mapping[str, bytes], out_dir: Path) -> list[Path]:
    """Write a checkpoint's PEFT adapter files into `out_dir`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in peft_files(files).items():
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    return written


def lora_deltas(files: Mapping[str, bytes],
                experts: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """{path: delta} of every adapted layer, in float32: a Linear's module path and
    (alpha / rank) * B @ A; a fused expert weight's parameter path (a key of `experts`,
    which maps it to its number of experts E) and the [E, out, in] per-expert deltas."""
    spec = read_lora_spec(files)
    config = json.loads(peft_files(files)[CONFIG_FILE])
    # PEFT's name of each expert parameter's factors -> (parameter path, E).
    experts = experts or {}
    named = peft_paths(configured_paths(list(experts), config))
    wrapped = {peft: (path, experts[path]) for path, peft in named.items() if peft != path}
    tensors = safetensors.torch.load(peft_files(files)[WEIGHTS_FILE])
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        named = split_peft_key(key)
        if named is not None:
            factors.setdefault(named[0], {})[named[1]] = tensor.float()
        elif ".base_layer." not in key.removeprefix(PEFT_PREFIX):  # lm_head's base: unchanged
            raise ValueError(f"{WEIGHTS_FILE}: unexpected tensor {key!r}")
    scale = spec.alpha / spec.rank
    out = {}
    for path, f in factors.items():
        if set(f) != {"A", "B"}:
            raise ValueError(f"{WEIGHTS_FILE}: {path} lacks lora_A or lora_B")
        if path in wrapped:
            param, E = wrapped[path]
            a, b = from_peft(f["A"], "A", E), from_peft(f["B"], "B", E)  # [E, r, in], [E, out, r]
            out[param] = scale * torch.bmm(b, a)
        else:
            out[path] = scale * (f["B"] @ f["A"])
    return out


def expert_params(model: torch.nn.Module) -> dict[str, int]:
    """{path: E} of `model`'s fused 3-D expert weights that LoRA may adapt (Qwen3-MoE,
    Mixtral in transformers 5: `<block>.experts.gate_up_proj`, `.down_proj`)."""
    return {name: int(p.shape[0]) for name, p in model.named_parameters()
            if p.dim() == 3 and is_expert_path(name)}


def merge_lora(model: torch.nn.Module, files: Mapping[str, bytes]) -> int:
    """Add the checkpoint's LoRA updates into `model`'s weights; returns the layers merged."""
    head = model.get_output_embeddings()
    experts = expert_params(model)
    deltas = lora_deltas(files, experts)
    for path, delta in deltas.items():
        if path in experts:
            weight = model.get_parameter(path)
            if weight.shape != delta.shape:
                raise ValueError(f"expert weight {path!r} is {tuple(weight.shape)}, its LoRA "
                                 f"update {tuple(delta.shape)}")
            with torch.no_grad():
                weight += delta.to(weight.dtype)
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"the base model has no layer {path!r}") from e
        if not isinstance(module, torch.nn.Linear) or module.weight.shape != delta.shape:
            raise ValueError(f"layer {path!r} is not a Linear of shape {tuple(delta.shape)}")
        if module is head and head.weight is model.get_input_embeddings().weight:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            for config in (model.config, model.config.get_text_config()):
                config.tie_word_embeddings = False
        with torch.no_grad():
            module.weight += delta.to(module.weight.dtype)
    return len(deltas)


def write_merged_model(files: Mapping[str, bytes], base_dir: Path, out_dir: Path) -> Path:
    """A Hugging Face model folder: the base in `base_dir` with the checkpoint merged in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinsmith.engine.device import Placement
    from tinsmith.models.synthetic import is_synthetic

    if is_synthetic(base_dir):  # no weight files: the seeded weights the server computes with
        from tinsmith.engine.runner import load_base_model

        model = load_base_model(base_dir, AutoConfig.from_pretrained(base_dir),
                            Placement(torch.device("cpu"), torch.float32))
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merge_lora(model, files)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for src in sorted(base_dir.iterdir()):  # tokenizer, chat template...: as they are
        name = src.name
        if src.is_file() and name not in _NOT_COPIED and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(src, out_dir / name)
    return out_dir
