"""Rectified-flow schedules, computed exactly as diffusers' FlowMatchEulerDiscreteScheduler does.

x_t = (1 - sigma) x0 + sigma eps; the model predicts v = eps - x0; timesteps are 1000 sigma.

Sampling schedules return `sigmas` [N + 1] (a final 0 appended) and `timesteps` [N], float32, with the
same float32 / float64 arithmetic as the diffusers pipelines, so that the sequences match bit for bit:
- SD3 (static shift 3): the scheduler spaces timesteps between its *already shifted* training sigmas
  and shifts them again (quirk kept: 4 steps give 1000, 857.7, 602.2, 8.93);
- Flux (dynamic shift): sigmas linspace(1, 1/N, N), shifted by mu from the packed image-token count,
  mu = 0.5 + (1.15 - 0.5) (seq - 256) / (4096 - 256), extrapolated past 4096 tokens (mu = 3.23 at 4096²
  with the F16 VAE).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def shifted(sigmas, shift: float):
    """The static time shift s' = shift s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sd3_schedule(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1], timesteps [N]) of StableDiffusion3Pipeline with FlowMatchEulerDiscreteScheduler(shift)."""
    _check_steps(num_steps)
    train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / np.float32(
        num_train_timesteps
    )
    train = shifted(train, np.float32(shift)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])  # .item(): float32 values as python floats
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = shifted(timesteps / num_train_timesteps, shift).astype(np.float32)  # float64 math, then float32
    return np.append(sigmas, np.float32(0)), sigmas * np.float32(num_train_timesteps)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """diffusers' calculate_shift: linear in the packed image-token count (not clipped past max_seq_len)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_schedule(num_steps: int, image_seq_len: int, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1], timesteps [N]) of FluxPipeline for `image_seq_len` packed tokens ((H/16)(W/16) for F8)."""
    _check_steps(num_steps)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    e = math.exp(flux_mu(image_seq_len))
    sigmas = (e / (e + (1 / sigmas - 1))).astype(np.float32)
    return np.append(sigmas, np.float32(0)), sigmas * np.float32(num_train_timesteps)


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_steps}")


# ---------------------------------------------------------------------------------------------------------
# Training: noise levels and noising (REFERENCE.md §3)


def sd3_training_sigmas(key: jax.Array, batch: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> jax.Array:
    """Logit-normal index into the shift-3 table: u = sigmoid(n), i = floor(1000 u), s = (1000 - i) / 1000,
    sigma = shift s / (1 + (shift - 1) s). The model gets timestep 1000 sigma."""
    u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    i = jnp.floor(u * num_train_timesteps)
    return shifted((num_train_timesteps - i) / num_train_timesteps, shift).astype(jnp.float32)


def flux_training_sigmas(key: jax.Array, batch: int, num_train_timesteps: int = 1000) -> jax.Array:
    """sigma uniform on {1/1000, 2/1000, ..., 1} (no shift in the reference's Flux training)."""
    i = jax.random.randint(key, (batch,), 1, num_train_timesteps + 1)
    return (i / num_train_timesteps).astype(jnp.float32)


def shifted_uniform_sigmas(key: jax.Array, batch: int, shift: float) -> jax.Array:
    """An alternative: uniform sigma with a static (e.g. resolution-dependent) shift."""
    return shifted(jax.random.uniform(key, (batch,), jnp.float32, 1e-3, 1.0), shift).astype(jnp.float32)


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_t = (1 - sigma) x0 + sigma eps, sigma [B] broadcast over [B, H, W, C]."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).astype(x0.dtype)
    return (1 - s) * x0 + s * noise
