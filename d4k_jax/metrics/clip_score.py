"""CLIPScore as the reference evaluates it: torchmetrics' `clip_score` with openai/clip-vit-base-patch16.

Per image: max(100 * cos(image_embeds, text_embeds), 0), both from transformers' CLIPModel
(`get_image_features`, `get_text_features`). Images go through CLIPImageProcessor (PIL bicubic resize of the
shorter edge, centre crop, x / 255, the folder's mean/std); captions through its tokenizer, then cut to the
first `max_position_embeddings` (77) ids as torchmetrics cuts them, so a longer caption loses its end token.
The reference calls the metric once per image; the mean over images is the paper's CLIPScore.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from d4k_jax.io.clip_model import CLIPParts, load_clip
from d4k_jax.metrics import weights

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Images = np.ndarray | Sequence[np.ndarray | Image.Image]  # uint8 [B, H, W, 3], or one image (PIL / uint8) each


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """CLIP image preprocessing: resize the shorter edge to `size` (PIL bicubic; the longer edge is truncated
    as torchvision's Resize truncates it), centre crop `crop`, rescale by 1/255, normalise with mean/std.

    `rounding` places the crop: "floor" as transformers' CLIPImageProcessor, "round" as torchvision's
    CenterCrop (OpenAI's `clip.load` preprocess); they differ by a pixel when the margin is odd.
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    rounding: str = "floor"

    def __post_init__(self):
        if self.rounding not in ("floor", "round") or self.crop > self.size:
            raise ValueError(f"CLIP preprocessing: rounding must be 'floor' or 'round' and crop <= size, got {self}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, image_size: int) -> Preprocess:
        """The folder's preprocessor_config.json (old int sizes or new dicts); OpenAI's defaults without one."""
        file = Path(folder) / "preprocessor_config.json"
        if not file.is_file():
            return cls(image_size, image_size)
        cfg = json.loads(file.read_text())
        off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if not cfg.get(k, True)]
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        size = size if isinstance(size, int) else size.get("shortest_edge")
        crop = crop if isinstance(crop, int) else (crop["height"] if crop["height"] == crop["width"] else None)
        if off or cfg.get("resample", 3) != Image.Resampling.BICUBIC or size is None or crop != image_size:
            raise ValueError(
                f"{file}: unsupported CLIP preprocessing (needs every step on, resample 3 = bicubic, a shortest_edge "
                f"size and a square crop of the model's {image_size}): {cfg}"
            )
        return cls(size, crop, tuple(cfg["image_mean"]), tuple(cfg["image_std"]), cfg.get("rescale_factor", 1 / 255))

    def __call__(self, images: Images) -> np.ndarray:
        """-> float32 [B, crop, crop, 3], computed as CLIPImageProcessor does (float64 rescale, float32 normalise)."""
        return np.stack([self.one(im) for im in as_pil(images)])

    def one(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.size * long / short)  # torchvision / transformers: truncated, not rounded
        new = (self.size, new_long) if w <= h else (new_long, self.size)
        x = np.asarray(image.resize(new, Image.Resampling.BICUBIC))  # [H, W, 3] uint8
        if self.rounding == "floor":
            top, left = (x.shape[0] - self.crop) // 2, (x.shape[1] - self.crop) // 2
        else:
            top, left = (round((n - self.crop) / 2.0) for n in x.shape[:2])  # torchvision: int(round(.)), half to even
        x = x[top : top + self.crop, left : left + self.crop]
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def as_pil(images: Images) -> list[Image.Image]:
    """RGB PIL images from a uint8 [B, H, W, 3] array or a sequence of PIL images / uint8 [H, W, 3] arrays."""
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))  # CLIPImageProcessor's do_convert_rgb
            continue
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"CLIP metrics take uint8 RGB images [H, W, 3] or PIL images, got {im.dtype} {im.shape}")
        out.append(Image.fromarray(im))
    if not out:
        raise ValueError("no images")
    return out


def batched(fn: Callable[..., Any], arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """fn over chunks of at most `batch_size` rows, the last padded by repeating its final row so that a
    jitted fn compiles once per call size; the padding's results are dropped."""
    n = len(arrays[0])
    size = min(n, batch_size)
    out = []
    for i in range(0, n, size):
        chunk = [a[i : i + size] for a in arrays]
        k = len(chunk[0])
        chunk = [np.concatenate([c, np.repeat(c[-1:], size - k, axis=0)]) for c in chunk]
        out.append(np.asarray(fn(*chunk))[:k])
    return np.concatenate(out)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScore:
    """`scores(images, captions) -> [B]`; `image_features` / `text_features` as CLIPModel's get_*_features."""

    def __init__(self, parts: CLIPParts, preprocess: Preprocess, batch_size: int = 32):
        self.parts, self.preprocess, self.batch_size = parts, preprocess, batch_size
        text, vision = parts.text_module, parts.vision_module
        self.max_length = text.config.max_position_embeddings
        self._image = jax.jit(lambda p, x: vision.apply({"params": p}, x).image_embeds)
        self._text = jax.jit(lambda p, ids, mask: text.apply({"params": p}, ids, mask).text_embeds)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | None, *, dtype: Any = jnp.float32, batch_size: int = 32
    ) -> CLIPScore:
        """A transformers CLIPModel folder (openai/clip-vit-base-patch16); MissingWeights if it is not there."""
        what = "a CLIP ViT-B/16 folder (transformers CLIPModel: config.json, model.safetensors, tokenizer)"
        folder = require_clip_folder(path, what, "--clip")
        parts = load_clip(folder, dtype=dtype)
        return cls(parts, Preprocess.from_folder(folder, parts.vision_module.config.image_size), batch_size)

    def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 [B, max_length]: torchmetrics' ids, cut to max_length, padded."""
        tok = self.parts.tokenizer.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = np.full((len(captions), self.max_length), pad, np.int32)
        mask = np.zeros_like(ids)
        for i, (caption, full) in enumerate(zip(captions, tok(list(captions)).input_ids, strict=True)):
            if len(full) > self.max_length:
                logging.warning(
                    "CLIPScore: caption cut to %d tokens (as torchmetrics): %r", self.max_length, caption[:80]
                )
            n = min(len(full), self.max_length)
            ids[i, :n], mask[i, :n] = full[:n], 1
        return ids, mask

    def image_features(self, images: Images) -> np.ndarray:
        """Unnormalised image embeddings [B, P] (transformers' get_image_features)."""
        pixels = self.preprocess(images)
        return batched(lambda x: self._image(self.parts.vision_params, x), [pixels], self.batch_size)

    def text_features(self, captions: Sequence[str]) -> np.ndarray:
        """Unnormalised text embeddings [B, P] (transformers' get_text_features)."""
        ids, mask = self.tokenize(captions)
        return batched(lambda i, m: self._text(self.parts.text_params, i, m), [ids, mask], self.batch_size)

    def scores(self, images: Images, captions: Sequence[str]) -> np.ndarray:
        """max(100 cos(image, caption), 0) per pair, float64 [B]; the paper reports the mean."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if len(images) != len(captions):
            raise ValueError(
                f"CLIPScore needs one caption per image, got {len(images)} images, {len(captions)} captions"
            )
        cos = (l2_normalise(self.image_features(images)) * l2_normalise(self.text_features(captions))).sum(-1)
        return np.maximum(100 * cos, 0)


def require_clip_folder(path: str | os.PathLike | None, what: str, flag: str) -> Path:
    """`weights.require`, then that the folder holds config.json and weights: else MissingWeights naming them."""
    folder = weights.require(path, what, flag)
    if not folder.is_dir():
        raise weights.MissingWeights(f"{what}: {str(folder)!r} is not a folder (set {flag})")
    for name, globs in (("config.json", ("config.json",)), ("model.safetensors", ("*.safetensors", "*.bin"))):
        if not any(any(folder.glob(g)) for g in globs):
            raise weights.MissingWeights(f"{what}: no {name} in {str(folder)!r} (set {flag})")
    return folder
