"""VAE reconstruction metrics of paper Table 2: PSNR, SSIM, NMSE per image (REFERENCE.md §5).

The paper does not publish its protocol; ours: images are RGB [B, H, W, 3], uint8 or float in [0, 255],
compared at full resolution.
- `psnr` = skimage `peak_signal_noise_ratio(a, b, data_range=255)`: 10 log10(255² / MSE over all pixels
  and channels); identical images give +inf.
- `ssim` = skimage `structural_similarity(a, b, data_range=255, channel_axis=-1)` with its defaults:
  7x7 uniform window, K1 0.01, K2 0.03, sample covariance (NP / (NP - 1)), the per-channel mean over the
  image cropped by 3 pixels, then the mean over channels. Every kept pixel's window lies inside the image,
  so scipy's 'reflect' border never enters the mean and valid window sums suffice. For uint8 inputs the
  window sums and the numerators NP Σxy - Σx Σy are exact int32 (≤ 49² 255² < 2³¹); float inputs are
  split into round(x) + frac and the covariance, bilinear, is the int32 part plus small float32 parts.
  So no catastrophic cancellation in float32, and memory is O(H W) per image (images go one at a time).
- `nmse` = ||a - b||² / ||a||² with images in [0, 1] (x / 255; the ratio is scale-free, so [0, 255]
  gives the same number, while [-1, 1] would not). An all-black `a` gives nan or inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WIN = 7  # skimage's default win_size (uniform filter)
NP = WIN * WIN
K1, K2, DATA_RANGE = 0.01, 0.03, 255.0
C1, C2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2


def _check(a: jax.Array, b: jax.Array, name: str, min_size: int = 1) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.asarray(a), jnp.asarray(b)
    for x in (a, b):
        if x.dtype != jnp.uint8 and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected uint8 or float images in [0, 255], got dtype {x.dtype}")
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: expected two RGB batches of equal shape [B, H, W, 3], got {a.shape} and {b.shape}")
    if min(a.shape[1:3]) < min_size:
        raise ValueError(f"{name}: expected images of at least {min_size}x{min_size} pixels, got {a.shape[1:3]}")
    return a, b


def _sum_hw(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B]: the sum in two levels (rows, then the image) to keep float32 accuracy."""
    return jnp.sum(jnp.sum(x, axis=(2, 3)), axis=1)


def _sq_err(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B]: Σ (a - b)² in float32 (exact per pixel for uint8)."""
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return _sum_hw(d * d)


@jax.jit
def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    mse = _sq_err(a, b) / (a.size // a.shape[0])
    return 10.0 * jnp.log10(DATA_RANGE**2 / mse)


@jax.jit
def _nmse(a: jax.Array, b: jax.Array) -> jax.Array:
    x = a.astype(jnp.float32) / DATA_RANGE
    return _sq_err(a, b) / DATA_RANGE**2 / _sum_hw(x * x)


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, H, W, 3] x2 (uint8 or float in [0, 255]) -> [B] float32 PSNR in dB; +inf where a == b."""
    return _psnr(*_check(a, b, "psnr"))


def nmse(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, H, W, 3] x2, `a` the original -> [B] float32 ||a - b||² / ||a||² on images scaled to [0, 1]."""
    return _nmse(*_check(a, b, "nmse"))


def _box(x: jax.Array) -> jax.Array:
    """[H, W, C] -> [H - 6, W - 6, C]: sums over every 7x7 window inside the image (separable)."""
    h, w = x.shape[0] - WIN + 1, x.shape[1] - WIN + 1
    x = sum(x[i : i + h] for i in range(WIN))
    return sum(x[:, j : j + w] for j in range(WIN))


def _cov_num(x: tuple[jax.Array, ...], y: tuple[jax.Array, ...]) -> jax.Array:
    """NP Σxy - Σx Σy per window, x and y given as (int32 part[, float32 part]) [H, W, C] -> [H-6, W-6, C]."""
    total = jnp.zeros((), jnp.float32)
    for xi in x:
        for yi in y:
            dtype = jnp.int32 if xi.dtype == yi.dtype == jnp.int32 else jnp.float32
            xi_, yi_ = xi.astype(dtype), yi.astype(dtype)
            total = total + (NP * _box(xi_ * yi_) - _box(xi_) * _box(yi_)).astype(jnp.float32)
    return total


def _split(x: jax.Array) -> tuple[jax.Array, ...]:
    """uint8 -> (int32,); float -> (round(x) int32, x - round(x) float32)."""
    if x.dtype == jnp.uint8:
        return (x.astype(jnp.int32),)
    x = x.astype(jnp.float32)
    r = jnp.round(x)
    return r.astype(jnp.int32), x - r


def _ssim_one(pair: tuple[jax.Array, jax.Array]) -> jax.Array:
    """One image pair [H, W, 3] -> scalar mean SSIM (skimage semantics, see the module docstring)."""
    x, y = map(_split, pair)
    ux = sum(_box(p).astype(jnp.float32) for p in x) / NP  # [H-6, W-6, C]
    uy = sum(_box(p).astype(jnp.float32) for p in y) / NP
    norm = NP * (NP - 1)  # (Σx² / NP - ux²) * NP / (NP - 1) = (NP Σx² - (Σx)²) / (NP (NP - 1))
    vx, vy, vxy = _cov_num(x, x) / norm, _cov_num(y, y) / norm, _cov_num(x, y) / norm
    s = (2 * ux * uy + C1) * (2 * vxy + C2) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    return jnp.mean(jnp.mean(jnp.mean(s, axis=1), axis=0))  # W, then H, then channels


@jax.jit
def _ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.map(_ssim_one, (a, b))


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, H, W, 3] x2 (uint8 or float in [0, 255], H, W >= 7) -> [B] float32 mean SSIM per image."""
    return _ssim(*_check(a, b, "ssim", min_size=WIN))
