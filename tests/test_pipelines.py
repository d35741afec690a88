"""Whole pipelines: same images as diffusers' FluxPipeline / StableDiffusion3Pipeline from the same noise."""

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers import FluxPipeline as TorchFlux
from tiny_pipelines import flux_pipeline

from d4k_jax.diffusion.flow import SchedulerConfig
from d4k_jax.pipelines.flux import FluxPipeline

DEMO = Path(__file__).resolve().parent.parent / "d4k_jax" / "data" / "demo_pipeline"
PROMPTS = ["a red cat on the sky", "a photo of a small dog with a large blue square on a green background"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return flux_pipeline(root), FluxPipeline.from_pretrained(root / "flux", dtype=jnp.float32)


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_matches_diffusers(flux, steps):
    ref_pipe, pipe = flux
    latents = np.random.default_rng(steps).normal(size=(2, 8, 12, 4)).astype(np.float32)  # 16x24 pixels
    packed = TorchFlux._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), 2, 4, 8, 12)
    with torch.no_grad():
        ref = ref_pipe(
            PROMPTS,
            height=16,
            width=24,
            num_inference_steps=steps,
            guidance_scale=4.0,
            latents=packed,
            max_sequence_length=20,
            output_type="np",
        ).images
    ours = pipe(
        PROMPTS,
        height=16,
        width=24,
        num_inference_steps=steps,
        guidance_scale=4.0,
        latents=latents,
        max_sequence_length=20,
        output="float",
    )
    assert ours.shape == (2, 16, 24, 3)
    assert rel_err(ours, ref) < MODEL_TOL
    uint8 = pipe(
        PROMPTS,
        height=16,
        width=24,
        num_inference_steps=steps,
        guidance_scale=4.0,
        latents=latents,
        max_sequence_length=20,
    )
    assert uint8.dtype == jnp.uint8
    assert np.abs(np.asarray(uint8, int) - np.round(ref * 255).astype(int)).max() <= 1


def _with_scheduler(ref_pipe, pipe, folder, scheduler):
    """The same two pipelines with `scheduler`: diffusers' built from its config, ours read from the folder
    it was saved in (a shallow copy of ours keeps the compiled sampler: the schedule is an input)."""
    from d4k_jax.pipelines.scheduler import load_scheduler

    scheduler.save_pretrained(folder / "scheduler")
    ref = type(ref_pipe)(**{**ref_pipe.components, "scheduler": scheduler})
    ours = copy.copy(pipe)
    ours.scheduler = load_scheduler(folder, pipe.scheduler)
    return ref, ours


def test_flux_schnell_scheduler_matches_diffusers(flux, tmp_path):
    """FLUX.1-schnell's scheduler (no dynamic shifting, shift 1): its config is read, not FLUX.1-dev's."""
    ref_pipe, pipe = _with_scheduler(*flux, tmp_path, FlowMatchEulerDiscreteScheduler(shift=1.0))
    assert pipe.scheduler.shift == 1.0 and not pipe.scheduler.use_dynamic_shifting
    latents = np.random.default_rng(7).normal(size=(2, 8, 12, 4)).astype(np.float32)
    packed = TorchFlux._pack_latents(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), 2, 4, 8, 12)
    kwargs = dict(height=16, width=24, num_inference_steps=4, guidance_scale=4.0, max_sequence_length=20)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, latents=packed, output_type="np", **kwargs).images
    ours = pipe(PROMPTS, latents=latents, output="float", **kwargs)
    assert rel_err(ours, ref) < MODEL_TOL
    dev = flux[1](PROMPTS, latents=latents, output="float", **kwargs)  # the FLUX.1-dev schedule differs
    assert rel_err(dev, ref) > 100 * MODEL_TOL


def test_from_pretrained_reads_the_scheduler_config(tmp_path):
    """from_pretrained reads scheduler/scheduler_config.json (and refuses what it lacks before loading weights);
    the demo pipelines' own configs are checked in test_demo_pipeline.py."""
    folder = tmp_path / "demo"
    folder.mkdir()
    for item in DEMO.iterdir():
        if item.name != "scheduler":
            (folder / item.name).symlink_to(item)
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(folder / "scheduler")
    assert FluxPipeline.from_pretrained(folder, dtype=jnp.float32).scheduler == SchedulerConfig(shift=1.0)
    FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).save_pretrained(folder / "scheduler")
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        FluxPipeline.from_pretrained(folder)


def test_pipelines_are_exported():
    """DESIGN's public names: d4k_jax.pipelines.FluxPipeline / SD3Pipeline."""
    import d4k_jax.pipelines as pipelines
    from d4k_jax.pipelines import SD3Pipeline
    from d4k_jax.pipelines.sd3 import SD3Pipeline as sd3

    assert pipelines.FluxPipeline is FluxPipeline and SD3Pipeline is sd3
    assert {"FluxPipeline", "SD3Pipeline"} <= set(dir(pipelines)) and pipelines.__all__ == [
        "FluxPipeline",
        "SD3Pipeline",
    ]
    with pytest.raises(AttributeError, match="NoPipeline"):
        pipelines.NoPipeline  # noqa: B018


def test_flux_seeded_noise_is_deterministic(flux):
    _, pipe = flux
    a = pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=2, seed=3, max_sequence_length=12)
    b = pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=2, seed=3, max_sequence_length=12)
    c = pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=2, seed=4, max_sequence_length=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flux_input_errors(flux):
    _, pipe = flux
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(PROMPTS, height=18, width=16)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(PROMPTS, height=16, width=16, negative_prompt="blurry")
    with pytest.raises(ValueError, match="non-empty list"):
        pipe([], height=16, width=16)
    with pytest.raises(ValueError, match="latents must be"):
        pipe(PROMPTS, height=16, width=16, latents=jax.numpy.zeros((1, 8, 8, 4)))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny_pipelines import sd3_pipeline

    from d4k_jax.pipelines.sd3 import SD3Pipeline

    root = tmp_path_factory.mktemp("pipes_sd3")
    return sd3_pipeline(root), SD3Pipeline.from_pretrained(root / "sd3", dtype=jnp.float32)


@pytest.mark.parametrize(
    ("steps", "scale", "negative"), [(1, 7.0, None), (4, 5.0, ["blurry", "a cat"]), (2, 1.0, None)]
)
def test_sd3_matches_diffusers(sd3, steps, scale, negative):
    ref_pipe, pipe = sd3
    latents = np.random.default_rng(steps).normal(size=(2, 8, 12, 4)).astype(np.float32)  # 16x24 pixels
    with torch.no_grad():
        ref = ref_pipe(
            PROMPTS,
            negative_prompt=negative,
            height=16,
            width=24,
            num_inference_steps=steps,
            guidance_scale=scale,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            max_sequence_length=20,
            output_type="np",
        ).images
    ours = pipe(
        PROMPTS,
        negative_prompt=negative,
        height=16,
        width=24,
        num_inference_steps=steps,
        guidance_scale=scale,
        latents=latents,
        max_sequence_length=20,
        output="float",
    )
    assert rel_err(ours, ref) < MODEL_TOL


@pytest.mark.parametrize(
    "scheduler",
    [dict(shift=4.5), dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=64)],
    ids=["shift 4.5", "dynamic"],
)
def test_sd3_scheduler_settings_match_diffusers(sd3, tmp_path, scheduler):
    """A non-default SD3 shift, and a dynamic shift (the pipeline passes mu from the latent patches)."""
    ref_pipe, pipe = _with_scheduler(*sd3, tmp_path, FlowMatchEulerDiscreteScheduler(**scheduler))
    assert pipe.scheduler == SchedulerConfig(**scheduler)
    latents = np.random.default_rng(4).normal(size=(2, 8, 12, 4)).astype(np.float32)  # 16x24 pixels
    kwargs = dict(height=16, width=24, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=20)
    with torch.no_grad():
        nchw = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
        ref = ref_pipe(PROMPTS, latents=nchw, output_type="np", **kwargs).images
    ours = pipe(PROMPTS, latents=latents, output="float", **kwargs)
    assert rel_err(ours, ref) < MODEL_TOL
    default = sd3[1](PROMPTS, latents=latents, output="float", **kwargs)  # shift 3 differs
    assert rel_err(default, ref) > 100 * MODEL_TOL


def test_f16_decode_in_the_pipeline_matches_the_reference(flux):
    """vae_stride=2: the pipeline's images are the F16 reference decode of the same final latents."""
    from helpers import nchw, nhwc
    from torch_vae import f16_decode

    ref_pipe, pipe = flux
    pipe16 = FluxPipeline(
        pipe.transformer, _f16(pipe.vae), pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2
    )
    latents = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)  # 32x32 pixels with F16
    images = pipe16(
        PROMPTS[:1], height=32, width=32, num_inference_steps=2, latents=latents, max_sequence_length=12, output="float"
    )
    vae = ref_pipe.vae
    z = _final_latents(pipe, latents) / vae.config.scaling_factor + vae.config.shift_factor
    ref = np.clip(nhwc(f16_decode(vae, nchw(z), shifted=False)) / 2 + 0.5, 0, 1)
    assert images.shape == (1, 32, 32, 3)
    assert rel_err(images, ref) < MODEL_TOL


def _f16(vae_pair):
    import dataclasses

    from d4k_jax.models.vae import AutoencoderKL

    module, params = vae_pair
    return AutoencoderKL(dataclasses.replace(module.config, stride=2), dtype=module.dtype), params


def _final_latents(pipe, latents):
    """The sampler run by hand: 2 steps of the schedule for 16 packed tokens, guidance 3.5."""
    from d4k_jax.diffusion.flow import flux_schedule
    from d4k_jax.diffusion.sampler import euler_sample

    text, pooled = pipe.encode_prompt(PROMPTS[:1], 12)
    module, params = pipe.transformer
    sigmas, timesteps = flux_schedule(2, 16)
    timesteps = jnp.asarray(timesteps)

    def velocity(x, i):
        t = jnp.broadcast_to(timesteps[i] / 1000, (1,))
        return module.apply({"params": params}, x, t, text, pooled, jnp.full((1,), 3.5))

    return np.asarray(euler_sample(velocity, jnp.asarray(latents), sigmas))
