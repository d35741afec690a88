"""fused_qkv (nn.joint_attention: q/k/v, and Flux's single-block proj_mlp, as one matmul per stream) equals the
unfused layers with the same parameters: the parameter tree, the forward and the gradients of an SD3 block, a Flux
double and a Flux single block at fp32, and a single block sharded fsdp x tensor, whose compiled collectives
differ only in how the fused kernel is gathered (no activation is gathered for it)."""

import collections
import dataclasses
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER_TOL, rel_err
from tiny_configs import tiny_flux, tiny_sd35

from d4k_jax import sharding
from d4k_jax.models.flux import DoubleBlock, SingleBlock
from d4k_jax.models.mmdit import JointBlock
from d4k_jax.nn.joint_attention import fused_dense, fused_kernel

# 4 heads of 8, so that tensor=2 splits them; SD3.5-shaped (qk-norm, a dual-attention block)
FLUX, SD3 = tiny_flux(heads=4), tiny_sd35(heads=4)
IMAGE, TEXT = 16, 5


def _block(kind: str, fused: bool) -> nn.Module:
    if kind == "sd3":
        return JointBlock(dataclasses.replace(SD3, fused_qkv=fused), dual=True)
    cfg = dataclasses.replace(FLUX, fused_qkv=fused)
    return DoubleBlock(cfg) if kind == "flux double" else SingleBlock(cfg)


def _inputs(kind: str) -> tuple:
    rng = np.random.default_rng(len(kind))
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    d = SD3.dim if kind == "sd3" else FLUX.dim
    args = ((f32(2, IMAGE, d), f32(2, TEXT, d)), f32(2, d))
    return args if kind == "sd3" else (*args, f32(TEXT + IMAGE, 8), f32(TEXT + IMAGE, 8))  # + rope cos, sin


def _params(block: nn.Module, args: tuple):
    """Random parameters of the block's tree (no eager init: it would compile op by op)."""
    rng = np.random.default_rng(1)
    shapes = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), *args)["params"])
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


# the gradients of both Flux blocks (each costs a backward compile): separate text projections, and shared ones
# with proj_mlp joined; SD3's forward (qk-norm, and the image-only second attention of a dual block)
@pytest.mark.parametrize(("kind", "grads"), [("sd3", False), ("flux double", True), ("flux single", True)])
def test_fused_block_equals_unfused(kind, grads):
    args = _inputs(kind)
    plain, fused = _block(kind, False), _block(kind, True)
    shapes = lambda block: jax.tree.map(jnp.shape, jax.eval_shape(block.init, jax.random.key(0), *args))
    assert shapes(fused) == shapes(plain)  # the same parameter tree, logical axes included
    params = _params(plain, args)

    def run(block):
        def f(p, carry):
            out = block.apply({"params": p}, carry, *args[1:])[0]
            return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out)), out

        if not grads:
            return jax.jit(lambda p, carry: (f(p, carry), None))(params, args[0])
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, args[0])

    ((_, want), want_grads), ((_, got), got_grads) = run(plain), run(fused)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < LAYER_TOL
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert rel_err(g, w) < LAYER_TOL, jax.tree_util.keystr(path)


def test_fused_kernel_keeps_each_head_together():
    """Head n's columns of every layer sit at [:, n, :]: a split of N over `tensor` gives each shard its own q, k,
    v (and MLP) columns; a bias-free layer adds zeros."""
    d, heads = 3, 2
    q, k = (jnp.arange(d * heads * 2, dtype=jnp.float32).reshape(d, heads * 2) + s for s in (0, 100))
    mlp = jnp.arange(d * heads * 3, dtype=jnp.float32).reshape(d, heads * 3) + 1000
    kernel, bias, widths = fused_kernel([(q, jnp.ones(4)), (k, None), (mlp, jnp.ones(6))], heads, jnp.float32)
    assert kernel.shape == (d, heads, 7) and widths == [2, 2, 3]
    np.testing.assert_array_equal(kernel[:, 1], jnp.concatenate([q[:, 2:], k[:, 2:], mlp[:, 3:]], -1))
    np.testing.assert_array_equal(bias[1], [1, 1, 0, 0, 1, 1, 1])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, d)), jnp.float32)
    outs = fused_dense(x, (kernel, bias, widths))
    np.testing.assert_allclose(outs[2].reshape(1, 2, 6), x @ mlp + 1, rtol=1e-6)
    with pytest.raises(ValueError, match=r"kernel \(3, 5\) is not \[3, 2 heads x C\]"):
        fused_kernel([(jnp.zeros((d, 5)), None)], heads, jnp.float32)


def _collectives(hlo: str) -> collections.Counter:
    ops = re.findall(r"= \(?(\w+)\[([\d,]*)\][^=]*? (all-to-all|all-gather|all-reduce|collective-permute)\(", hlo)
    return collections.Counter((kind, shape) for _, shape, kind in ops)


def test_fused_single_block_sharded_gathers_only_the_same_weights():
    """fsdp 2 x tensor 2: the fused single block (q, k, v and proj_mlp in one kernel, shared by both streams)
    equals the unfused one, and compiles to the same collectives but for the gathers of the in-projection
    kernels ([D, ...], fsdp-split on D): one gather of the fused kernel, as many elements as the four."""
    kind, d = "flux single", FLUX.dim
    args = _inputs(kind)
    plain, fused = _block(kind, False), _block(kind, True)
    params, mesh = _params(plain, args), sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    abstract = jax.eval_shape(plain.init, jax.random.key(0), *args)
    placed = jax.device_put(params, sharding.params_sharding(mesh, sharding.DEFAULT_RULES, abstract)["params"])
    want = jax.jit(plain.apply)({"params": params}, *args)[0]
    found = {}
    for name, block in (("plain", plain), ("fused", fused)):
        with sharding.active(mesh):
            compiled = jax.jit(block.apply).lower({"params": placed}, *args).compile()
            got = compiled({"params": placed}, *args)[0]
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert rel_err(g, w) < LAYER_TOL, name
        found[name] = _collectives(compiled.as_text())
    # q, k, v [D, N K / tensor] and proj_mlp [D, F / tensor] (fsdp-split on D) vs the fused [D, N / tensor, 3 K + F / N]
    only_plain, only_fused = found["plain"] - found["fused"], found["fused"] - found["plain"]
    assert only_plain == {("all-gather", f"{d},16"): 3, ("all-gather", f"{d},64"): 1}, only_plain
    assert only_fused == {("all-gather", f"{d},2,56"): 1}, only_fused
    elements = lambda gathers: sum(np.prod([int(s) for s in shape.split(",")]) * n for (_, shape), n in gathers.items())
    assert elements(only_fused) == elements(only_plain)


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_the_config_flag_reaches_the_transformer(model, monkeypatch):
    """`--config.fused_qkv=True` (sampling and training configs) is a load override of the transformer, which
    the loader accepts and the model config takes."""
    from absl import flags
    from ml_collections import config_flags

    from configs.training import DEMO_PIPELINES
    from d4k_jax import sample, train
    from d4k_jax.io import load_component
    from d4k_jax.pipelines import pipeline_class

    root = Path(__file__).resolve().parent.parent
    argv = ["prog", f"--config={root}/configs/{model}_wlf.py:tiny", "--config.fused_qkv=True"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    c = values.config
    c.pipeline = DEMO_PIPELINES[model]
    seen = []
    monkeypatch.setattr(pipeline_class(model), "from_pretrained", lambda *a, **kw: seen.append(kw))
    sample.load_pipeline(c)
    train._pipeline(c, c.pipeline, sharding.make_mesh({"data": 1}, jax.devices()[:1]), sharding.DEFAULT_RULES)
    assert [kw["fused_qkv"] for kw in seen] == [True, True]
    module, _ = load_component(f"{DEMO_PIPELINES[model]}/transformer", fused_qkv=True)
    assert module.config.fused_qkv is True
