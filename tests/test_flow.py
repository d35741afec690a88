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


def test_sd3_training_sigmas_index_the_diffusers_table():
    """The reference: u = sigmoid(n), indices = (u * 1000).long(), sigmas = scheduler.sigmas[indices]."""
    import jax
    import torch

    key = jax.random.key(0)
    ours = np.asarray(flow.sd3_training_sigmas(key, 4096))
    u = 1 / (1 + np.exp(-np.asarray(jax.random.normal(key, (4096,), np.float32), np.float64)))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    table = scheduler.sigmas.numpy()
    want = table[np.floor(torch.from_numpy(u.astype(np.float32)).numpy() * 1000).astype(int)]
    np.testing.assert_allclose(ours, want, rtol=1e-6)
    assert ours.min() > 0 and ours.max() <= 1.0


def test_flux_training_sigmas_are_the_thousandths():
    import jax

    s = np.asarray(flow.flux_training_sigmas(jax.random.key(1), 20000))
    np.testing.assert_allclose(s * 1000, np.round(s * 1000), atol=1e-3)
    assert s.min() >= 0.001 and s.max() <= 1.0 and abs(s.mean() - 0.5005) < 0.01


def test_add_noise():
    x0, eps = np.ones((2, 2, 2, 1), np.float32), np.zeros((2, 2, 2, 1), np.float32)
    out = np.asarray(flow.add_noise(x0, eps, np.array([0.25, 1.0], np.float32)))
    np.testing.assert_allclose(out[0], 0.75)
    np.testing.assert_allclose(out[1], 0.0)


# Scheduler configs as pipelines ship them (FLUX.1-schnell, SD3.5) and as users may write them.
SCHEDULERS = {
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
    "shift 4.5": dict(shift=4.5),
    "shift 3.1 (not a float32)": dict(shift=3.1),
    "dynamic": dict(shift=3.0, use_dynamic_shifting=True),
    "dynamic, other line": dict(
        use_dynamic_shifting=True, base_shift=0.3, max_shift=1.6, base_image_seq_len=128, max_image_seq_len=8192
    ),
    "500 train steps": dict(shift=2.5, num_train_timesteps=500),
}


def _diffusers_mu(scheduler, seq):
    c = scheduler.config
    return calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_schedules_follow_the_scheduler_config_as_diffusers(name, steps):
    """Both pipelines' schedules, driven as FluxPipeline / StableDiffusion3Pipeline drive the scheduler."""
    settings = SCHEDULERS[name]
    ours = flow.SchedulerConfig(**settings)
    seq = 24 * 40  # packed Flux tokens / SD3 latent patches
    scheduler = FlowMatchEulerDiscreteScheduler(**settings)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=_diffusers_mu(scheduler, seq))
    sigmas, timesteps = flow.flux_schedule(steps, seq, ours)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())

    scheduler = FlowMatchEulerDiscreteScheduler(**settings)
    dynamic = settings.get("use_dynamic_shifting", False)
    scheduler.set_timesteps(steps, **({"mu": _diffusers_mu(scheduler, seq)} if dynamic else {}))
    sigmas, timesteps = flow.sd3_schedule(steps, ours, seq)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


def test_dynamic_sd3_schedule_needs_the_token_count():
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.sd3_schedule(4, flow.SchedulerConfig(use_dynamic_shifting=True))
