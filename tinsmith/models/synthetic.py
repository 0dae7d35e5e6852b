"""Synthetic models: the real architectures and shapes with seeded random weights, no download.

`synthetic/<model>` names a published model's exact architecture (its config.json shapes:
hidden size, MLP width, layers, attention and KV heads, head_dim, vocabulary, tied or untied
embeddings, RoPE theta and scaling) for benchmarks and GPU checks on a machine with no model
hub. Its prepared folder holds

- `config.json` and `generation_config.json`, with BOS/EOS ids of the bundled tokenizer;
- a byte-level tokenizer with the family's special tokens and a chat template
  (byte_tokenizer.py), so renderers and `apply_chat_template` work;
- `synthetic.json` (`{"seed": 0, ...}`), the marker; and no weight files.

The runner builds such a folder's model with `AutoModelForCausalLM.from_config` directly on
its device, in its dtype, after seeding torch with the marker's seed: random weights of the
real shapes in seconds (an 8B model on a GPU included). The same seed gives the same weights
on one device type and torch version; a CPU and a GPU draw different numbers.

The model's vocabulary (e.g. 128256) is much larger than the tokenizer's (256 bytes plus a
few special tokens): the embedding and unembedding have their real shapes, which is what a
benchmark measures, and ids beyond the tokenizer are never produced by it. A sampled id with
no token decodes to nothing.

The `synthetic/tiny-*` models (hidden 64, 2 layers, vocabulary 512) are for CPU tests;
`tiny-qwen3-moe` is a Qwen3-MoE with 8 experts (top-2).

Vision-language shapes (Qwen3-VL: a `vision` tower config beside the text fields) also get an
image processor config (`preprocessor_config.json`, the processor's own save) and a tokenizer
with Qwen's vision tokens (<|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>),
whose ids the config's `image_token_id` etc. name. `tiny-qwen3-vl` has a 2-block vision tower
of width 32 and takes 32x32 to 128x128 pixel images (1 to 16 image tokens); `tiny-qwen2.5-vl`
(Qwen2.5-VL: 14-pixel patches, window attention) 28x28 to 112x112 (1 to 16 image tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinsmith.models import byte_tokenizer
from tinsmith.models.catalog import ModelSpec

MARKER = "synthetic.json"  # the file the runner looks for (engine/runner.py SYNTHETIC_MARKER)
PREFIX = "synthetic/"
DEFAULT_SEED = 0

# Llama 3.1 / 3.2 RoPE scaling, as published (rope_type "llama3").
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA32_ROPE = {**_LLAMA31_ROPE, "factor": 32.0}


@dataclass(frozen=True)
class Shape:
    """A model's architecture: the HF model_type, config.json fields, and tokenizer style."""

    model_type: str
    config: dict[str, Any]  # config.json fields, as keyword arguments of the config class
    style: str  # a STYLES key
    source: str  # the published model whose config.json these fields are ("" for tiny ones)
    vision: dict[str, Any] | None = None  # a VL model's vision_config fields
    processor: dict[str, Any] | None = None  # a VL model's image processor fields


# Chat-ML with Qwen's vision tokens (ids 259-262 after the three chat-ML ones).
CHATML_VL = byte_tokenizer.TokenStyle(
    specials=(*byte_tokenizer.CHATML.specials, "<|vision_start|>", "<|vision_end|>",
              "<|image_pad|>", "<|video_pad|>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", stop=byte_tokenizer.CHATML.stop,
    chat_template=byte_tokenizer.CHATML.chat_template,
)
STYLES = {**byte_tokenizer.STYLES, "chatml_vl": CHATML_VL}


# The published shapes, from each model's config.json on the Hugging Face Hub (written here
# from those files; fields not listed take the transformers defaults, which match them).
def _shape(model_type: str, style: str, source: str, **config: Any) -> Shape:
    return Shape(model_type, config, style, source)


def _fields(**fields: Any) -> dict[str, Any]:
    return fields


def _vl_shape(source: str, text: dict[str, Any], vision: dict[str, Any],
              processor: dict[str, Any], model_type: str = "qwen3_vl") -> Shape:
    return Shape(model_type, text, "chatml_vl", source, vision, processor)


SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": _shape(
        "llama", "llama3", "meta-llama/Llama-3.2-1B",
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    "llama-3.2-3b": _shape(
        "llama", "llama3", "meta-llama/Llama-3.2-3B",
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    "llama-3.1-8b": _shape(
        "llama", "llama3", "meta-llama/Llama-3.1-8B",
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    # Planning shapes (`tinsmith plan`; fine to serve where the memory is, never built in tests).
    "llama-3.1-70b": _shape(
        "llama", "llama3", "meta-llama/Llama-3.1-70B",
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    # Qwen2 / 2.5: biases on q/k/v are part of the architecture (no config field).
    "qwen2.5-0.5b": _shape(
        "qwen2", "chatml", "Qwen/Qwen2.5-0.5B",
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, max_window_layers=24, use_sliding_window=False,
        rms_norm_eps=1e-6),
    "qwen2.5-7b": _shape(
        "qwen2", "chatml", "Qwen/Qwen2.5-7B",
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
        max_position_embeddings=131072, max_window_layers=28, use_sliding_window=False,
        rms_norm_eps=1e-6),
    # Qwen3: head_dim is set on its own (128, not hidden / heads for 0.6B), q/k RMS norms
    # (q_norm, k_norm) are part of the architecture, no attention biases.
    "qwen3-0.6b": _shape(
        "qwen3", "chatml", "Qwen/Qwen3-0.6B",
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        rope_theta=1000000.0, max_position_embeddings=40960, attention_bias=False,
        max_window_layers=28, use_sliding_window=False, rms_norm_eps=1e-6),
    "qwen3-8b": _shape(
        "qwen3", "chatml", "Qwen/Qwen3-8B",
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
        rope_theta=1000000.0, max_position_embeddings=40960, attention_bias=False,
        max_window_layers=36, use_sliding_window=False, rms_norm_eps=1e-6),
    # Qwen3-MoE: 128 experts of width 768 per layer, 8 routed per token (top-k weights
    # renormalised: norm_topk_prob), every layer sparse (decoder_sparse_step 1, no
    # mlp_only_layers); intermediate_size is the width a dense layer would have.
    "qwen3-30b-a3b": _shape(
        "qwen3_moe", "chatml", "Qwen/Qwen3-30B-A3B",
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.001, vocab_size=151936, tie_word_embeddings=False,
        rope_theta=1000000.0, max_position_embeddings=40960, attention_bias=False,
        max_window_layers=48, use_sliding_window=False, rms_norm_eps=1e-6),
    # 128 experts of width 1536, top-8, 94 layers: 235B parameters, 22B active per token.
    "qwen3-235b-a22b": _shape(
        "qwen3_moe", "chatml", "Qwen/Qwen3-235B-A22B",
        hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], router_aux_loss_coef=0.001, vocab_size=151936,
        tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960,
        attention_bias=False, max_window_layers=94, use_sliding_window=False, rms_norm_eps=1e-6),
    # Tiny, for CPU tests: one tied and one untied head; tiny-qwen3's head_dim (32) is not
    # hidden / heads (16), as in Qwen3-0.6B.
    "tiny-llama": _shape(
        "llama", "llama3", "",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny-qwen2": _shape(
        "qwen2", "chatml", "",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=4096, use_sliding_window=False, rms_norm_eps=1e-6),
    "tiny-qwen3": _shape(
        "qwen3", "chatml", "",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=False,
        rope_theta=1000000.0, max_position_embeddings=4096, rms_norm_eps=1e-6),
    # 8 experts, top-2, expert width 48 (so gate_up [8, 96, 64] is not square: a transposed
    # factor cannot pass unnoticed).
    "tiny-qwen3-moe": _shape(
        "qwen3_moe", "chatml", "",
        hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, vocab_size=512, tie_word_embeddings=False,
        rope_theta=1000000.0, max_position_embeddings=4096, rms_norm_eps=1e-6),
    # Qwen3-VL: the text model is a Qwen3 with interleaved multimodal RoPE (mrope_section
    # splits head_dim / 2 over time, height, width); the vision tower's deepstack layers feed
    # the first len(deepstack_visual_indexes) decoder layers.
    "qwen3-vl-8b": _vl_shape(
        "Qwen/Qwen3-VL-8B-Instruct",
        _fields(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
             max_position_embeddings=262144, attention_bias=False, rms_norm_eps=1e-6,
             rope_theta=5000000.0, rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                                 "mrope_interleaved": True}),
        _fields(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
             num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
             hidden_act="gelu_pytorch_tanh"),
        _fields(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
             image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 65536, "longest_edge": 16777216})),
    "tiny-qwen3-vl": _vl_shape(
        "",
        _fields(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=False,
             max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
             rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
        _fields(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
             num_position_embeddings=64, deepstack_visual_indexes=[0]),
        _fields(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
             image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128})),
    # Qwen2.5-VL: a Qwen2 text model (q/k/v biases) with multimodal RoPE (mrope_section, not
    # interleaved, splits head_dim / 2 over time, height, width); the vision tower uses
    # 14-pixel patches, window attention (full attention in fullatt_block_indexes) and gated
    # SiLU MLPs whose leaves are named like the language model's (never LoRA targets).
    "qwen2.5-vl-7b": _vl_shape(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        _fields(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
             max_position_embeddings=128000, max_window_layers=28, use_sliding_window=False,
             rms_norm_eps=1e-6, rope_theta=1000000.0,
             rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]}),
        _fields(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, window_size=112,
             fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
        _fields(patch_size=14, merge_size=2, temporal_patch_size=2,
             image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
             size={"shortest_edge": 3136, "longest_edge": 12845056}),
        model_type="qwen2_5_vl"),
    # head_dim 16 (hidden / heads): mrope_section covers its 8 rotary pairs; a 56-pixel window
    # (2x2 merged patches) in block 0, full attention in block 1.
    "tiny-qwen2.5-vl": _vl_shape(
        "",
        _fields(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
             max_position_embeddings=4096, use_sliding_window=False, rms_norm_eps=1e-6,
             rope_theta=1000000.0, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        _fields(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=56,
             fullatt_block_indexes=[1], hidden_act="silu"),
        _fields(patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
             image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 28 * 28, "longest_edge": 112 * 112}),
        model_type="qwen2_5_vl"),
}


def is_synthetic(model_dir: Path) -> bool:
    """A prepared synthetic folder: the marker file and no `*.safetensors` weights (a folder
    that has weights is loaded from them, marker or not), the runner's own test."""
    model_dir = Path(model_dir)
    return (model_dir / MARKER).is_file() and not any(model_dir.glob("*.safetensors"))


def synthetic_seed(model_dir: Path) -> int:
    """The seed to draw the folder's random weights from (torch.manual_seed before from_config)."""
    info = json.loads((Path(model_dir) / MARKER).read_text())
    return int(info.get("seed", DEFAULT_SEED))


def config_for(key: str):
    """The transformers config of `synthetic/<key>`, with the bundled tokenizer's token ids."""
    from transformers import AutoConfig

    shape = SHAPES[key]
    style = STYLES[shape.style]
    # Qwen's configs use <|endoftext|> as BOS id though its tokenizer adds no BOS.
    bos = byte_tokenizer.token_id(style, style.bos or style.pad)
    eos = [byte_tokenizer.token_id(style, t) for t in style.stop]
    if shape.vision is not None:  # a VL model: text and vision configs, vision token ids
        ids = {f"{name}_token_id": byte_tokenizer.token_id(style, f"<|{name}|>")
               for name in ("vision_start", "vision_end")}
        return AutoConfig.for_model(
            shape.model_type, text_config={**shape.config, "bos_token_id": bos, "eos_token_id": eos},
            vision_config=shape.vision, image_token_id=byte_tokenizer.token_id(style, "<|image_pad|>"),
            video_token_id=byte_tokenizer.token_id(style, "<|video_pad|>"),
            tie_word_embeddings=shape.config["tie_word_embeddings"], bos_token_id=bos,
            eos_token_id=eos, **ids)
    return AutoConfig.for_model(shape.model_type, **shape.config, bos_token_id=bos,
                                eos_token_id=eos)


def write_folder(key: str, out_dir: Path, seed: int = DEFAULT_SEED) -> None:
    """Write the prepared folder of `synthetic/<key>` (config, tokenizer, marker; no weights)."""
    from transformers import GenerationConfig

    shape = SHAPES[key]
    style = STYLES[shape.style]
    config = config_for(key)
    head = "ForConditionalGeneration" if shape.vision is not None else "ForCausalLM"
    config.architectures = [config.__class__.__name__.replace("Config", head)]
    config.save_pretrained(out_dir)
    if shape.processor is not None:  # saved as the processor's own config (no torchvision needed)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        Qwen2VLImageProcessorPil(**shape.processor).save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=byte_tokenizer.token_id(style, style.pad),
    ).save_pretrained(out_dir)
    tokenizer = byte_tokenizer.build_tokenizer(
        style, int(config.get_text_config().max_position_embeddings))
    tokenizer.save_pretrained(out_dir)
    marker = {"seed": seed, "name": PREFIX + key, "shapes_of": shape.source or None,
              "tokenizer": f"byte-level, {len(tokenizer)} tokens ({shape.style} special tokens)"}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _spec(key: str) -> ModelSpec:
    shape = SHAPES[key]
    what = (f"the shapes of {shape.source}" if shape.source
            else f"a tiny {shape.model_type} for CPU tests")
    return ModelSpec(
        name=PREFIX + key,
        description=f"synthetic: {what}, seeded random weights, byte tokenizer (no download)",
        folder_name=f"synthetic--{key}",
        build=lambda _cache_dir, out_dir: write_folder(key, out_dir),
    )


SPECS: list[ModelSpec] = [_spec(key) for key in SHAPES]
