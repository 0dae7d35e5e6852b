"""The model catalog: synthetic models, and hosted names found offline on this machine.

Synthetic folders are only config + tokenizer (the big ones' weights are never built here);
the tiny synthetic models are built by the runner from their config, seeded. Hosted names are
looked up in a fake Hugging Face cache and a $TINSMITH_MODELS_DIR made in tmp_path.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from huggingface_hub import constants
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tinsmith import cli
from tinsmith.cookbook.renderers import ChatTemplateRenderer, get_renderer
from tinsmith.engine.runner import ModelRunner
from tinsmith.models import byte_tokenizer, synthetic
from tinsmith.models.catalog import known_models, resolve_model_dir
from tinsmith.models.local import MODELS_DIR_ENV, list_local
from tinsmith.types import UserError

SYNTHETIC = [synthetic.PREFIX + key for key in synthetic.SHAPES]
TEXT = "Tinsmiths hammer tin. Ünïcødé ✓ 🙂\n\ttabs and  spaces"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tinsmith-cache")


# ----- synthetic models -------------------------------------------------------------------
def test_every_synthetic_name_is_in_the_catalog() -> None:
    names = {s.name for s in known_models()}
    for want in ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-0.5b",
                 "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b",
                 "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe"]:
        assert synthetic.PREFIX + want in names


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_folder_offline(name: str, cache: Path) -> None:
    folder = resolve_model_dir(name, cache)
    assert synthetic.is_synthetic(folder) and synthetic.synthetic_seed(folder) == 0
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    shape = synthetic.SHAPES[name.removeprefix(synthetic.PREFIX)]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == shape.model_type
    text_config = config.get_text_config()  # a vision-language config's language model
    for key, value in shape.config.items():
        if key not in ("rope_theta", "rope_scaling"):  # stored as rope_parameters
            assert getattr(text_config, key) == value, key
    assert text_config.rope_parameters["rope_theta"] == shape.config["rope_theta"]

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) == len(TEXT.encode()) and tok.decode(ids) == TEXT  # one token per byte
    assert len(tok) < text_config.vocab_size  # the model's vocabulary is the real, larger one
    gen = GenerationConfig.from_pretrained(folder)
    stops = {tok.convert_ids_to_tokens(i) for i in gen.eos_token_id}
    assert tok.eos_token_id in gen.eos_token_id and stops <= set(tok.all_special_tokens)
    assert text_config.bos_token_id == gen.bos_token_id
    if shape.style == "llama3":
        assert tok.encode("hi")[0] == tok.bos_token_id == config.bos_token_id

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello ✓"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert "hello ✓" in text and tok.eos_token in text
    renderer = get_renderer(tok)
    assert isinstance(renderer, ChatTemplateRenderer) and renderer.stop_token == tok.eos_token_id
    tokens, weights = renderer.build_supervised_example(chat)
    trained = [t for t, w in zip(tokens, weights) if w > 0]
    assert tok.decode(trained) == "hello ✓" + tok.eos_token
    reply = tok.encode("ok", add_special_tokens=False) + [renderer.stop_token]
    assert renderer.parse_response(reply) == ({"role": "assistant", "content": "ok"}, True)


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if "tiny" in n])
def test_tiny_synthetic_model_is_built_seeded(name: str, cache: Path) -> None:
    folder = resolve_model_dir(name, cache)
    a, b = ModelRunner(folder, name), ModelRunner(folder, name)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.vocab_size == 512 and not list(folder.glob("*.safetensors"))


def test_synthetic_seed_changes_the_weights(tmp_path: Path) -> None:
    synthetic.write_folder("tiny-qwen3", tmp_path / "s1", seed=1)
    synthetic.write_folder("tiny-qwen3", tmp_path / "s0", seed=0)
    w1 = ModelRunner(tmp_path / "s1", "s1").model.lm_head.weight
    w0 = ModelRunner(tmp_path / "s0", "s0").model.lm_head.weight
    assert synthetic.synthetic_seed(tmp_path / "s1") == 1 and not torch.equal(w0, w1)


# ----- hosted names, offline ----------------------------------------------------------------
def _save_tiny(folder: Path, weights: bool = True) -> None:
    config = synthetic.config_for("tiny-llama")
    if weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    byte_tokenizer.build_tokenizer(byte_tokenizer.LLAMA3, 512).save_pretrained(folder)


def _fake_hf_cache(root: Path, repo: str, weights: bool = True) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/}."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    _save_tiny(base / "snapshots" / rev, weights)
    return base / "snapshots" / rev


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    return root


def test_hosted_name_from_the_hf_cache(hf_cache: Path, cache: Path, capsys) -> None:
    snapshot = _fake_hf_cache(hf_cache, "meta-llama/Llama-3.2-1B")
    folder = resolve_model_dir("meta-llama/Llama-3.2-1B", cache)
    assert folder == snapshot
    runner = ModelRunner(folder, "meta-llama/Llama-3.2-1B")
    assert runner.arch == "llama"
    cli.cmd_models(argparse.Namespace())
    out = capsys.readouterr().out
    assert "meta-llama/Llama-3.2-1B" in out and "in HF cache" in out and "synthetic/qwen3-8b" in out


def test_hosted_name_from_the_models_dir(hf_cache: Path, tmp_path: Path, cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    _save_tiny(models / "Qwen" / "Qwen3-8B")
    monkeypatch.setenv(MODELS_DIR_ENV, str(models))
    assert resolve_model_dir("Qwen/Qwen3-8B", cache) == models / "Qwen" / "Qwen3-8B"
    assert [(m.name, m.source) for m in list_local()] == [("Qwen/Qwen3-8B", "models dir")]


def test_missing_hosted_name_says_where_it_looked(hf_cache: Path, cache: Path) -> None:
    with pytest.raises(UserError) as err:
        resolve_model_dir("Qwen/Qwen3-8B", cache)
    message = str(err.value)
    assert "unknown base model 'Qwen/Qwen3-8B'" in message
    assert str(hf_cache / "models--Qwen--Qwen3-8B") in message and MODELS_DIR_ENV in message
    assert "hf download Qwen/Qwen3-8B" in message


def test_cached_config_without_weights_is_refused(hf_cache: Path, cache: Path) -> None:
    _fake_hf_cache(hf_cache, "org/half", weights=False)
    with pytest.raises(UserError, match="no weight files"):
        resolve_model_dir("org/half", cache)
