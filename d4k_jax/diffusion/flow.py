"""Rectified-flow schedules, computed exactly as diffusers' FlowMatchEulerDiscreteScheduler does.

x_t = (1 - sigma) x0 + sigma eps; the model predicts v = eps - x0; timesteps are 1000 sigma.

Sampling schedules return `sigmas` [N + 1] (a final 0 appended) and `timesteps` [N], float32, with the
same float32 / float64 arithmetic as the diffusers pipelines, so that the sequences match bit for bit.
`SchedulerConfig` holds the scheduler settings that shape them (a pipeline's scheduler_config.json):
- static shift s' = shift s / (1 + (shift - 1) s); SD3 (shift 3): the scheduler spaces timesteps between
  its *already shifted* training sigmas and shifts them again (quirk kept: 4 steps give 1000, 857.7,
  602.2, 8.93);
- dynamic shift (use_dynamic_shifting): s' = e^mu / (e^mu + 1/s - 1), mu linear in the image-token count
  between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), extrapolated past the max
  (FLUX.1-dev: mu = 3.23 at 4096² with the F16 VAE);
- Flux pipelines start from sigmas linspace(1, 1/N, N); SD3 pipelines from the scheduler's own spacing.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The FlowMatchEulerDiscreteScheduler settings d4k_jax implements; defaults are that class's own (a
    scheduler_config.json that leaves a key out gets these, as in diffusers)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def mu(self, image_seq_len: int) -> float:
        return flux_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift)


# The schedules of pipelines without a scheduler/ folder: FLUX.1-dev's and SD3-medium's scheduler_config.json.
FLUX_DEV = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)
SD3_MEDIUM = SchedulerConfig(shift=3.0)


def shifted(sigmas, shift: float):
    """The static time shift s' = shift s / (1 + (shift - 1) s). Pass a Python float `shift`: with float32
    sigmas the math is then float32 with (shift - 1) rounded once, as torch does with the config's float."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def set_timesteps(
    num_steps: int, scheduler: SchedulerConfig, mu: float | None = None, sigmas: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1], timesteps [N]) of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps,
    sigmas=sigmas, mu=mu): float64 spacing between the training table's ends, or the given sigmas in float32;
    then the dynamic (mu) or static shift; float32 out."""
    _check_steps(num_steps)
    n = scheduler.num_train_timesteps
    if sigmas is None:
        # the training table (float32, shifted unless dynamic) only gives the ends of a float64 spacing
        train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if not scheduler.use_dynamic_shifting:
            train = shifted(train, float(scheduler.shift)).astype(np.float32)
        sigma_max, sigma_min = float(train[0]), float(train[-1])  # .item(): float32 values as python floats
        sigmas = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n
    else:
        sigmas = np.asarray(sigmas).astype(np.float32)
    if scheduler.use_dynamic_shifting:
        if mu is None:
            raise ValueError("a dynamically shifted schedule (use_dynamic_shifting) needs mu")
        e = math.exp(mu)
        sigmas = e / (e + (1 / sigmas - 1))
    else:
        sigmas = shifted(sigmas, float(scheduler.shift))
    sigmas = sigmas.astype(np.float32)
    return np.append(sigmas, np.float32(0)), sigmas * np.float32(n)


def sd3_schedule(
    num_steps: int, scheduler: SchedulerConfig = SD3_MEDIUM, image_seq_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1], timesteps [N]) of StableDiffusion3Pipeline. With use_dynamic_shifting the pipeline
    passes mu from `image_seq_len` = (h / patch) (w / patch) latent patches."""
    mu = None
    if scheduler.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("a dynamically shifted SD3 schedule needs image_seq_len (latent patches)")
        mu = scheduler.mu(image_seq_len)
    return set_timesteps(num_steps, scheduler, mu)


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


def flux_schedule(
    num_steps: int, image_seq_len: int, scheduler: SchedulerConfig = FLUX_DEV
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [N + 1], timesteps [N]) of FluxPipeline for `image_seq_len` packed tokens ((H/16)(W/16) for F8):
    sigmas linspace(1, 1/N, N), shifted by mu of the token count (dynamic) or by the static shift."""
    _check_steps(num_steps)
    mu = scheduler.mu(image_seq_len) if scheduler.use_dynamic_shifting else None
    return set_timesteps(num_steps, scheduler, mu, np.linspace(1.0, 1 / num_steps, num_steps))


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
