"""T5 encoder: transformers' `T5EncoderModel` (T5 v1.1 / T5-XXL, the long-prompt encoder of SD3 and Flux).

Pre-RMSNorm blocks without biases; attention is unscaled and carries a learned relative position bias,
computed once from layer 0's table and shared by every layer. Under half-precision compute the FFN
output projection `wo` and the residual stream stay float32: transformers keeps `wo` in float32 for fp16
(`_keep_in_fp32_modules`; T5-XXL's FFN outputs overflow fp16), which makes its residual stream float32;
here bf16 gets the same, so bf16 outputs are closer to float32 than transformers' own bf16 ones.
`t5_keys.py` holds the key map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.nn import Dense, RMSNorm, dot_product_attention, stack
from d4k_jax.nn.embeddings import embedding_table

_TOKENS = ("batch", None, "embed")

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1 ("gated-gelu"): the tanh form
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,  # original T5
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True  # wi_0, wi_1 -> act(wi_0 x) * wi_1 x; else wi -> act(wi x)
    remat: str = "none"  # d4k_jax.nn.stack.REMAT_POLICIES

    def __post_init__(self):
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 activation must be one of {sorted(ACTIVATIONS)}, got {self.dense_act_fn!r}")


@flax.struct.dataclass
class T5EncoderOutput:
    last_hidden_state: jax.Array  # [B, T, D]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of (key - query) for every [query, key] pair of a bidirectional encoder, [T, T] int32.

    Half the buckets per direction are exact distances, the rest log-spaced up to max_distance; float32
    arithmetic in transformers' order, so that distances on a bucket boundary land where they do there.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [T, T]
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    log_range = np.float32(math.log(max_distance / max_exact))
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / max_exact) / log_range
    large = np.minimum(max_exact + (log_ratio * (half - max_exact)).astype(np.int64), half - 1)
    return ((rel > 0) * half + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5Block(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, None]:
        """x [B, T, D] float32, bias [1, N, T, T], mask [B, 1, 1, T] (True = attend) or None -> (x, None)."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        n, k = cfg.num_heads, cfg.d_kv
        dense = lambda f, axes, name, **o: Dense(f, axes=axes, use_bias=False, name=name, **(kw | o))

        h = RMSNorm(cfg.layer_norm_epsilon, name="attn_norm", **kw)(x)
        q, kk, v = (dense(n * k, ("embed", "heads"), s)(h).reshape(b, t, n, k) for s in "qkv")
        attn = dot_product_attention(q, kk, v, bias=bias, mask=mask, scale=1.0).reshape(b, t, n * k)
        x = x + dense(cfg.d_model, ("heads", "embed"), "o")(attn)

        h = RMSNorm(cfg.layer_norm_epsilon, name="ffn_norm", **kw)(x)
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), "wi_0")(h)) * dense(cfg.d_ff, ("embed", "mlp"), "wi_1")(h)
        else:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), "wi")(h))
        # float32, as transformers' fp16 `wo`: T5-XXL's FFN outputs exceed fp16 and lose digits in bf16
        x = x + dense(cfg.d_model, ("mlp", "embed"), "wo", dtype=jnp.float32)(h)
        return nn.with_logical_constraint(x, _TOKENS), None


class T5EncoderModel(nn.Module):
    """`apply(v, input_ids [B, T], attention_mask=None [B, T], 1 = token, 0 = padding) -> T5EncoderOutput`."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> T5EncoderOutput:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = input_ids.shape[1]
        shared = embedding_table(self, "shared", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        x = nn.with_logical_constraint(jnp.take(shared, input_ids, axis=0).astype(jnp.float32), _TOKENS)  # [B, T, D]

        rel = embedding_table(
            self, "relative_attention_bias", (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads")
        )
        buckets = relative_position_buckets(t, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        bias = jnp.take(rel, buckets, axis=0).astype(jnp.float32).transpose(2, 0, 1)[None]  # [1, N, T, T]
        mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, T]

        blocks = stack(T5Block, cfg.num_layers, remat=cfg.remat, num_broadcast=2)
        x, _ = blocks(cfg, name="block", **kw)(x, bias, mask)
        return T5EncoderOutput(RMSNorm(cfg.layer_norm_epsilon, name="final_layer_norm", **kw)(x))


# google/t5-v1_1-xxl's encoder, as in SD3 (text_encoder_3) and FLUX.1 (text_encoder_2).
T5_XXL = T5Config()
