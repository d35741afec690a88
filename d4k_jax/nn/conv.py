"""2D convolution over NHWC with torch's padding semantics, and nearest-2x-upsample-then-conv fused."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Padding = tuple[tuple[int, int], tuple[int, int]]

# For output phase a (row parity in the upsampled image), which low-resolution row offset (-1, 0, +1)
# each 3x3 kernel tap reads after nearest 2x upsampling: P[a][offset, tap].
_PHASE_TAPS = np.array(
    [
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]],  # even output rows: tap -1 -> row i-1, taps 0, +1 -> row i
        [[0, 0, 0], [1, 1, 0], [0, 0, 1]],  # odd output rows: taps -1, 0 -> row i, tap +1 -> row i+1
    ],
    np.float32,
)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    stride: int = 1,
    padding: Padding = ((1, 1), (1, 1)),
    upsample: bool = False,
) -> jax.Array:
    """x [B, H, W, I], kernel [k, k, I, O] -> [B, H', W', O], computed in x's dtype.

    upsample=True gives conv(nearest_upsample_2x(x)) for a 3x3 stride-1 kernel, with `padding` counted
    in rows/columns of x, without building the 4x larger upsampled input: each of the four output
    phases is a 3x3 conv of x whose taps are summed per source pixel, so it is one conv with 4 * O
    outputs followed by depth-to-space.
    """
    dtype = x.dtype
    if not upsample:
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(dtype), (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias.astype(dtype)
    if kernel.shape[:2] != (3, 3) or stride != 1:
        raise ValueError(f"upsample=True needs a 3x3 stride-1 kernel, got {kernel.shape[:2]} stride {stride}")
    taps = jnp.asarray(_PHASE_TAPS)
    phases = jnp.einsum("apu,bqv,uvio->pqiabo", taps, taps, kernel.astype(jnp.float32))  # [3, 3, I, a, b, O]
    o = kernel.shape[-1]
    fused = phases.reshape(3, 3, kernel.shape[2], 4 * o).astype(dtype)
    y = jax.lax.conv_general_dilated(x, fused, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)
    return y + bias.astype(dtype)


class Conv2d(nn.Module):
    """torch.nn.Conv2d(k, stride, padding) on NHWC with an HWIO kernel.

    `padding` is torch's symmetric padding or explicit ((top, bottom), (left, right)).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | Padding = 1
    axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, upsample: bool = False) -> jax.Array:
        """x [B, H, W, C] -> [B, H', W', features]; upsample=True: conv of the nearest-2x-upsampled x."""
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[-1:]),
            (self.features,),
            self.param_dtype,
        )
        pad = ((self.padding,) * 2,) * 2 if isinstance(self.padding, int) else self.padding
        return conv2d(x.astype(self.dtype), kernel, bias, stride=self.stride, padding=pad, upsample=upsample)
