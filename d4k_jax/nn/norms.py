"""Normalisation layers with logical axis names and torch-identical statistics.

Statistics are computed in float32 (float64 for float64 inputs: `stats_dtype`), whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def stats_dtype(x: jax.Array) -> jnp.dtype:
    """float32, or float64 for float64 inputs: never less precise than float32, never less than the input."""
    return jnp.promote_types(x.dtype, jnp.float32)


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
    return y * scale.astype(y.dtype) + bias.astype(y.dtype)


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels are not divisible into {num_groups} groups")
    return x.astype(stats_dtype(x)).reshape(*x.shape[:-1], num_groups, c // num_groups)


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


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis (biased variance), statistics in float32.

    use_scale/use_bias=False gives the affine-free LayerNorm of Flux / SD3 AdaLN blocks.
    """

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str = "embed"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        xf = x.astype(stats_dtype(x))
        mean = xf.mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + self.epsilon)
        init = lambda f: nn.with_logical_partitioning(f, (self.axis_name,))
        if self.use_scale:
            y = y * self.param("scale", init(nn.initializers.ones_init()), (d,), self.param_dtype).astype(xf.dtype)
        if self.use_bias:
            y = y + self.param("bias", init(nn.initializers.zeros_init()), (d,), self.param_dtype).astype(xf.dtype)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) * scale over the last axis, in float32 (T5 LayerNorm, Flux/SD3 qk-norm)."""

    epsilon: float = 1e-6
    axis_name: str = "embed"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(stats_dtype(x))
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.epsilon)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return (y * scale.astype(xf.dtype)).astype(self.dtype)
