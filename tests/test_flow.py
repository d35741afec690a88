"""Sampling schedules equal diffusers' FlowMatchEulerDiscreteScheduler as the pipelines drive it."""

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from d4k_jax.diffusion import flow

STEPS = [1, 4, 28, 50]


@pytest.mark.parametrize("steps", STEPS)
def test_sd3_schedule_equals_diffusers(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = flow.sd3_schedule(steps)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


def test_sd3_double_shift_quirk():
    _, timesteps = flow.sd3_schedule(4)
    np.testing.assert_allclose(timesteps, [1000, 857.7, 602.2, 8.93], atol=0.05)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("pixels", [(512, 512), (1024, 768), (2048, 2048), (4096, 4096)])
@pytest.mark.parametrize("vae_factor", [8, 16])
def test_flux_schedule_equals_diffusers(steps, pixels, vae_factor):
    seq = (pixels[0] // vae_factor // 2) * (pixels[1] // vae_factor // 2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )  # FLUX.1-dev's scheduler config
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert flow.flux_mu(seq) == mu
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas, timesteps = flow.flux_schedule(steps, seq)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


def test_flux_mu_extrapolates_at_4096_with_f16():
    assert abs(flow.flux_mu(256 * 256 // 4) - 3.23) < 0.005


def test_bad_step_count():
    with pytest.raises(ValueError, match="at least 1"):
        flow.sd3_schedule(0)
