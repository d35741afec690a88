"""Dense layer with logical axis names on its parameters."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dense(nn.Module):
    """y = x W + b over the last axis. `axes` names the kernel's (in, out) logical axes."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[1:]),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
