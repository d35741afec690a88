"""Flux transformer parity with diffusers' FluxTransformer2DModel, and its conversions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MODEL_TOL, rel_err
from helpers import assert_sharded_forward_matches, save_component
from torch_flux import flux_forward, make_flux

from d4k_jax.io import load_component
from d4k_jax.models import flux as flux_lib

CASES = {
    # name: (config overrides, latent shape NHWC, text length)
    "square_guidance": ({}, (2, 8, 8, 4), 7),
    "non_square_long_text": ({}, (1, 6, 10, 4), 77),
    "no_guidance_schnell": ({"guidance_embeds": False}, (3, 4, 6, 4), 5),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    overrides, shape, text_len = CASES[request.param]
    model = make_flux(seed=len(request.param), **overrides)
    module, params = load_component(save_component(model, tmp_path_factory.mktemp(request.param)))
    return model, module, params, shape, text_len


@pytest.mark.parametrize("t", [0.0, 0.37, 1.0])
def test_matches_diffusers(case, t):
    model, module, params, shape, text_len = case
    rng = np.random.default_rng(int(t * 100))
    b = shape[0]
    latents = rng.normal(size=shape).astype(np.float32)
    text = rng.normal(size=(b, text_len, 24)).astype(np.float32)
    pooled = rng.normal(size=(b, 12)).astype(np.float32)
    timestep = np.linspace(t, 1 - t, b).astype(np.float32) if b > 1 else np.array([t], np.float32)
    guidance = np.full((b,), 3.5, np.float32) if model.config.guidance_embeds else None
    ref = flux_forward(model, latents, timestep, text, pooled, guidance)
    out = jax.jit(module.apply)({"params": params}, latents, timestep, text, pooled, guidance)
    assert out.shape == shape
    assert rel_err(out, ref) < MODEL_TOL


def test_pack_unpack_round_trip_and_channel_order():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    packed = flux_lib.pack(x)
    assert packed.shape == (2, 6, 12)
    # token (0, 0) holds pixels (dy, dx) of channel c at index c*4 + dy*2 + dx
    assert packed[0, 0, 1 * 4 + 1 * 2 + 0] == x[0, 1, 0, 1]
    np.testing.assert_array_equal(flux_lib.unpack(packed, 4, 6), x)


def test_input_errors_are_named(case):
    _, module, params, shape, text_len = case
    b = shape[0]
    args = (
        np.zeros(shape, np.float32),
        np.zeros(b, np.float32),
        np.zeros((b, text_len, 24), np.float32),
        np.zeros((b, 12), np.float32),
    )
    g = np.zeros(b, np.float32) if module.config.guidance_embeds else None
    with pytest.raises(ValueError, match="must be even"):
        module.apply({"params": params}, np.zeros((b, 5, 4, 4), np.float32), *args[1:], g)
    with pytest.raises(ValueError, match="latents"):
        module.apply({"params": params}, np.zeros((b, 4, 4, 3), np.float32), *args[1:], g)
    wrong = None if module.config.guidance_embeds else np.zeros(b, np.float32)
    with pytest.raises(ValueError, match="guidance"):
        module.apply({"params": params}, *args, wrong)


def test_sharded_forward_equals_single_device(tmp_path):
    """Params FSDP x tensor sharded over 8 fake devices: same velocity as one device."""
    module, params = load_component(save_component(make_flux(seed=11), tmp_path / "flux"))
    rng = np.random.default_rng(5)
    args = (
        rng.normal(size=(2, 8, 8, 4)),
        np.array([0.3, 0.9]),
        rng.normal(size=(2, 9, 24)),
        rng.normal(size=(2, 12)),
        np.array([3.5, 5.0]),
    )
    assert_sharded_forward_matches(module, params, tuple(jnp.asarray(a, jnp.float32) for a in args))


def test_bf16_compute_tracks_diffusers_bf16(tmp_path):
    """In bf16 both implementations move ~10% away from fp32 with these random weights (t is rounded
    to bf16 before the x1000, as diffusers does); they must stay close to each other."""
    import torch

    model = make_flux(seed=2)
    m16, p16 = load_component(save_component(model, tmp_path / "flux"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    args = (
        rng.normal(size=(1, 8, 8, 4)),
        np.array([0.6]),
        rng.normal(size=(1, 7, 24)),
        rng.normal(size=(1, 12)),
        np.array([3.5]),
    )
    args = tuple(np.asarray(a, np.float32) for a in args)
    ref = flux_forward(model.to(torch.bfloat16), *args)
    out = m16.apply({"params": p16}, *(jnp.asarray(a, jnp.bfloat16) for a in args))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    assert rel_err(out.astype(jnp.float32), ref) < 0.02  # measured 0.0076 on CPU
