"""Normalisation layers with logical axis names and torch-identical statistics."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_stats(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """Per (sample, group) mean and variance of x [B, ..., C] over every axis but B, in float32.

    Two-pass variance (E[(x - mean)²]) as torch computes it; E[x²] - E[x]² loses digits when the
    mean is large.
    """
    g = _grouped(x, num_groups)
    axes = (*range(1, g.ndim - 2), g.ndim - 1)  # the spatial axes and the channels of a group
    mean = g.mean(axes, keepdims=True)
    var = jnp.square(g - mean).mean(axes, keepdims=True)
    return mean, var


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float,
    stats: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """GroupNorm of x [B, ..., C] in float32; `stats` from `group_stats` (of the whole image when x
    is one band of it) replace the statistics of x itself."""
    mean, var = group_stats(x, num_groups) if stats is None else stats
    y = ((_grouped(x, num_groups) - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
    return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels are not divisible into {num_groups} groups")
    return x.astype(jnp.float32).reshape(*x.shape[:-1], num_groups, c // num_groups)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC: statistics per (sample, group) over H, W and the group's channels."""

    num_groups: int = 32
    epsilon: float = 1e-6
    axis_name: str = "channels"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        init = lambda f: nn.with_logical_partitioning(f, (self.axis_name,))
        scale = self.param("scale", init(nn.initializers.ones_init()), (c,), self.param_dtype)
        bias = self.param("bias", init(nn.initializers.zeros_init()), (c,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)
