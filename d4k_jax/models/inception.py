"""The FID Inception-v3: torch-fidelity's `FeatureExtractorInceptionV3` (TF "2015-12-05" graph) in Flax.

NHWC throughout. Module names follow torch-fidelity's module tree (`Mixed_6b/branch7x7_2/conv`), so the
key map in `inception_keys.py` is a naming rule. BatchNorm is applied in inference mode
(eps 0.001) with its running statistics in the `batch_stats` collection, so `params` holds exactly the
tensors torch counts as parameters. The TF graph's quirks are kept: its average pools ignore padding
(count_include_pad=False) and the last block (Mixed_7c) max-pools where torchvision average-pools.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299  # the TF graph's input resolution
FEATURES = 2048  # pool3, the features FID uses
CLASSES = 1008  # the TF graph's classifier (Inception Score); FID does not use it
_EPS = 1e-3  # every BatchNorm of the TF graph
_CONV_AXES = (None, None, "conv_in", "conv_out")


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """[B, H, W, C] (any real dtype) -> [B, h, w, C] float32, exactly TF1's `resize_bilinear(align_corners=False)`
    as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` computes it: source position
    `i * (H / h)` (no half-pixel centres), no antialias, float32 arithmetic in the same order.

    Returns the input unchanged (as float32) when it already has `size`: the interpolation weights are
    then exactly 0, so that is the same result without the gathers.
    """
    if images.shape[1:3] == tuple(size):
        return images.astype(jnp.float32)

    def grid(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)  # float32, like torch
        lo = pos.astype(np.int64)  # truncation == floor: positions are >= 0
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo.astype(np.float32)

    (y0, y1, dy), (x0, x1, dx) = grid(images.shape[1], size[0]), grid(images.shape[2], size[1])
    # Gather rows first, then cast: a 4K image never exists in float32, only its 299 sampled rows.
    top, bottom = images[:, y0].astype(jnp.float32), images[:, y1].astype(jnp.float32)  # [B, h, W, C]
    dx, dy = jnp.asarray(dx)[:, None], jnp.asarray(dy)[:, None, None]
    in_0 = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * dx  # [B, h, w, C]
    in_1 = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * dx
    return in_0 + (in_1 - in_0) * dy


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (inference, eps 0.001) -> ReLU; `kernel`/`padding` are (height, width)."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H', W', features]
        x = nn.Conv(
            self.features,
            self.kernel,
            self.stride,
            padding=tuple((p, p) for p in self.padding),
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=True,
            epsilon=_EPS,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return nn.relu(x)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:  # 3x3; padding counts as -inf
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


def _avg_pool(x: jax.Array) -> jax.Array:  # 3x3 stride 1 "SAME"; TF divides by the unpadded window size
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False).astype(x.dtype)


class _Block(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def conv(self, name: str, features: int, kernel=(1, 1), padding=(0, 0), stride: int = 1) -> BasicConv2d:
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        p = (padding, padding) if isinstance(padding, int) else padding
        return BasicConv2d(features, k, stride, p, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3))
        pool = self.conv("branch_pool", self.pool_features)(_avg_pool(x))
        return jnp.concatenate([self.conv("branch1x1", 64)(x), b5, b3, pool], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 35, 35, 288] -> [B, 17, 17, 768]
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(self.conv("branch3x3dbl_1", 64)(x))
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 17, 17, 768] -> [B, 17, 17, 768]
        c7, row, col = self.channels_7x7, ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_3", 192, *col)(self.conv("branch7x7_2", c7, *row)(b7))
        bd = self.conv("branch7x7dbl_1", c7)(x)
        for i, (feat, kp) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
            bd = self.conv(f"branch7x7dbl_{i}", feat, *kp)(bd)
        pool = self.conv("branch_pool", 192)(_avg_pool(x))
        return jnp.concatenate([self.conv("branch1x1", 192)(x), b7, bd, pool], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 17, 17, 768] -> [B, 8, 8, 1280]
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
    max_pool: bool = False  # True in Mixed_7c: the TF graph's max pool (torchvision average-pools)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, 8, 8, C] -> [B, 8, 8, 2048]
        def split(h: jax.Array, name: str) -> jax.Array:  # the 1x3 and 3x1 convs of one input, concatenated
            a = self.conv(f"{name}a", 384, (1, 3), padding=(0, 1))(h)
            return jnp.concatenate([a, self.conv(f"{name}b", 384, (3, 1), padding=(1, 0))(h)], axis=-1)

        b3 = split(self.conv("branch3x3_1", 384)(x), "branch3x3_2")
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(self.conv("branch3x3dbl_1", 448)(x))
        bd = split(bd, "branch3x3dbl_3")
        pool = self.conv("branch_pool", 192)(_max_pool(x, 1, 1) if self.max_pool else _avg_pool(x))
        return jnp.concatenate([self.conv("branch1x1", 320)(x), b3, bd, pool], axis=-1)


class InceptionV3(_Block):
    """images [B, H, W, 3] in [0, 255] (uint8 or float) -> pool3 features [B, 2048] float32
    (or, with logits=True, the 1008-way logits of the TF graph)."""

    @nn.compact
    def __call__(self, images: jax.Array, *, logits: bool = False) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects images [B, H, W, 3], got shape {images.shape}")
        x = (resize_bilinear_tf1(images) - 128) / 128  # torch-fidelity's normalisation, to [-1, 1)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = self.conv("Conv2d_1a_3x3", 32, 3, stride=2)(x.astype(self.dtype))  # [B, 149, 149, 32]
        x = self.conv("Conv2d_2a_3x3", 32, 3)(x)  # [B, 147, 147, 32]
        x = _max_pool(self.conv("Conv2d_2b_3x3", 64, 3, padding=1)(x), 2)  # [B, 73, 73, 64]
        x = self.conv("Conv2d_4a_3x3", 192, 3)(self.conv("Conv2d_3b_1x1", 80)(x))  # [B, 71, 71, 192]
        x = _max_pool(x, 2)  # [B, 35, 35, 192]
        for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features=pool, name=name, **kw)(x)  # [B, 35, 35, 256 | 288]
        x = InceptionB(name="Mixed_6a", **kw)(x)  # [B, 17, 17, 768]
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)  # [B, 8, 8, 1280]
        x = InceptionE(name="Mixed_7b", **kw)(x)  # [B, 8, 8, 2048]
        x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
        features = x.astype(jnp.float32).mean(axis=(1, 2))  # [B, 2048]
        # Always created, so that params hold the whole checkpoint (Inception Score needs the logits).
        fc = nn.Dense(
            CLASSES,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            param_dtype=self.param_dtype,
            name="fc",
        )
        out = fc(features)
        return out if logits else features
