"""The Euler flow sampler: x <- x + (sigma_next - sigma) v(x, t), the whole loop one compiled program."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def euler_sample(
    velocity: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array, sigmas: np.ndarray | jax.Array
) -> jax.Array:
    """Integrate from sigmas[0] to sigmas[-1] (= 0) in len(sigmas) - 1 steps with `lax.fori_loop`.

    velocity(x, i) -> v for step i. As diffusers' scheduler, the update is computed in float32 and the
    result cast back to the velocity's dtype.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(i, x):
        v = velocity(x, i)
        return (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)).astype(v.dtype)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, latents)
