"""Whole pipelines: same images as diffusers' FluxPipeline / StableDiffusion3Pipeline from the same noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from diffusers import FluxPipeline as TorchFlux
from tiny_pipelines import flux_pipeline

from d4k_jax.pipelines.flux import FluxPipeline

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
