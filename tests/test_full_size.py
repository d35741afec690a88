"""The real SD3 / Flux VAE configs: parameters equal diffusers' tensor list, built without memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from d4k_jax.models import vae_keys as vae_map
from d4k_jax.models.keymap import param_shapes, to_flax
from d4k_jax.models.vae import FLUX_VAE, SD3_VAE
from d4k_jax.models.vae import AutoencoderKL as FlaxVAE

REAL = {
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
}


def _diffusers_config(**extra):
    blocks = (128, 256, 512, 512)
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=blocks,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        act_fn="silu",
        use_quant_conv=False,
        use_post_quant_conv=False,
        **extra,
    )


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("stride", [1, 2])
def test_real_vae_matches_diffusers_tensor_list(name, stride):
    config = _diffusers_config(**REAL[name])
    with torch.device("meta"):
        ref = AutoencoderKL(**config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}

    ours = vae_map.config_from_diffusers({**config, "stride": stride})
    assert ours == dataclasses.replace(SD3_VAE if name == "sd3" else FLUX_VAE, stride=stride)
    shapes = param_shapes(FlaxVAE(ours), (jnp.zeros((1, 16 * stride, 16 * stride, 3)),))
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(int(np.prod(s)) for s in ref_shapes.values())
    assert sum(int(np.prod(s)) for s in shapes.values()) == 83_819_683
    # every diffusers tensor maps onto exactly one parameter of the right shape (zero-memory arrays)
    source = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in ref_shapes.items()}
    converted = to_flax(source, vae_map.rules(ours, shapes), shapes)
    assert {p: a.shape for p, a in converted.items()} == shapes


def test_eval_shape_at_4096_f16():
    module = FlaxVAE(dataclasses.replace(FLUX_VAE, stride=2), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 4096, 4096, 3), jnp.bfloat16)
    variables = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.bfloat16))
    mean, _ = jax.eval_shape(lambda v, x: module.apply(v, x, method="encode"), variables, x)
    assert mean.shape == (1, 256, 256, 16)
    out = jax.eval_shape(lambda v, z: module.apply(v, z, method="decode"), variables, mean)
    assert out.shape == (1, 4096, 4096, 3) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("guidance", [True, False])
def test_real_flux_matches_diffusers_tensor_list(guidance):
    from diffusers import FluxTransformer2DModel
    from helpers import assert_maps_onto

    from d4k_jax.io.components import _flux_inputs
    from d4k_jax.models import flux_keys as flux_map
    from d4k_jax.models.flux import Flux, FluxConfig

    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=guidance)  # defaults are FLUX.1-dev / schnell
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = flux_map.config_from_diffusers(dict(ref.config))
    assert cfg == FluxConfig(guidance_embeds=guidance)
    shapes = param_shapes(Flux(cfg), _flux_inputs(cfg))
    count = sum(int(np.prod(s)) for s in shapes.values())
    assert count == sum(int(np.prod(s)) for s in ref_shapes.values())
    assert count == (11_901_408_320 if guidance else 11_891_178_560)  # minus the 10,229,760 of guidance_in
    assert_maps_onto(ref_shapes, flux_map.rules(cfg, shapes), shapes)
