"""Timestep and conditioning embeddings shared by Flux and SD3 (diffusers' embeddings.py semantics)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.nn.linear import Dense


def embedding_table(
    module: nn.Module, name: str, shape: tuple[int, int], axes: tuple[str | None, str | None]
) -> jax.Array:
    """An embedding table parameter of `module` (torch nn.Embedding's weight, same layout)."""
    return module.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(0.02), axes), shape, module.param_dtype
    )


def timestep_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of t [B] -> [B, dim] in float32 (diffusers' get_timestep_embedding), or in
    float64 for a float64 t (a float64 run is compared with a float64 reference; diffusers itself stays float32).

    sin(t f) at t ~ 1000 (x1000 timesteps, guidance 3500) turns one ulp of f into ~1e-4, so the float32
    frequencies are a constant: diffusers' float32 exponents, exponentiated in float64 and rounded once
    (correctly rounded; torch's own float32 exp is off by an ulp for 2 of 128 frequencies on an AVX-512
    CPU, XLA's for 17, and which ones depends on the instruction set).
    """
    half = dim // 2
    if jnp.promote_types(t.dtype, jnp.float32) == jnp.float64:
        exponent = -math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift)
        args = t[:, None] * jnp.asarray(np.exp(exponent))[None]
    else:
        exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
        freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
        args = t.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2: diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act="silu")."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, C] -> [B, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.features, axes=(None, "mlp"), name="linear_1", **kw)(x)
        return Dense(self.features, axes=("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))


class AdaLN(nn.Module):
    """silu(emb) -> linear -> `chunks` modulation vectors [B, 1, features] (the adaLN linear of
    diffusers' AdaLayerNormZero / AdaLayerNormZeroSingle / AdaLayerNormContinuous)."""

    chunks: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> list[jax.Array]:
        mod = Dense(
            self.chunks * self.features,
            axes=("embed", "mlp"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="linear",
        )(nn.silu(emb))
        return jnp.split(mod[:, None, :], self.chunks, axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class TimeTextEmbed(nn.Module):
    """diffusers' CombinedTimestep(Guidance)TextProjEmbeddings: MLP(sincos(t)) [+ MLP(sincos(g))] + MLP(pooled)."""

    features: int
    guidance: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # the sinusoid is float32; diffusers casts it to the text embedding's dtype before the MLP
        emb = MLPEmbedder(self.features, name="timestep_embedder", **kw)(
            timestep_embedding(timestep, 256).astype(pooled.dtype)
        )
        if self.guidance:
            emb = emb + MLPEmbedder(self.features, name="guidance_embedder", **kw)(
                timestep_embedding(guidance, 256).astype(pooled.dtype)
            )
        return emb + MLPEmbedder(self.features, name="text_embedder", **kw)(pooled)
