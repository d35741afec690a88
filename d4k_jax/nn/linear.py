"""Dense layer with logical axis names on its parameters, and its optional low-rank (LoRA) adapter term.

Adapters are a separate variable collection, "lora", that `Dense` reads when it is given: per adapted layer
{"down": [in, r], "up": [r, out], "scale": []} (inside nn.scan each with the leading layer axis), and then
y = x W + b + scale * ((dropout(x) @ down) @ up), peft's order (dropout on the adapter's input only), in the
layer's compute dtype. Without a "lora" collection the program is exactly the plain layer's. Inside
nn.fp8.matmuls() (the models' `fp8` option, sampling), x W is an FP8 matmul; the adapter term is not. The model-level
side (which layers, initialisation, shardings, files) is d4k_jax/lora.py.

The adapter dropout rate is a trace-time setting, as nn.logical_axis_rules is: `with lora_dropout(rate):`
around the apply (with a "dropout" rng), so that no module field or config of the models changes for it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn import fp8

LORA = "lora"  # the adapters' variable collection
_DROPOUT = contextvars.ContextVar("lora_dropout", default=0.0)


@contextlib.contextmanager
def lora_dropout(rate: float) -> Iterator[None]:
    """Dropout at `rate` on every adapter's input while tracing inside the block (apply with rngs={"dropout": key});
    0 (the default, and at sampling): none."""
    if not 0 <= rate < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {rate}")
    token = _DROPOUT.set(float(rate))
    try:
        yield
    finally:
        _DROPOUT.reset(token)


class Dense(nn.Module):
    """y = x W + b over the last axis. `axes` names the kernel's (in, out) logical axes.

    `weights(in_features)` declares and returns the parameters alone: a caller that fuses several Dense layers'
    matmuls into one (nn.joint_attention under fused_qkv) reads them there, so the parameter tree (names,
    shapes, logical axes) is the same whichever way the layer is computed; it adds `adapter(x)` to its slice.
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

    def adapter(self, x: jax.Array) -> jax.Array | None:
        """scale * ((dropout(x) @ down) @ up) [..., features] in the compute dtype, or None: no adapter here."""
        if not self.has_variable(LORA, "down"):
            return None
        down, up, scale = (self.get_variable(LORA, n) for n in ("down", "up", "scale"))
        x = x.astype(self.dtype)
        rate = _DROPOUT.get()
        if rate:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - rate, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1 - rate, self.dtype), jnp.zeros((), self.dtype))
        h = jnp.einsum("...i,ir->...r", x, down.astype(self.dtype))
        return jnp.einsum("...r,ro->...o", h, up.astype(self.dtype)) * scale.astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.weights(x.shape[-1])
        h, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = fp8.matmul(h, kernel) if fp8.applies(h) else jnp.einsum("...i,io->...o", h, kernel)
        y = y if bias is None else y + bias.astype(self.dtype)
        low_rank = self.adapter(x)
        return y if low_rank is None else y + low_rank
