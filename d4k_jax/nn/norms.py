"""Normalisation layers with logical axis names and torch-identical statistics."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC: statistics per (sample, group) over H, W and the group's channels.

    Statistics are computed in float32 with the two-pass variance (E[(x - mean)²]) as torch does;
    the one-pass E[x²] - E[x]² loses digits on activations with a large mean.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    axis_name: str = "channels"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (c,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
            (c,),
            self.param_dtype,
        )
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, g.ndim - 2), g.ndim - 1)  # H, W and the channels of a group
        mean = g.mean(axes, keepdims=True)
        var = jnp.square(g - mean).mean(axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
