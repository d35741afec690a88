"""Rotary position embeddings over several position axes (Flux: (index, row, column), theta 10000).

Positions here are static (they follow from the latent and text shapes), so the angle tables are built
in float64 with numpy at trace time, exactly as diffusers builds them in float64, and enter the
program as constants of [L, K] rather than being recomputed per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [L, sum(axes_dims)] float32 for integer positions ids [L, n_axes]; pairs interleaved."""
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids have {ids.shape[-1]} axes but axes_dims {axes_dims} has {len(axes_dims)}")
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim / 2]
        angles = np.outer(ids[:, axis].astype(np.float64), freqs)  # [L, dim / 2]
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, N, K] rotated pairwise (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float32."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
