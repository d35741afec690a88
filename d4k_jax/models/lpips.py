"""LPIPS v0.1 (Zhang et al. 2018) as the `lpips` package computes it: `lpips.LPIPS(net, version="0.1")`.

distance(x0, x1) = sum over taps l of mean_HW( sum_C w_l * (n(f_l(x0)) - n(f_l(x1)))^2 ), where f_l are
ReLU outputs of an ImageNet backbone (torchvision VGG16 or AlexNet `features`) on ScalingLayer-shifted
inputs, n() is lpips' `normalize_tensor` (unit length over channels) and w_l the learned 1x1 heads
(NetLinLayer: no bias; its dropout is off at evaluation). NHWC throughout.

Parameter names follow torchvision's indices, so the key map in `lpips_keys.py` is a naming rule:
`features.{i}.weight` <-> features/conv{i}/kernel, `lin{l}.model.1.weight` <-> lin{l}/kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn import Conv2d, Dense

_ACT = ("batch", "height", "width", "channels")
# lpips' ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor


def _vgg16() -> tuple[tuple, ...]:
    ops: list[tuple] = []
    for widths in ((64,) * 2, (128,) * 2, (256,) * 3, (512,) * 3, (512,) * 3):  # torchvision cfg "D"
        ops += [("conv", w, 3, 1, 1) for w in widths] + [("tap",), ("pool", 2, 2)]
    return tuple(ops[:-1])  # lpips stops at relu5_3: the last MaxPool is never used


# The `features` Sequential as ops: ("conv", out channels, kernel, stride, padding) = Conv2d + ReLU (two
# torchvision indices), ("pool", kernel, stride) = MaxPool2d (one index), ("tap",) = an LPIPS layer output.
# fmt: off
_ALEXNET = (  # torchvision AlexNet; taps are its five ReLUs (the last MaxPool is never used)
    ("conv", 64, 11, 4, 2), ("tap",), ("pool", 3, 2),
    ("conv", 192, 5, 1, 2), ("tap",), ("pool", 3, 2),
    ("conv", 384, 3, 1, 1), ("tap",),
    ("conv", 256, 3, 1, 1), ("tap",),
    ("conv", 256, 3, 1, 1), ("tap",),
)
# fmt: on
NETS: dict[str, tuple[tuple, ...]] = {"vgg": _vgg16(), "alex": _ALEXNET}  # vgg taps: relu1_2 ... relu5_3


def conv_indices(net: str) -> list[int]:
    """torchvision `features` indices of the convolutions of `net` (the weights LPIPS reads)."""
    out, i = [], 0
    for op in NETS[net]:
        if op[0] == "conv":
            out.append(i)
        i += {"conv": 2, "pool": 1, "tap": 0}[op[0]]
    return out


def tap_count(net: str) -> int:
    """How many feature taps (and linear heads) LPIPS with `net` has."""
    return sum(op[0] == "tap" for op in NETS[net])


class Backbone(nn.Module):
    """The torchvision `features` trunk up to its last LPIPS tap; returns every tap, [B, H_k, W_k, C_k]."""

    net: str = "vgg"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:  # x [B, H, W, 3], already scaled
        if self.net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {self.net!r}")
        taps, i, x = [], 0, x.astype(self.dtype)
        for op in NETS[self.net]:
            if op[0] == "conv":
                _, features, k, stride, pad = op
                conv = Conv2d(features, k, stride, pad, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i}")
                x, i = nn.relu(conv(x)), i + 2
            elif op[0] == "pool":  # torch MaxPool2d: no padding, floor mode
                x, i = nn.max_pool(x, (op[1], op[1]), strides=(op[2], op[2]), padding="VALID"), i + 1
            else:
                taps.append(nn.with_logical_constraint(x, _ACT))
        return taps


class LPIPS(nn.Module):
    """(x0, x1) images in [-1, 1], [B, H, W, 3] each -> LPIPS distance [B]."""

    net: str = "vgg"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two image batches of one shape [B, H, W, 3], got {x0.shape} and {x1.shape}")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale  # [2B, H, W, 3]: one trunk pass
        total = jnp.zeros((x0.shape[0],), jnp.float32)
        taps = Backbone(self.net, self.dtype, self.param_dtype, name="features")(x)
        for k, f in enumerate(taps):  # f [2B, H_k, W_k, C_k]
            # after the trunk everything is fp32: the unit normalisation divides by norms that bf16 rounds
            f = f.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + EPS)
            f0, f1 = jnp.split(f, 2)  # [B, H_k, W_k, C_k] each
            # NetLinLayer: a bias-free 1x1 conv to one channel, i.e. a Dense over channels
            lin = Dense(1, (None, None), use_bias=False, param_dtype=self.param_dtype, name=f"lin{k}")
            total = total + jnp.mean(lin((f0 - f1) ** 2)[..., 0], axis=(1, 2))
        return total
