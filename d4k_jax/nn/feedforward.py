"""diffusers' FeedForward(activation_fn="gelu-approximate"): net.0.proj -> tanh GELU -> net.2."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn.linear import Dense


class _GELUProj(nn.Module):  # diffusers' GELU activation module: a projection, then the activation
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.features, axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        return nn.gelu(h, approximate=True)


class FeedForward(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, D]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _GELUProj(self.hidden, name="net_0", **kw)(x)
        return Dense(x.shape[-1], axes=("mlp", "embed"), name="net_2", **kw)(h)
