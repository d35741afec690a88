"""Random normals in a low-precision dtype are drawn in float32 and cast (a bfloat16 draw has 128 values)."""

import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.models.vae import sample_posterior
from d4k_jax.pipelines.base import initial_noise

N = 2**20


def _spread(x) -> tuple[int, float]:
    x = np.asarray(jnp.asarray(x, jnp.float32))
    return len(np.unique(x)), float(np.abs(x).max())


def test_initial_noise_is_a_float32_draw_cast():
    noise = initial_noise(5, (1, 256, 256, 16), jnp.bfloat16)
    assert noise.dtype == jnp.bfloat16 and noise.size == N
    distinct, largest = _spread(noise)
    assert distinct > 3000 and largest > 4.0, (distinct, largest)  # a bf16 draw: 128 values, |z| <= 2.89
    fp32 = jax.random.normal(jax.random.key(5), (1, 256, 256, 16), jnp.float32)
    np.testing.assert_array_equal(np.asarray(noise, np.float32), np.asarray(fp32.astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(initial_noise(5, (1, 256, 256, 16), jnp.float32), fp32)  # same seed, same noise


def test_vae_posterior_sample_in_bfloat16_uses_a_float32_draw():
    mean = jnp.zeros((N // 16, 16), jnp.bfloat16)
    z = sample_posterior(jax.random.key(2), mean, jnp.zeros_like(mean))  # std 1: z is the noise itself
    assert z.dtype == jnp.bfloat16
    distinct, largest = _spread(z)
    assert distinct > 3000 and largest > 4.0, (distinct, largest)
    want = jax.random.normal(jax.random.key(2), mean.shape, jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(want, np.float32))
