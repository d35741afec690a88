"""Spatially sharded VAE decode / encode on 8 fake CPU devices equals the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers import save_component
from torch_vae import make_vae

from d4k_jax import sharding
from d4k_jax.io import load_component

SPATIAL = ("batch", "height", "width", "channels")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    config = dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return load_component(save_component(make_vae(seed=3, **config), tmp_path_factory.mktemp("vae")), stride=2)


def test_mesh_shapes():
    mesh = sharding.make_mesh({"data": 2, "sequence": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh({"data": 3, "sequence": 4})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    # one process is one granule: the default dcn (data across hosts) changes nothing, more is refused
    assert sharding.make_mesh({"fsdp": -1}, dcn={"data": -1}).devices.shape == (1, 8, 1, 1)
    with pytest.raises(ValueError, match="needs 2 hosts / slices, have 1"):
        sharding.make_mesh({"fsdp": -1}, dcn={"data": 2})


@pytest.mark.parametrize("method", ["decode", "encode"])
def test_spatially_sharded_vae_equals_single_device(vae, method):
    assert jax.device_count() == 8
    module, params = vae
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 8, 16)) if method == "decode" else rng.uniform(-1, 1, (2, 256, 128, 3))
    x = jnp.asarray(x, jnp.float32)
    fn = lambda p, x: module.apply({"params": p}, x, method=method)
    want = jax.jit(fn)(params, x)
    mesh = sharding.make_mesh({"sequence": 8})
    out_axes = SPATIAL if method == "decode" else (SPATIAL, SPATIAL)
    got = sharding.sharded(fn, mesh, sharding.DEFAULT_RULES, (None, SPATIAL), out_axes)(params, x)
    leaf = got if method == "decode" else got[0]
    assert leaf.sharding.spec[1] == "sequence"  # rows really are split over the devices
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < 1e-5


def test_every_vae_parameter_has_logical_axes():
    import flax.linen as nn

    from d4k_jax.models.vae import FLUX_VAE, AutoencoderKL

    boxed = jax.eval_shape(AutoencoderKL(FLUX_VAE).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = sharding.params_sharding(sharding.make_mesh(), sharding.DEFAULT_RULES, {"params": boxed})
    assert len(jax.tree.leaves(specs)) == len(leaves)
