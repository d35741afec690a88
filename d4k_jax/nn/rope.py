"""Rotary position embeddings over several position axes (Flux: (index, row, column), theta 10000).

The cos/sin tables [L, K] are built in the program from integer positions (Flux computes its ids from iota),
by looking up, per position axis, a small table of that axis's positions [P, dim] computed in float64 at trace
time exactly as diffusers computes its tables (float64, rounded to float32 once). Only those per-axis tables
enter the program as constants: O(rows + columns) instead of O(rows x columns) (for Flux at 4096², 115 KB
instead of two [16,896, 128] float32 tables, 17 MB), and the values are bit for bit the float64 ones.

Why not cos(pos x freq) in float32 in the program: at Flux's 4096² positions (up to 127 rad) one float32
rounding of the angle is 4e-6 rad; XLA:CPU's float32 tables came out 6.5e-6 (absolute) from float64's,
against 3e-8 for the rounded float64 tables, and the error would depend on each backend's sin/cos.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def axis_tables(size: int, dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [size, dim] float32 of positions 0 .. size - 1 on one axis of `dim` channels: angles
    pos / theta^(2i / dim) in float64, pairs interleaved (diffusers' get_1d_rotary_pos_embed, repeat_interleave)."""
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of channels, got {dim}")
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim / 2]
    angles = np.outer(np.arange(size, dtype=np.float64), freqs)  # [size, dim / 2]
    return tuple(np.repeat(f(angles), 2, axis=1).astype(np.float32) for f in (np.cos, np.sin))


def rope_tables(
    ids: jax.Array, axes_dims: Sequence[int], theta: float, sizes: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [L, sum(axes_dims)] float32 for integer positions ids [L, n_axes], ids[:, a] in [0, sizes[a])
    (static bounds: the per-axis tables' rows; a position outside them is not checked in the program)."""
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims) or len(sizes) != len(axes_dims):
        raise ValueError(
            f"ids {ids.shape} must be [L, {len(axes_dims)}] with one size per axis of axes_dims {tuple(axes_dims)}, "
            f"got sizes {tuple(sizes)}"
        )
    cos, sin = [], []
    for axis, (dim, size) in enumerate(zip(axes_dims, sizes, strict=True)):
        c, s = axis_tables(size, dim, theta)
        rows = ids[:, axis]
        cos.append(jnp.asarray(c).at[rows].get(mode="promise_in_bounds"))
        sin.append(jnp.asarray(s).at[rows].get(mode="promise_in_bounds"))
    return jnp.concatenate(cos, 1), jnp.concatenate(sin, 1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, N, K] rotated pairwise (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float32."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
