"""SD3 MMDiT parity with diffusers' SD3Transformer2DModel, its conversions and limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MODEL_TOL, rel_err
from helpers import assert_sharded_forward_matches, save_component
from torch_sd3 import TINY, make_sd3, sd3_forward

from d4k_jax.io import load_component

CASES = {
    # name: (config overrides, latent shape NHWC, text length)
    "sd3_non_square": ({}, (2, 8, 12, 4), 9),
    "table_at_its_maximum": ({}, (1, 24, 24, 4), 5),  # 12 x 12 patches = pos_embed_max_size
    "qk_norm": ({"qk_norm": "rms_norm"}, (2, 10, 6, 4), 7),
    "sd35_dual_attention": ({"qk_norm": "rms_norm", "dual_attention_layers": (0, 1), "num_layers": 4}, (1, 8, 8, 4), 6),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    overrides, shape, text_len = CASES[request.param]
    model = make_sd3(seed=len(request.param), **overrides)
    module, params = load_component(save_component(model, tmp_path_factory.mktemp(request.param)))
    return model, module, params, shape, text_len


@pytest.mark.parametrize("t", [0.0, 371.5, 1000.0])
def test_matches_diffusers(case, t):
    model, module, params, shape, text_len = case
    rng = np.random.default_rng(int(t))
    b = shape[0]
    latents = rng.normal(size=shape).astype(np.float32)
    text = rng.normal(size=(b, text_len, 20)).astype(np.float32)
    pooled = rng.normal(size=(b, 12)).astype(np.float32)
    timestep = np.linspace(t, 1000 - t, b).astype(np.float32) if b > 1 else np.array([t], np.float32)
    ref = sd3_forward(model, latents, timestep, text, pooled)
    out = jax.jit(module.apply)({"params": params}, latents, timestep, text, pooled)
    assert out.shape == shape
    assert rel_err(out, ref) < MODEL_TOL


def test_scan_groups_follow_the_block_types(case):
    _, module, params, _, _ = case
    cfg = module.config
    names = sorted(k for k in params if k.startswith("transformer_blocks_"))
    assert names == sorted(f"transformer_blocks_{first}" for first, _, _ in cfg.groups())
    assert cfg.groups()[-1] == (cfg.num_layers - 1, 1, False)


def test_latents_beyond_the_table_name_the_largest_size(case):
    _, module, params, _, _ = case
    too_big = np.zeros((1, 26, 8, 4), np.float32)
    with pytest.raises(ValueError, match=r"up to 24x24 .* 384² pixels with the F16 VAE"):
        module.apply({"params": params}, too_big, np.zeros(1), np.zeros((1, 3, 20)), np.zeros((1, 12)))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        module.apply({"params": params}, np.zeros((1, 5, 8, 4)), np.zeros(1), np.zeros((1, 3, 20)), np.zeros((1, 12)))


def test_sincos_table_matches_diffusers():
    from d4k_jax.models.mmdit import sincos_table

    model = make_sd3()
    ref = model.pos_embed.pos_embed[0].numpy()
    ours = sincos_table(32, TINY["pos_embed_max_size"], TINY["sample_size"] // TINY["patch_size"])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_sharded_forward_equals_single_device(tmp_path):
    module, params = load_component(save_component(make_sd3(seed=4), tmp_path / "sd3"))
    rng = np.random.default_rng(1)
    args = (
        rng.normal(size=(2, 8, 8, 4)),
        np.array([10.0, 900.0]),
        rng.normal(size=(2, 5, 20)),
        rng.normal(size=(2, 12)),
    )
    assert_sharded_forward_matches(module, params, tuple(jnp.asarray(a, jnp.float32) for a in args))
