"""Renderers: conversations -> tokens and per-token loss weights, and sampled tokens -> a message.

A conversation is a list of messages `{"role": "system"|"user"|"assistant"|"tool",
"content": str}`. A renderer

- builds a supervised example: the full token list plus one weight per token (1.0 on the
  tokens that are trained on, chosen by `TrainOn`);
- builds a generation prompt: the conversation followed by the assistant turn opener;
- says what to pass as `SamplingParams.stop` so sampling ends with the assistant turn;
- parses sampled tokens (which include the stop token, as Tinsmith returns them) back
  into an assistant message.

`ChatTemplateRenderer` works for any Hugging Face tokenizer with a chat template: nothing is
written per model family. Every message's character span comes from rendering prefixes of
the conversation, its header/content/footer split from rendering the message with a
sentinel content, and the whole text is tokenized once, mapping character spans to tokens
through the offsets (tokenizing pieces separately would disagree with the real token
boundaries). `PlainRenderer` is `role: content` lines for base models without a template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any

import numpy as np
from tinker import types

Message = dict[str, Any]

# Stands in for a message's content to find where the template puts the content.
_SENTINEL = "TINSMITHSENTINEL7f3a"


class TrainOn(str, Enum):
    """Which tokens of a conversation get weight 1.0."""

    LAST_ASSISTANT = "last_assistant"  # content + end-of-turn of the final assistant message
    ALL_ASSISTANT = "all_assistant"  # content + end-of-turn of every assistant message
    ALL_MESSAGES = "all_messages"  # content + end-of-turn of every message (no role headers)
    ALL_TOKENS = "all_tokens"  # everything, headers and any template preamble included


class Renderer(ABC):
    """Turns conversations into tokens/weights and sampled tokens back into a message."""

    _add_special_tokens = False  # whether tokenizing adds BOS etc. (templates write them)
    _marker: str  # the end-of-turn text that ends an assistant message

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("renderers need a fast tokenizer (character offsets per token)")
        self.tokenizer = tokenizer

    # --- what each renderer defines -------------------------------------------------------

    @abstractmethod
    def _render(self, messages: list[Message]) -> tuple[str, list[tuple[int, int, int]]]:
        """The conversation's text and, per message, the character range that a TrainOn
        option can weight (content + end-of-turn marker) as (message index, start, end)."""

    @abstractmethod
    def _prompt_text(self, messages: list[Message]) -> str:
        """The conversation's text followed by the assistant turn opener."""

    @abstractmethod
    def stop_sequences(self) -> list[int] | list[str]:
        """What to pass as `SamplingParams.stop` to end sampling with the assistant turn."""

    @abstractmethod
    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        """The assistant message in sampled `tokens`, and whether it ended at the stop."""

    # --- shared ---------------------------------------------------------------------------

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=self._add_special_tokens,
                             return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def build_supervised_example(
        self, messages: list[Message], train_on: TrainOn = TrainOn.ALL_ASSISTANT
    ) -> tuple[list[int], list[float]]:
        """All tokens of the conversation and a weight per token.

        A conversation with nothing to train on (e.g. no assistant message under
        ALL_ASSISTANT) gets all-zero weights rather than an error.
        """
        train_on = TrainOn(train_on)
        text, spans = self._render(messages)
        tokens, offsets = self._encode(text)
        if train_on is TrainOn.ALL_TOKENS:
            return tokens, [1.0] * len(tokens)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on is TrainOn.ALL_MESSAGES:
            chosen = set(range(len(messages)))
        elif train_on is TrainOn.ALL_ASSISTANT:
            chosen = set(assistant)
        else:
            chosen = set(assistant[-1:])
        ranges = [(s, e) for i, s, e in spans if i in chosen and e > s]
        # A token is trained on if it overlaps a weighted range. A token straddling a
        # boundary (e.g. a header's "\n" merged with content starting with "\n") is trained
        # on: the model has to produce it, and dropping it would lose part of the content.
        weights = [1.0 if any(ts < e and s < te for s, e in ranges) else 0.0
                   for ts, te in offsets]
        return tokens, weights

    def observation_tokens(self, before: list[Message], new: list[Message], ended: bool) -> list[int]:
        """Tokens that follow a sampled assistant reply in a multi-turn episode: the rest of
        the reply's footer, the `new` (user / tool) messages and the assistant turn opener.

        `before` is the conversation the reply was sampled for. When sampling was cut off
        before the end-of-turn marker (`ended` False) the whole footer is returned, marker
        included. The reply itself is never rendered (a placeholder stands in for it), so
        the next turn's input is the previous input + the sampled tokens, exactly as
        sampled, + these: no text is re-encoded, whatever the sampled tokens decode to (the
        hosted cookbook's multi-turn environments build observations the same way).
        """
        reply = {"role": "assistant", "content": _SENTINEL}
        text = self._prompt_text([*before, reply, *new]).partition(_SENTINEL)[2]
        if ended:  # the sampled tokens end with the marker: only what follows it is missing
            text = text.partition(self._marker)[2]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build_generation_prompt(self, messages: list[Message]) -> list[int]:
        """Tokens of the conversation followed by the assistant turn opener."""
        return self._encode(self._prompt_text(messages))[0]


class ChatTemplateRenderer(Renderer):
    """Renders with the tokenizer's own chat template (`tokenizer.apply_chat_template`).

    Requires a prefix-stable template: rendering messages[:i] must be a prefix of rendering
    messages[:i+1] (true of ChatML-like templates; raises ValueError otherwise). Anything a
    template adds on its own (a default system prompt, BOS) is part of the next message's
    header and weighted only under ALL_TOKENS.
    """

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat template; use PlainRenderer")
        # The end-of-turn marker: the first special token in an assistant message's footer.
        _, footer = self._header_footer([{"role": "user", "content": "hi"}], "assistant")
        footer_ids = self._encode(footer)[0]
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        if tokenizer.eos_token_id in footer_ids:
            self.stop_token: int | None = tokenizer.eos_token_id
        else:
            self.stop_token = next((t for t in footer_ids if t in special), None)
        # Weighted with a message's content: its footer up to and including the marker.
        # What follows (ChatML's "\n") is not: sampling never goes past the stop token.
        self._marker = tokenizer.decode([self.stop_token]) if self.stop_token is not None \
            else footer
        if not self._marker:
            raise ValueError("chat template has no end-of-turn marker after assistant content")

    def _apply(self, messages: list[Message], generation_prompt: bool = False) -> str:
        if not messages and not generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _header_footer(self, prefix: list[Message], role: str) -> tuple[str, str]:
        """The text a message of `role` gets before and after its content, after `prefix`."""
        before = self._apply(prefix)
        text = self._apply([*prefix, {"role": role, "content": _SENTINEL}])
        if not text.startswith(before) or text.count(_SENTINEL) != 1:
            raise ValueError(f"chat template is not prefix-stable around a {role!r} message")
        header, _, footer = text[len(before):].partition(_SENTINEL)
        return header, footer

    def _render(self, messages: list[Message]) -> tuple[str, list[tuple[int, int, int]]]:
        texts = [self._apply(messages[:i]) for i in range(len(messages) + 1)]
        spans = []
        for i, msg in enumerate(messages):
            before, after = texts[i], texts[i + 1]
            if not after.startswith(before):
                raise ValueError(
                    f"chat template is not prefix-stable: rendering messages[:{i + 1}] does not "
                    f"start with the rendering of messages[:{i}], so per-message token spans "
                    "(and loss weights) are undefined for this template")
            piece = after[len(before):]
            header, footer = self._header_footer(messages[:i], msg["role"])
            if (not piece.startswith(header) or not piece.endswith(footer)
                    or len(piece) < len(header) + len(footer)):
                raise ValueError(f"chat template renders message {i} ({msg['role']!r}) with a "
                                 "header/footer that depends on its content")
            start = len(before) + len(header)
            end = len(after) - len(footer)
            # Extend over the end-of-turn marker (or the whole footer if it lacks one).
            cut = footer.find(self._marker)
            end += cut + len(self._marker) if cut >= 0 else len(footer)
            spans.append((i, start, end))
        return texts[-1], spans

    def _prompt_text(self, messages: list[Message]) -> str:
        return self._apply(messages, generation_prompt=True)

    def stop_sequences(self) -> list[int] | list[str]:
        return [self.stop_token] if self.stop_token is not None else [self._marker]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        if self.stop_token is None:
            content, marker, _ = self.tokenizer.decode(tokens).partition(self._marker)
            return {"role": "assistant", "content": content}, bool(marker)
        if self.stop_token in tokens:
            content = tokens[:tokens.index(self.stop_token)]
            return {"role": "assistant", "content": self.tokenizer.decode(content)}, True
        return {"role": "assistant", "content": self.tokenizer.decode(tokens)}, False


class PlainRenderer(Renderer):
    """`"{role}: {content}\\n"` per message, for base models without a chat template.

    The header is `"{role}:"` and the content is `" {content}"`, so the generation prompt
    ends with `"assistant:"` and the model samples the space as part of its first token (as
    in training). The end-of-turn marker is the single `"\\n"`: sampling stops at the first
    newline. This keeps the format unambiguous (a line is a turn) at the cost of single-line
    replies; a blank-line separator would allow multi-line replies but base models often
    produce blank lines inside an answer, which then look like the turn's end anyway.
    BOS is added if the tokenizer adds it by default.
    """

    _add_special_tokens = True
    _marker = "\n"

    def _render(self, messages: list[Message]) -> tuple[str, list[tuple[int, int, int]]]:
        text, spans = "", []
        for i, msg in enumerate(messages):
            header = f"{msg['role']}:"
            piece = f"{header} {msg['content']}\n"
            spans.append((i, len(text) + len(header), len(text) + len(piece)))
            text += piece
        return text, spans

    def _prompt_text(self, messages: list[Message]) -> str:
        return self._render(messages)[0] + "assistant:"

    def stop_sequences(self) -> list[int] | list[str]:
        return ["\n"]

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        content, newline, _ = text.partition("\n")
        content = content.removeprefix(" ")  # the space after "assistant:"
        return {"role": "assistant", "content": content}, bool(newline)


def get_renderer(tokenizer: Any) -> Renderer:
    """The chat-template renderer if the tokenizer has a template, else the plain one."""
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplateRenderer(tokenizer)
    return PlainRenderer(tokenizer)


def to_datum(tokens: list[int], weights: list[float]) -> types.Datum:
    """A cross-entropy datum with next-token alignment: position i of the model input
    (tokens[:-1]) predicts target i (tokens[i+1]), weighted by weights[i+1]."""
    if len(tokens) != len(weights) or len(tokens) < 2:
        raise ValueError("need at least 2 tokens and one weight per token")
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(tokens[:-1])),
        loss_fn_inputs={
            "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
            "weights": np.asarray(weights[1:], dtype=np.float32),
        },
    )
