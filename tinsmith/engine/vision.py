"""Images for vision-language models (Qwen3-VL, Qwen2.5-VL): bytes in, image tokens and pixel
tensors out.

The api layer keeps an image chunk as its bytes (types.ImageIn), with `length` placeholder
positions (IMAGE_SLOT) in the datum's tokens: the chunk's `expected_tokens`, which is what the
SDK's `ModelInput.length` counts. Here each image is
1. checked: format "png" or "jpeg" (and the bytes are that format), at most `max_bytes`
   encoded and `max_pixels` (width x height, read from the header before decoding), and
   decodable; every failure is a UserError naming the chunk;
2. decoded with PIL and preprocessed by the model's own image processor (its folder's
   preprocessor_config.json): resized to multiples of patch x merge within the processor's
   pixel range, normalised, cut into patches. `pixels` [patches, C * T * P * P] float32 and
   `grid` [3] = (t, h, w) in patches;
3. counted: it becomes h * w * t / merge^2 image tokens (the processor's own arithmetic), which
   must equal `expected_tokens` when the client gave it.
The model input the model sees (`expand`) is the text with each image's placeholder run
replaced by that many `image_token_id`s; the model scatters the image's features there.

Prepared images are kept in a small LRU keyed by a hash of (bytes, format), so the check at
submission and the pass on the worker thread decode each image once. Thread-safe.

Image features are computed one image at a time (`encode`), without autograd (the vision
tower is frozen: LoRA trains the language model only): an image's features then do not
depend on what else shares the pass, so packed passes stay exactly solo ones.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinsmith.types import IMAGE_SLOT, ImageIn, UserError

FORMATS = {"png": "PNG", "jpeg": "JPEG"}  # chunk format -> PIL's name for it
CACHE_IMAGES = 64  # prepared images kept (LRU)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class Prepared:
    """One decoded image: the model's patches, its patch grid and its token count."""

    pixels: torch.Tensor  # float32 [patches, C * T * P * P], on the host
    grid: torch.Tensor  # int64 [3]: (t, h, w) in patches
    tokens: int  # image tokens it becomes: t * h * w / merge^2
    size: tuple[int, int]  # (width, height) as sent


def is_vision_config(config) -> bool:
    """A composite vision-language config (has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


class Vision:
    """A vision-language model's image facts: processor, image token id, merge size, limits."""

    def __init__(self, model_dir: str | Path, config, limits: ImageLimits | None = None) -> None:
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = int(config.image_token_id)
        # Ids a text chunk may not hold: the model treats them as image/video placeholders.
        self.reserved = {self.image_token_id, int(getattr(config, "video_token_id", -2) or -2)}
        self.merge = int(config.vision_config.spatial_merge_size)
        self.limits = limits or ImageLimits()
        self._cache: OrderedDict[bytes, Prepared] = OrderedDict()
        self._lock = threading.Lock()

    def set_limits(self, max_bytes: int, max_pixels: int) -> Vision:
        """Apply the server's limits (config.py max_image_bytes / max_image_pixels); returns
        self. Images already prepared were within the old limits and stay cached."""
        self.limits = ImageLimits(int(max_bytes), int(max_pixels))
        return self

    # ----- one image ------------------------------------------------------------------
    def prepare(self, image: ImageIn, where: str) -> Prepared:
        """The image checked, decoded and preprocessed (UserError on any problem)."""
        key = hashlib.sha256(image.format.encode() + b"\0" + image.data).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        prepared = hit or self._decode(image, where)
        if image.expected_tokens is not None and image.expected_tokens != prepared.tokens:
            w, h = prepared.size
            raise UserError(
                f"{where}: the image ({w}x{h} pixels) becomes {prepared.tokens} tokens for this "
                f"model, but the chunk's expected_tokens is {image.expected_tokens}"
            )
        if hit is None:
            with self._lock:
                self._cache[key] = prepared
                while len(self._cache) > CACHE_IMAGES:
                    self._cache.popitem(last=False)
        return prepared

    def _decode(self, image: ImageIn, where: str) -> Prepared:
        from PIL import Image, UnidentifiedImageError

        pil_name = FORMATS.get(image.format)
        if pil_name is None:
            raise UserError(f"{where}: unknown image format {image.format!r}; "
                            f"supported: {', '.join(FORMATS)}")
        if len(image.data) > self.limits.max_bytes:
            raise UserError(f"{where}: the image is {len(image.data)} bytes; the limit is "
                            f"{self.limits.max_bytes} (max_image_bytes)")
        try:
            img = Image.open(io.BytesIO(image.data), formats=[pil_name])  # reads the header only
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{where}: the image is not a readable {image.format.upper()} "
                            f"file ({e.__class__.__name__})") from e
        w, h = img.size
        if w * h > self.limits.max_pixels:
            raise UserError(f"{where}: the image is {w}x{h} = {w * h} pixels; the limit is "
                            f"{self.limits.max_pixels} (max_image_pixels)")
        if w < 1 or h < 1:
            raise UserError(f"{where}: the image has no pixels ({w}x{h})")
        try:
            img.load()
            rgb = img.convert("RGB")
        except Exception as e:  # truncated or corrupt data: PIL raises OSError and others
            raise UserError(f"{where}: the {image.format.upper()} image data is corrupt: {e}") from e
        out = self.processor(images=[rgb], return_tensors="pt")
        grid = out["image_grid_thw"][0].to(torch.long)  # [3]
        tokens = int(grid.prod()) // self.merge**2
        return Prepared(out["pixel_values"].float(), grid, tokens, (w, h))

    # ----- a model input --------------------------------------------------------------
    def expand(
        self, tokens: np.ndarray, images: Sequence[ImageIn], where: str
    ) -> tuple[np.ndarray, list[Prepared]]:
        """Model token ids [N'] (each image's placeholder run replaced by its image tokens)
        and the prepared images in order. UserError if a text position holds a reserved id."""
        tokens = np.asarray(tokens, dtype=np.int64)
        text = np.ones(tokens.shape[0], dtype=bool)
        for im in images:
            text[im.at : im.at + im.length] = False
        reserved = np.isin(tokens, list(self.reserved)) & text
        if reserved.any():
            i = int(np.argmax(reserved))
            raise UserError(f"{where}: token id {int(tokens[i])} at position {i} is this model's "
                            "image placeholder; send images as image chunks")
        if not images:
            return tokens, []
        parts: list[np.ndarray] = []
        prepared: list[Prepared] = []
        start = 0
        for k, im in enumerate(images):
            if im.at < start or im.at + im.length > tokens.shape[0]:
                raise UserError(f"{where}: image chunk {k} is out of place")
            p = self.prepare(im, f"{where}, image chunk {k}")
            parts += [tokens[start : im.at], np.full(p.tokens, self.image_token_id, np.int64)]
            prepared.append(p)
            start = im.at + im.length
        parts.append(tokens[start:])
        return np.concatenate(parts), prepared

    # ----- the model's inputs -----------------------------------------------------------
    @torch.no_grad()
    def encode(self, model: torch.nn.Module, prepared: Sequence[Prepared]):
        """The vision tower's outputs for the images of a pass, in the order their tokens
        appear in the (row-major) batch, as the model's `mm_encoder_outputs["image"]`: one image
        at a time, so an image's features never depend on what else is in the pass.
        pooler_output: one [tokens, hidden] tensor per image; Qwen3-VL also gives deepstack
        features (per deepstack layer, one tensor per image), Qwen2.5-VL none."""
        body = model.model
        device = body.visual.patch_embed.proj.weight.device
        outs = [body.get_image_features(p.pixels.to(device), p.grid[None].to(device)) for p in prepared]
        pooled = tuple(t for o in outs for t in o.pooler_output)
        if getattr(outs[0], "deepstack_features", None) is None:  # Qwen2.5-VL
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return BaseModelOutputWithPooling(pooler_output=pooled)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            BaseModelOutputWithDeepstackFeatures,
        )

        layers = len(outs[0].deepstack_features)
        deep = [tuple(t for o in outs for t in o.deepstack_features[i]) for i in range(layers)]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=pooled, deepstack_features=deep)

    def positions(self, model: torch.nn.Module, ids: torch.Tensor,
                  prepared: Sequence[Prepared]) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimodal RoPE positions [3, B, T] of right-padded ids [B, T] (images in row-major
        order), and each row's delta [B] = (its next position) - (its length): the model's own
        get_rope_index, called here so no position state is left on the shared model."""
        grid = torch.stack([p.grid for p in prepared]).to(ids.device)  # [images, 3]
        kinds = (ids == self.image_token_id).to(torch.int32)  # 1 = image token, 0 = text
        pos, deltas = model.model.get_rope_index(ids, mm_token_type_ids=kinds, image_grid_thw=grid)
        return pos, deltas.reshape(-1)

    def model_inputs(self, model: torch.nn.Module, ids: torch.Tensor,
                     prepared: Sequence[Prepared]) -> tuple[dict[str, object], torch.Tensor]:
        """Extra keyword arguments of the model's forward for ids [B, T] holding `prepared`'s
        image tokens (the images' features and the RoPE positions), and each row's RoPE
        delta [B] (see `positions`)."""
        pos, deltas = self.positions(model, ids, prepared)
        return {"mm_encoder_outputs": {"image": self.encode(model, prepared)}, "position_ids": pos}, deltas


def model_length(tokens: np.ndarray, images: Sequence[ImageIn], vision: Vision | None) -> int:
    """Tokens the model sees for this input (images counted as they decode, when a vision
    model is given; as their placeholders otherwise)."""
    n = int(np.asarray(tokens).shape[0])
    if vision is None or not images:
        return n
    return n + sum(vision.prepare(im, "image").tokens - im.length for im in images)


def counted_length(tokens: np.ndarray, images: Sequence[ImageIn], vision: Vision | None) -> int:
    """A request's tokens for limits, packing and usage, counted at submission: as
    `model_length`, so an image sent without expected_tokens counts the tokens its decode
    gives (decoded once: `prepare` caches it for the checks and the pass). An image that
    fails its checks counts as its placeholders here; validation then refuses it, naming
    the chunk."""
    try:
        return model_length(tokens, images, vision)
    except UserError:
        return int(np.asarray(tokens).shape[0])


__all__ = ["IMAGE_SLOT", "ImageLimits", "Prepared", "Vision", "counted_length", "is_vision_config",
           "model_length"]
