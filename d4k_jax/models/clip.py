"""CLIP text encoder: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.

SD3 encodes prompts with CLIP-L and OpenCLIP bigG (both with projection), Flux with CLIP-L (pooled only).
Pre-LN transformer with causal self-attention; the pooled output is the final hidden state at the EOS
token; `text_projection` maps it to `text_embeds`. `clip_keys.py` holds the key map.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from d4k_jax.nn import Dense, LayerNorm, dot_product_attention, stack
from d4k_jax.nn.embeddings import embedding_table

_TOKENS = ("batch", None, "embed")  # a prompt is too short to shard over `sequence`

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (CLIP-L)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP bigG; transformers' "gelu" is the erf form
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set for CLIPTextModelWithProjection
    eos_token_id: int = 49407  # 2 (configs before transformers#24773): pool at argmax(input_ids) instead
    remat: str = "none"  # d4k_jax.nn.stack.REMAT_POLICIES

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, T, D], after final_layer_norm
    hidden_states: tuple[jax.Array, ...]  # embeddings, then every layer's output (before final_layer_norm)
    pooler_output: jax.Array  # [B, D], last_hidden_state at the EOS token
    text_embeds: jax.Array | None  # [B, P], text_projection(pooler_output); None without projection


class EncoderLayer(nn.Module):
    config: CLIPTextConfig  # or clip_vision.CLIPVisionConfig: the layer reads only the fields both share
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], mask [B, 1, T, T] (True = attend; None: all, the vision tower) -> (x, x): carry, output."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, d = x.shape
        n = cfg.num_attention_heads
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x)
        q, k, v = (Dense(d, axes=("embed", "heads"), name=f"{s}_proj", **kw)(h).reshape(b, t, n, d // n) for s in "qkv")
        attn = dot_product_attention(q, k, v, mask=mask).reshape(b, t, d)
        x = x + Dense(d, axes=("heads", "embed"), name="out_proj", **kw)(attn)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = ACTIVATIONS[cfg.hidden_act](Dense(cfg.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(h))
        x = nn.with_logical_constraint(x + Dense(d, axes=("mlp", "embed"), name="fc2", **kw)(h), _TOKENS)
        return x, x


class CLIPTextModel(nn.Module):
    """`apply(v, input_ids [B, T], attention_mask=None [B, T], 1 = token, 0 = padding) -> CLIPTextOutput`."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP takes at most {cfg.max_position_embeddings} tokens, got input_ids of shape {(b, t)}"
            )
        tokens = embedding_table(self, "token_embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        positions = embedding_table(
            self, "position_embedding", (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed")
        )
        x = (jnp.take(tokens, input_ids, axis=0) + positions[:t]).astype(self.dtype)  # [B, T, D]
        x = nn.with_logical_constraint(x, _TOKENS)

        mask = jnp.tril(jnp.ones((1, 1, t, t), bool))  # causal
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)  # and no padding key
        layers = stack(EncoderLayer, cfg.num_hidden_layers, remat=cfg.remat, num_broadcast=1)
        last, outputs = layers(cfg, name="layers", **kw)(x, mask)  # outputs [layers, B, T, D]
        hidden = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(last)

        # transformers pools at the first EOS token; legacy configs (eos_token_id 2) at the largest token id
        eos = input_ids.argmax(-1) if cfg.eos_token_id == 2 else (input_ids == cfg.eos_token_id).argmax(-1)
        pooled = hidden[jnp.arange(b), eos]  # [B, D]
        embeds = None
        if cfg.projection_dim is not None:
            proj = Dense(cfg.projection_dim, axes=("embed", None), use_bias=False, name="text_projection", **kw)
            embeds = proj(pooled)  # [B, P]
        return CLIPTextOutput(hidden, (x, *outputs), pooled, embeds)


# SD3's text encoders (CLIPTextModelWithProjection); Flux's CLIP-L is CLIP_L without projection.
CLIP_L = CLIPTextConfig(projection_dim=768)
CLIP_G = CLIPTextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
