"""VAE parity with diffusers' AutoencoderKL (F8) and with the torch reference of the F16 VAE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MODEL_TOL, rel_err
from helpers import nchw, nhwc, save_component
from torch_vae import f16_decode, f16_encode, make_vae

from d4k_jax.io import load_component
from d4k_jax.models import vae as vae_lib

CONFIGS = {
    # name: (diffusers config, image shape NHWC)
    "sd_like_quant_conv": (dict(use_quant_conv=True, use_post_quant_conv=True), (2, 24, 40, 3)),
    "sd3_like_16ch": (
        dict(
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            norm_num_groups=16,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        (1, 33, 27, 3),  # odd sizes: diffusers' asymmetric downsample padding
    ),
    "no_mid_attention": (dict(mid_block_add_attention=False, latent_channels=8), (3, 16, 16, 3)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    config, shape = CONFIGS[request.param]
    torch_vae = make_vae(seed=len(request.param), **config)
    folder = save_component(torch_vae, tmp_path_factory.mktemp(request.param))
    module, params = load_component(folder)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    return torch_vae, module, params, x, folder


def test_encode_matches_diffusers(pair):
    torch_vae, module, params, x, _ = pair
    with torch.no_grad():
        dist = torch_vae.encode(nchw(x)).latent_dist
    mean, logvar = module.apply({"params": params}, jnp.asarray(x), method="encode")
    assert rel_err(mean, nhwc(dist.mean)) < MODEL_TOL
    assert rel_err(logvar, nhwc(dist.logvar)) < MODEL_TOL


def test_decode_matches_diffusers(pair):
    torch_vae, module, params, x, _ = pair
    c = torch_vae.config.latent_channels
    z = np.random.default_rng(1).normal(size=(x.shape[0], 5, 7, c)).astype(np.float32)
    with torch.no_grad():
        ref = torch_vae.decode(nchw(z)).sample
    out = module.apply({"params": params}, jnp.asarray(z), method="decode")
    f = module.config.downsample_factor
    assert out.shape == (x.shape[0], 5 * f, 7 * f, 3)
    assert rel_err(out, nhwc(ref)) < MODEL_TOL


F16_CONFIG = dict(
    block_out_channels=(32, 32, 64, 64),  # four blocks, as the real VAE: 8x, and 16x with stride 2
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    torch_vae = make_vae(seed=7, **F16_CONFIG)
    folder = save_component(torch_vae, tmp_path_factory.mktemp("f16"))
    return torch_vae, folder


def test_f16_encode_matches_reference(f16):
    torch_vae, folder = f16
    module, params = load_component(folder, stride=2)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    mean_ref, logvar_ref = f16_encode(torch_vae, nchw(x))
    mean, logvar = module.apply({"params": params}, jnp.asarray(x), method="encode")
    assert mean.shape == (2, 4, 6, 16)  # 16x downsampling
    assert rel_err(mean, nhwc(mean_ref)) < MODEL_TOL
    assert rel_err(logvar, nhwc(logvar_ref)) < MODEL_TOL


@pytest.mark.parametrize("shifted", [False, True])
def test_f16_decode_matches_reference(f16, shifted):
    torch_vae, folder = f16
    module, params = load_component(folder, stride=2, shifted_tail=shifted)
    z = np.random.default_rng(3).normal(size=(2, 4, 6, 16)).astype(np.float32)
    ref = nhwc(f16_decode(torch_vae, nchw(z), shifted=shifted))
    out = module.apply({"params": params}, jnp.asarray(z), method="decode")
    assert out.shape == (2, 64, 96, 3)
    assert rel_err(out, ref) < MODEL_TOL


def test_shifted_tail_is_the_unshifted_tail_moved_one_pixel(f16):
    _, folder = f16
    z = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4, 4, 16)), jnp.float32)
    plain_m, params = load_component(folder, stride=2)
    shifted_m, _ = load_component(folder, stride=2, shifted_tail=True)
    plain = plain_m.apply({"params": params}, z, method="decode")
    shifted = shifted_m.apply({"params": params}, z, method="decode")
    np.testing.assert_allclose(shifted[:, 1:, 1:], plain[:, :-1, :-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(shifted, plain, atol=1e-3)


def test_config_stride_key_selects_f16(tmp_path):
    torch_vae = make_vae(seed=1, **F16_CONFIG)
    torch_vae.register_to_config(stride=2)  # the reference's config.json key
    module, _ = load_component(save_component(torch_vae, tmp_path / "vae"))
    assert module.config.stride == 2 and module.config.downsample_factor == 16


def test_posterior_sample_and_latent_normalisation():
    cfg = vae_lib.VAEConfig(scaling_factor=0.3611, shift_factor=0.1159)
    mean = jnp.full((4096, 2), 0.5)
    logvar = jnp.full((4096, 2), np.log(0.25))
    z = vae_lib.sample_posterior(jax.random.key(0), mean, logvar)
    assert abs(float(z.mean()) - 0.5) < 0.02 and abs(float(z.std()) - 0.5) < 0.02
    zn = vae_lib.normalize_latents(z, cfg)
    np.testing.assert_allclose(zn, (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(vae_lib.denormalize_latents(zn, cfg), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vae_lib.normalize_latents(z, cfg, use_shift=False), z * 0.3611, rtol=1e-6)


def test_wrong_input_channels_named():
    module = vae_lib.AutoencoderKL(vae_lib.VAEConfig(block_out_channels=(32,), norm_num_groups=8))
    with pytest.raises(ValueError, match="3 channels"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)))
