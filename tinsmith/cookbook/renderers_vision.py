"""Image parts in chat messages, for vision-language models (Qwen3-VL): conversations ->
`ModelInput`s with `ImageChunk`s and per-position loss weights.

A message's content may be a list of parts, as in the hosted cookbook's `Message`:
`{"type": "text", "text": str}` and `{"type": "image", "image": PIL.Image | bytes}` (bytes:
PNG or JPEG). `VisionRenderer` renders the conversation with a text renderer (renderers.py,
the model's own chat template) where each image part stands as
`<|vision_start|><|image_pad|><|vision_end|>`, then replaces each `<|image_pad|>` token by an
`ImageChunk` whose `expected_tokens` is what the model's image processor makes of the image
(patches / merge^2), as Qwen3-VL's chat template and the hosted cookbook's `qwen3_vl`
renderer lay images out. Image positions never carry loss (weight 0).

Weights are per model-input position: a list as long as `ModelInput.length` (images count as
their `expected_tokens`), so `to_datum` shifts them exactly like renderers.to_datum does.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from tinker import types

from tinsmith.cookbook.renderers import Message, Renderer, TrainOn, get_renderer

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


def image_bytes(image: Any) -> tuple[bytes, str, tuple[int, int]]:
    """(encoded bytes, "png" | "jpeg", (width, height)) of a PIL image or PNG/JPEG bytes."""
    from PIL import Image

    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as img:
            fmt = {"PNG": "png", "JPEG": "jpeg"}.get(img.format or "")
            if fmt is None:
                raise ValueError(f"image parts must be PNG or JPEG bytes, got {img.format}")
            return bytes(image), fmt, img.size
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return buf.getvalue(), "png", image.size


def image_tokens(image_processor: Any, width: int, height: int) -> int:
    """Tokens an image of this size becomes for the model: its processor's patches / merge^2."""
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return int(patches) // int(image_processor.merge_size) ** 2


class VisionRenderer:
    """A text renderer plus image parts; `parse_response` and `stop_sequences` are the text
    renderer's (replies are text)."""

    def __init__(self, tokenizer: Any, image_processor: Any, text: Renderer | None = None) -> None:
        self.text = text or get_renderer(tokenizer)
        self.processor = image_processor
        self.pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.pad_id is None or self.pad_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_PAD} token: not a vision-language model")

    def _flatten(self, messages: list[Message]) -> tuple[list[Message], list[Any]]:
        """Messages with string contents (image parts as their placeholder text) and the images."""
        flat, images = [], []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                flat.append(m)
                continue
            text = ""
            for part in content:
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "image":
                    images.append(part["image"])
                    text += VISION_START + IMAGE_PAD + VISION_END
                else:
                    raise ValueError(f"unsupported content part type {part['type']!r}")
            flat.append({**m, "content": text})
        return flat, images

    def _chunks(self, tokens: list[int], images: list[Any],
                weights: list[float] | None) -> tuple[types.ModelInput, list[float]]:
        at = [i for i, t in enumerate(tokens) if t == self.pad_id]
        if len(at) != len(images):
            raise ValueError(f"{len(images)} image parts but {len(at)} {IMAGE_PAD} tokens "
                             "(a text part holds the placeholder itself?)")
        chunks: list[types.ModelInputChunk] = []
        out_w: list[float] = []
        start = 0
        for i, image in zip(at, images):
            data, fmt, (w, h) = image_bytes(image)
            n = image_tokens(self.processor, w, h)
            if i > start:
                chunks.append(types.EncodedTextChunk(tokens=tokens[start:i]))
            chunks.append(types.ImageChunk(data=data, format=fmt, expected_tokens=n))  # type: ignore[arg-type]
            if weights is not None:
                out_w += weights[start:i] + [0.0] * n
            start = i + 1
        if start < len(tokens):
            chunks.append(types.EncodedTextChunk(tokens=tokens[start:]))
        if weights is not None:
            out_w += weights[start:]
        return types.ModelInput(chunks=chunks), out_w

    def build_supervised_example(
        self, messages: list[Message], train_on: TrainOn = TrainOn.ALL_ASSISTANT
    ) -> tuple[types.ModelInput, list[float]]:
        """The whole conversation as a ModelInput and one weight per position."""
        flat, images = self._flatten(messages)
        tokens, weights = self.text.build_supervised_example(flat, train_on)
        return self._chunks(tokens, images, weights)

    def build_generation_prompt(self, messages: list[Message]) -> types.ModelInput:
        flat, images = self._flatten(messages)
        return self._chunks(self.text.build_generation_prompt(flat), images, None)[0]

    def stop_sequences(self) -> list[int] | list[str]:
        return self.text.stop_sequences()

    def parse_response(self, tokens: list[int]) -> tuple[Message, bool]:
        return self.text.parse_response(tokens)


def to_datum(model_input: types.ModelInput, weights: list[float]) -> types.Datum:
    """A cross-entropy datum with next-token alignment, for a ModelInput that may hold images:
    the input drops its last position (a text token), position i predicts position i + 1.
    Targets at image positions are 0, with weight 0 (an image is input, never predicted)."""
    chunks = list(model_input.chunks)
    last = chunks[-1]
    if not isinstance(last, types.EncodedTextChunk) or len(weights) != model_input.length:
        raise ValueError("need a ModelInput ending in text, and one weight per position")
    ids: list[int] = []
    for c in chunks:
        ids += list(c.tokens) if isinstance(c, types.EncodedTextChunk) else [0] * c.length
    head = chunks[:-1] + ([types.EncodedTextChunk(tokens=list(last.tokens)[:-1])] if len(last.tokens) > 1 else [])
    return types.Datum(
        model_input=types.ModelInput(chunks=head),
        loss_fn_inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64),
                        "weights": np.asarray(weights[1:], dtype=np.float32)},
    )
