"""Dense layer with logical axis names on its parameters."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dense(nn.Module):
    """y = x W + b over the last axis. `axes` names the kernel's (in, out) logical axes.

    `weights(in_features)` declares and returns the parameters alone: a caller that fuses several Dense layers'
    matmuls into one (nn.joint_attention under fused_qkv) reads them there, so the parameter tree (names,
    shapes, logical axes) is the same whichever way the layer is computed.
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def weights(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        """kernel [in_features, features] and bias [features] (None without a bias), in param_dtype."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
            (in_features, self.features),
            self.param_dtype,
        )
        if not self.use_bias:
            return kernel, None
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[1:]),
            (self.features,),
            self.param_dtype,
        )
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.weights(x.shape[-1])
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        return y if bias is None else y + bias.astype(self.dtype)
