"""Sequence-parallel (Ulysses) Flux and SD3 on 8 fake CPU devices equal one device: forward and the gradients
of the WLF loss, at text lengths that divide the degree and that do not, with fsdp and tensor beside it; the
collectives one block compiles to; the error for a degree that does not divide the heads."""

import collections
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER_TOL, rel_err
from helpers import sequence_degrees
from tiny_configs import tiny_flux, tiny_sd35

from d4k_jax import flops, sharding
from d4k_jax.diffusion import flow, wavelet
from d4k_jax.models.flux import DoubleBlock, Flux
from d4k_jax.models.mmdit import MMDiT

# 8 heads each, so that every degree up to 8 divides them; 4x8 latents: 8 image tokens after Flux's 2x2 packing
# and SD3's 2x2 patches. SD3 here is SD3.5-shaped: a dual-attention block and the last block, with qk-norm.
FLUX, SD3 = tiny_flux(heads=8), tiny_sd35(heads=8, head_dim=4)
MESHES = {
    "sequence 2": {"sequence": 2},
    "sequence 4": {"sequence": 4},
    "sequence 8": {"sequence": 8},
    "sequence 4 x fsdp 2": {"sequence": 4, "fsdp": 2},
    "sequence 2 x tensor 2 x fsdp 2": {"sequence": 2, "tensor": 2, "fsdp": 2},
}
# (model, mesh, text length, gradients too): 8 divides every degree (the text is split with the image), 7 none
# (the text stays replicated); the forward of every case, the WLF gradients of some (each costs a compile). Each
# degree, text split and replicated, runs for each model in some case (not every pairing: the suite's time)
CASES = [
    ("flux", "sequence 2", 7, False),
    ("flux", "sequence 8", 7, False),  # Flux's gradients with a replicated text: test_trainer's sequence run
    ("flux", "sequence 4 x fsdp 2", 8, True),
    ("flux", "sequence 2 x tensor 2 x fsdp 2", 7, False),
    ("sd3", "sequence 8", 8, True),
    ("sd3", "sequence 4 x fsdp 2", 7, True),
    ("sd3", "sequence 2 x tensor 2 x fsdp 2", 8, False),
]


@functools.cache
def _setup(model: str, text_len: int):
    """(module, params, forward inputs, loss inputs, one-device (loss, gradients, velocity))."""
    module = Flux(FLUX) if model == "flux" else MMDiT(SD3)
    cfg = FLUX if model == "flux" else SD3
    rng = np.random.default_rng(text_len)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    sigma, x0, noise = jnp.asarray([0.3, 0.8], jnp.float32), f32(2, 4, 8, 4), f32(2, 4, 8, 4)
    text, pooled = f32(2, text_len, cfg.joint_attention_dim), f32(2, cfg.pooled_projection_dim)
    x_t = flow.add_noise(x0, noise, sigma)
    args = (x_t, sigma, text, pooled, jnp.full((2,), 3.5)) if model == "flux" else (x_t, sigma * 1000, text, pooled)
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])  # one compile, not one per op
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    targets = (x0, noise, sigma)
    return module, params, args, targets, _run(module, params, args, targets, grads=True)


def _run(module, params, args, targets, grads):
    """(WLF loss, its gradients, velocity), or (None, None, velocity) without `grads`."""

    def loss(p):
        v = module.apply({"params": p}, *args)
        return wavelet.wlf_loss(v, *targets), v

    if not grads:
        return None, None, jax.jit(lambda p: module.apply({"params": p}, *args))(params)
    (value, v), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, g, v


@pytest.mark.parametrize(("model", "mesh_name", "text_len", "grads"), CASES)
def test_sequence_parallel_equals_one_device(model, mesh_name, text_len, grads, monkeypatch):
    module, params, args, targets, (loss, grad, velocity) = _setup(model, text_len)
    degrees = sequence_degrees(monkeypatch)
    shape = MESHES[mesh_name]
    mesh = sharding.make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    placed = jax.device_put(params, sharding.params_sharding(mesh, sharding.DEFAULT_RULES, abstract)["params"])
    with sharding.active(mesh):
        got_loss, got_grad, got_velocity = _run(module, placed, args, targets, grads)
    assert max(degrees) == MESHES[mesh_name]["sequence"]  # the attention really ran split
    assert rel_err(got_velocity, velocity) < LAYER_TOL
    if grads:
        assert rel_err(got_loss, loss) < LAYER_TOL
        for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(got_grad), jax.tree.leaves(grad), strict=True):
            assert rel_err(g, want) < LAYER_TOL, jax.tree_util.keystr(path)


def _collectives(hlo: str) -> collections.Counter:
    ops = re.findall(r"= \(?(\w+)\[([\d,]*)\][^=]*? (all-to-all|all-gather|all-reduce|collective-permute)\(", hlo)
    return collections.Counter((kind, dtype, shape) for dtype, shape, kind in ops)


@pytest.mark.parametrize("text_len", [8, 7])
def test_one_block_does_only_the_ulysses_collectives(text_len):
    """Flux's double block over sequence 4 (image tokens 32): one all-to-all for each of q, k, v and the output
    of each stream whose length divides the degree; a replicated text's output is gathered over heads. No other
    collective (no weight gathers either): norms, modulation, MLPs and RoPE stay local."""
    block, (length, d) = DoubleBlock(FLUX), (32, FLUX.dim)
    mesh = sharding.make_mesh({"sequence": 4}, jax.devices()[:4])
    args = ((jnp.ones((1, length, d)), jnp.ones((1, text_len, d))), jnp.ones((1, d)))
    args += (jnp.ones((text_len + length, 8)), jnp.ones((text_len + length, 8)))
    variables = jax.jit(block.init)(jax.random.key(0), *args)
    image = jax.device_put(args[0][0], sharding.logical_sharding(mesh, sharding.DEFAULT_RULES, ("batch", "length")))
    with sharding.active(mesh):
        hlo = jax.jit(block.apply).lower(variables, (image, args[0][1]), *args[1:]).compile().as_text()
    # XLA lowers a tiled all-to-all over 4 devices to one op over 4 pieces of the local shard
    want = collections.Counter({("all-to-all", "f32", "1,8,2,8"): 4})  # image q, k, v, o: [1, 32 / 4, 8 / 4, 8] / 4
    if text_len == 8:
        want[("all-to-all", "f32", "1,2,2,8")] = 4  # text q, k, v, o
    else:
        want[("all-gather", "f32", "1,7,8,8")] = 1  # the replicated text's output, gathered over heads
    assert _collectives(hlo) == want


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    module, params, args, _, _ = _setup("flux", 8)
    forward = lambda p: module.apply({"params": p}, *args)
    three = r"sequence degree 3 must divide the 8 attention heads.* among \[1, 2, 4, 8\]"
    with (
        sharding.active(sharding.make_mesh({"sequence": 3}, jax.devices()[:3])),
        pytest.raises(ValueError, match=three),
    ):
        jax.eval_shape(forward, params)
    with sharding.active(sharding.make_mesh({"sequence": 8, "tensor": 1})):  # 8 heads over 8: one each
        jax.eval_shape(forward, params)
    tensor = r"\(4 per device over tensor=2\).* among \[1, 2, 4\]"
    with (
        sharding.active(sharding.make_mesh({"sequence": 3, "tensor": 2}, jax.devices()[:6])),
        pytest.raises(ValueError, match=tensor),
    ):
        jax.eval_shape(forward, params)


def test_model_flops_do_not_depend_on_the_mesh():
    """The trainer's MFU counts the whole model's FLOPs, also when attention runs split (a shard_map body holds
    one device's share)."""
    module, params, args, _, _ = _setup("flux", 8)
    forward = lambda p, *a: module.apply({"params": p}, *a)
    want = flops.forward_flops(forward, params, *args)
    with sharding.active(sharding.make_mesh({"sequence": 8})):
        assert flops.forward_flops(forward, params, *args) == want
