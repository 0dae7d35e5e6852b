"""`tinsmith/tiny-test`: a tiny Llama with random weights and a real tokenizer.

Built locally in seconds, for tests and quick experiments: 2 layers, hidden 64, the
SmolLM2 tokenizer and chat template (vocabulary 49152), weights drawn from a fixed seed so
every machine builds the same model. It learns fast and its outputs are gibberish.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tinsmith.models.catalog import ModelSpec

NAME = "tinsmith/tiny-test"
SEED = 1234


def _tokenizer_dir(cache_dir: Path) -> Path:
    """The SmolLM2 tokenizer, extracted once from the GGUF file (about 5 s)."""
    from filelock import FileLock

    from tinsmith.models import smollm2

    out = cache_dir / "tokenizers" / "SmolLM2"
    with FileLock(str(cache_dir / "tokenizer-SmolLM2.lock")):
        if not (out / "READY").is_file():
            tmp = out.with_name("SmolLM2.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            smollm2.save_tokenizer(tmp)
            (tmp / "READY").write_text("ok\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def build(cache_dir: Path, out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = _tokenizer_dir(cache_dir)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_theta=10000.0,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = NAME
    model.save_pretrained(out_dir)
    for f in tok_dir.iterdir():
        if f.name != "READY":
            shutil.copy(f, out_dir / f.name)


SPEC = ModelSpec(
    name=NAME,
    description="tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, for tests",
    folder_name="tiny-test",
    build=build,
)
