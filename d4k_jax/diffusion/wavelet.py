"""The wavelet fine-tuning (WLF) loss of Diffusion-4K (REFERENCE.md §2).

x_t = (1 - sigma) x0 + sigma eps, x0_hat = x_t - sigma v; loss = mean over the batch of the mean over
all wavelet coefficients of (DWT(x0_hat) - DWT(x0))², with a one-level Haar DWT in mode "zero" per
channel (pytorch_wavelets' DWTForward(J=1, mode='zero', wave='haar')).

One-level Haar is orthonormal and x0_hat - x0 = -sigma (v - (eps - x0)), so with equal subband weights
this is the sigma²-weighted velocity MSE (the x0-prediction MSE); the wavelet matters only through
unequal `subband_weights`, more levels or other wavelets, which this function offers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxwt


def subbands(x: jax.Array, *, wavelet: str = "haar", level: int = 1) -> list[jax.Array]:
    """x [B, H, W, C] -> [LL_level, LH_level, HL_level, HH_level, ..., LH_1, HL_1, HH_1], each [B, C, h, w]
    (coarsest first, jaxwt's order; mode "zero")."""
    coeffs = jaxwt.wavedec2(jnp.moveaxis(x, -1, 1), wavelet, mode="zero", level=level)
    return [coeffs[0], *(band for detail in coeffs[1:] for band in detail)]


def wlf_loss(
    velocity: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    sigma: jax.Array,
    *,
    wavelet: str = "haar",
    level: int = 1,
    subband_weights: Sequence[float] | None = None,
) -> jax.Array:
    """Scalar WLF loss; velocity, x0, noise [B, h, w, C], sigma [B]. `subband_weights` (one per entry of
    `subbands`, default all 1) weight each coefficient's squared error by its subband."""
    f = jnp.promote_types(jnp.result_type(velocity, x0), jnp.float32)  # float32, or float64 for float64 inputs
    s = sigma.astype(f)[:, None, None, None]
    x0 = x0.astype(f)
    x_t = (1 - s) * x0 + s * noise.astype(f)
    x0_hat = x_t - s * velocity.astype(f)
    # the DWT is linear: transform the error once instead of both signals
    bands = subbands(x0_hat - x0, wavelet=wavelet, level=level)
    weights = [1.0] * len(bands) if subband_weights is None else list(subband_weights)
    if len(weights) != len(bands):
        raise ValueError(f"subband_weights needs {len(bands)} values for level {level}, got {len(weights)}")
    total = sum(w * jnp.square(b).sum(axis=(1, 2, 3)) for w, b in zip(weights, bands, strict=True))  # [B]
    count = sum(b[0].size for b in bands)
    return jnp.mean(total / count)


def flow_matching_loss(velocity: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The plain rectified-flow loss mean((v - (eps - x0))²): the "fine-tune without WLF" ablation."""
    f = jnp.promote_types(jnp.result_type(velocity, x0), jnp.float32)
    target = noise.astype(f) - x0.astype(f)
    return jnp.mean(jnp.square(velocity.astype(f) - target))
