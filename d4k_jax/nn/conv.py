"""2D convolution over NHWC with torch's padding semantics, and nearest-2x-upsample-then-conv fused."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# For output phase a (row parity in the upsampled image), which low-resolution row offset (-1, 0, +1)
# each 3x3 kernel tap reads after nearest 2x upsampling: P[a][offset, tap].
_PHASE_TAPS = np.array(
    [
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]],  # even output rows: tap -1 -> row i-1, taps 0, +1 -> row i
        [[0, 0, 0], [1, 1, 0], [0, 0, 1]],  # odd output rows: taps -1, 0 -> row i, tap +1 -> row i+1
    ],
    np.float32,
)


class Conv2d(nn.Module):
    """torch.nn.Conv2d(k, stride, padding) on NHWC with an HWIO kernel.

    `padding` is torch's symmetric padding or explicit ((top, bottom), (left, right)).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 1
    axes: tuple[str | None, ...] = (None, None, "conv_in", "conv_out")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, upsample: bool = False) -> jax.Array:
        """x [B, H, W, C] -> [B, H', W', features].

        upsample=True computes conv(nearest_upsample_2x(x)) without the 4x larger upsampled input:
        each of the four output phases is a 3x3 conv of x with taps summed per source pixel, so the
        result is a conv with 4 * features outputs followed by depth-to-space.
        """
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
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        x = x.astype(self.dtype)
        if not upsample:
            return _conv(x, kernel.astype(self.dtype), self.stride, pad) + bias.astype(self.dtype)
        if (k, self.stride, pad) != (3, 1, ((1, 1), (1, 1))):
            raise ValueError("upsample=True supports the 3x3, stride 1, padding 1 convolution only")
        taps = jnp.asarray(_PHASE_TAPS)
        # phase kernels [a, b, 3, 3, I, O]: sum of the original taps landing on each source pixel
        phases = jnp.einsum("apu,bqv,uvio->abpqio", taps, taps, kernel.astype(jnp.float32))
        b, h, w, _ = x.shape
        f = self.features
        fused = phases.transpose(2, 3, 4, 0, 1, 5).reshape(3, 3, -1, 4 * f).astype(self.dtype)
        y = _conv(x, fused, 1, pad).reshape(b, h, w, 2, 2, f)  # [B, H, W, a, b, O]
        y = y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, f)
        return y + bias.astype(self.dtype)


def _conv(x, kernel, stride, pad):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
