"""CLIP vision tower (ViT): transformers' `CLIPVisionModel(WithProjection)` and the image half of `CLIPModel`.

Non-overlapping patches -> class token + patch tokens + learned positions -> pre_layrnorm -> the text
encoder's pre-LN layers (`d4k_jax.models.clip.EncoderLayer`, without a mask) -> post_layernorm of the class
token -> `visual_projection`. The CLIPScore and LAION aesthetics metrics read `image_embeds`.
`clip_vision_keys.py` holds the key map.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from d4k_jax.models.clip import ACTIVATIONS, EncoderLayer
from d4k_jax.nn import Dense, LayerNorm, stack
from d4k_jax.nn.embeddings import embedding_table

_TOKENS = ("batch", None, "embed")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    # EncoderLayer reads hidden_act, intermediate_size, num_attention_heads and layer_norm_eps, as the text config's
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512  # None: CLIPVisionModel (no visual_projection)
    remat: str = "none"  # d4k_jax.nn.stack.REMAT_POLICIES

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + L, D], the encoder output (class token first), before post_layernorm
    pooler_output: jax.Array  # [B, D], post_layernorm(class token)
    image_embeds: jax.Array | None  # [B, P], visual_projection(pooler_output); None without projection


class CLIPVisionModel(nn.Module):
    """`apply(v, pixel_values [B, S, S, C]) -> CLIPVisionOutput`; pixels normalised as CLIPImageProcessor does."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = pixel_values.shape
        s, p, d = cfg.image_size, cfg.patch_size, cfg.hidden_size
        if (h, w, c) != (s, s, cfg.num_channels):
            raise ValueError(
                f"CLIP vision takes pixel_values [B, {s}, {s}, {cfg.num_channels}], got {pixel_values.shape}"
            )
        # the stride-p, bias-free patch conv as one matmul over each patch's (row, column, channel) block
        kernel = self.param(
            "patch_embedding",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            (p, p, c, d),
            self.param_dtype,
        )
        patches = pixel_values.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel.astype(self.dtype)).reshape(b, -1, d)  # [B, L, D]
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
            (d,),
            self.param_dtype,
        )
        positions = embedding_table(self, "position_embedding", (cfg.num_patches + 1, d), (None, "embed"))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)  # [B, 1 + L, D]
        x = nn.with_logical_constraint(x + positions.astype(self.dtype), _TOKENS)
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # sic: transformers' name

        layers = stack(EncoderLayer, cfg.num_hidden_layers, remat=cfg.remat, num_broadcast=1)
        last, _ = layers(cfg, name="layers", **kw)(x, None)  # no mask: every token sees every token
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(last[:, 0])  # [B, D]
        embeds = None
        if cfg.projection_dim is not None:
            proj = Dense(cfg.projection_dim, axes=("embed", None), use_bias=False, name="visual_projection", **kw)
            embeds = proj(pooled)  # [B, P]
        return CLIPVisionOutput(last, pooled, embeds)


# The towers the metrics use: CLIPScore's ViT-B/16 (openai/clip-vit-base-patch16) and the aesthetic
# predictor's ViT-L/14 (openai/clip-vit-large-patch14).
VIT_B_16 = CLIPVisionConfig()
VIT_L_14 = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
)
