"""Where a base model runs and in what precision: the `device` and `dtype` settings resolved.

The precision policy (docs/gpu.md):
- the base model's weights and activations are in the chosen dtype (auto: bfloat16 on a GPU,
  float32 on a CPU);
- LoRA factors, their gradients and the optimizer's moments are float32 on the model's device
  (master weights): a LoRA delta is computed in float32 from the base dtype's activations and
  cast back, so an update smaller than bfloat16's resolution is never lost;
- target log-probabilities are computed in float32 from the base dtype's hidden states
  (log-softmax in float32, by vocabulary chunks), and losses are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    """A resolved device and base dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def shapes_only(self) -> Placement:
        """The meta device in this dtype: a model with shapes and no values."""
        return Placement(torch.device("meta"), self.dtype)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> the first CUDA device if there is one, else the CPU; "cuda", "cuda:N" and
    "cpu" as given, checked to exist."""
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU, float32 on a CPU (today's CPU behaviour, exact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    dev = resolve_device(device)
    return Placement(dev, resolve_dtype(dtype, dev))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), e.g. before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
