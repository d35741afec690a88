"""LAION improved aesthetic predictor, as Diffusion-4K's generate_and_eval_fid.py scores each image.

score = MLP(e / |e|), e = CLIP ViT-L/14 `encode_image` of OpenAI's `clip.load` preprocess (shorter side
to 224 bicubic, torchvision centre crop, OpenAI mean/std); the MLP is 768-1024-128-64-16-1 Linear layers
with no activations (dropout is off at evaluation). The reference runs `clip.load(..., device="cuda")`, an
fp16 model; this runs the transformers CLIPModel weights of the same network in `dtype` (fp32 default).
Weights are the user's: the head file and a transformers CLIPModel folder (openai/clip-vit-large-patch14).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.io.clip_model import load_clip
from d4k_jax.io.metric_nets import load_aesthetic_head
from d4k_jax.metrics import weights
from d4k_jax.metrics.clip_score import Images, Preprocess, batched, require_clip_folder
from d4k_jax.models.clip_vision import CLIPVisionModel

Head = list[tuple[jax.Array, jax.Array]]  # (kernel [in, out], bias [out]) per Linear layer


def head_apply(head: Head, x: jax.Array) -> jax.Array:
    """[B, 768] -> [B]: the Linear layers in order, nothing between them."""
    for kernel, bias in head:
        x = jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST) + bias  # fp32 as the reference, not TF32
    return x[:, 0]


class Aesthetics:
    """`scores(images) -> [B]` aesthetic ratings (about 1..10; the paper reports the mean)."""

    def __init__(self, head: Head, vision_module: CLIPVisionModel, vision_params: dict, batch_size: int = 32):
        self.head, self.vision_params, self.batch_size = head, vision_params, batch_size
        size = vision_module.config.image_size
        self.preprocess = Preprocess(size, size, rounding="round")  # torchvision Resize + CenterCrop, OpenAI mean/std

        def score(head: Head, params: Any, pixels: jax.Array) -> jax.Array:
            e = vision_module.apply({"params": params}, pixels).image_embeds.astype(jnp.float32)  # [B, 768]
            norm = jnp.linalg.norm(e, axis=-1, keepdims=True)
            return head_apply(head, e / jnp.where(norm == 0, 1, norm))  # the reference's `normalized`: 0 -> 1

        self._score = jax.jit(score)

    @classmethod
    def from_files(
        cls,
        head: str | os.PathLike | None,
        clip: str | os.PathLike | None,
        *,
        dtype: Any = jnp.float32,
        batch_size: int = 32,
    ) -> Aesthetics:
        """The head (`sac+logos+ava1-l14-linearMSE.pth` as safetensors: `python -m conversion.pickled`) and a CLIP
        ViT-L/14 CLIPModel folder."""
        head_file = weights.require(
            head, "the LAION aesthetic predictor head (sac+logos+ava1-l14-linearMSE.pth)", "--aesthetic_head"
        )
        what = "a CLIP ViT-L/14 folder (transformers CLIPModel: config.json, model.safetensors)"
        folder = require_clip_folder(clip, what, "--aesthetic_clip")
        parts = load_clip(folder, text=False, dtype=dtype)
        layers = [(jnp.asarray(k), jnp.asarray(b)) for k, b in load_aesthetic_head(head_file)]
        if parts.vision_module.config.projection_dim != layers[0][0].shape[0]:
            raise ValueError(
                f"{folder}: image embeddings of width {parts.vision_module.config.projection_dim}, the aesthetic head "
                f"takes {layers[0][0].shape[0]} (CLIP ViT-L/14)"
            )
        return cls(layers, parts.vision_module, parts.vision_params, batch_size)

    def scores(self, images: Images) -> np.ndarray:
        """uint8 [B, H, W, 3] (or PIL / uint8 images of any sizes) -> float32 [B]."""
        pixels = self.preprocess(images)
        return batched(lambda x: self._score(self.head, self.vision_params, x), [pixels], self.batch_size)
