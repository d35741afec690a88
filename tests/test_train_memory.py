"""The full train step (images encoded by the frozen VAE inside it, AdamW, remat) lowers and compiles
FSDP-sharded from abstract shapes alone, with a memory analysis: what `tools.bench train_memory` does at
full size (figures in BENCHMARKS.md), here on a tiny Flux and VAE over the fake CPU devices, with the
Trainer's own state and step (d4k_jax.train_state). The microbatch gradient accumulator is pinned to the
parameters' shardings; the abstract state is the one the Trainer allocates."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from tiny_configs import tiny_flux

from d4k_jax import sharding, train_state
from d4k_jax import train_step as ts
from d4k_jax.models.flux import Flux
from d4k_jax.models.vae import AutoencoderKL, VAEConfig
from d4k_jax.sharding import MESH_AXES, make_mesh
from tools.bench import _per_device_bytes, train_step_lowered
from tools.collectives import collectives


def _flux() -> Flux:
    return Flux(tiny_flux(heads=2, remat="full"), dtype=jnp.bfloat16, param_dtype=jnp.float32)


_SMALL = (jnp.zeros((1, 2, 2, 4)), jnp.zeros(1), jnp.zeros((1, 5, 24)), jnp.zeros((1, 12)), jnp.zeros(1))


def _compile(n: int, per_device: int = 2, mesh: Mesh | None = None):
    module = _flux()
    vae = AutoencoderKL(
        VAEConfig(latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4, stride=2), dtype=jnp.bfloat16
    )
    b, sds = per_device * n, jax.ShapeDtypeStruct
    batch = {
        "image": sds((b, 32, 32, 3), jnp.uint8),  # as the loader ships them
        "text": sds((b, 5, 24), jnp.bfloat16),
        "pooled": sds((b, 12), jnp.bfloat16),
    }
    mesh = mesh or make_mesh({"data": 1, "fsdp": n}, jax.devices()[:n])
    lowered, state = train_step_lowered(
        module,
        _SMALL,
        ts.optimizer(),
        ts.LossConfig(),
        mesh,
        batch,
        vae=vae,
        vae_small=(jnp.zeros((1, 16, 16, 3)),),
        encode_passes=per_device,
    )
    return lowered.compile(), state


def test_sharded_train_step_with_images_compiles_with_a_memory_analysis():
    compiled, state = _compile(8)
    m = compiled.memory_analysis()
    held = _per_device_bytes((state.params, state.opt_state))
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    assert m.argument_size_in_bytes >= held > 0  # the state is an argument of the step...
    assert m.alias_size_in_bytes >= 0.9 * held  # ...donated: the new state reuses its buffers
    assert m.temp_size_in_bytes > 0
    # FSDP: the fp32 params and AdamW moments are spread over the 8 devices (at this tiny width the
    # replicated biases, norms and 256-wide timestep kernels are a large share; at full size they are not)
    assert held < whole / 2
    kernel = state.params["x_embedder"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (16, 2)


def test_a_hybrid_mesh_keeps_fsdp_within_each_host():
    """train.mesh_dcn's default on 2 hosts of 4 devices: data parallel across the hosts, FSDP within each
    (laid out as sharding.make_mesh lays it out, host h holding devices 4h..4h+3 of the mesh order). The
    FSDP all-gathers of the compiled step stay within a host; only all-reduces (the gradients' data-parallel
    sum) cross hosts. FSDP over all 8 devices gathers across hosts."""
    hybrid = Mesh(np.array(jax.devices()).reshape(2, 4, 1, 1), MESH_AXES)
    found = collectives(_compile(8, mesh=hybrid)[0].as_text(), host_size=4)
    crossing = {kind for kind, ops in found.items() for where, _ in ops if where == "across hosts"}
    assert crossing == {"all-reduce"}, found  # XLA:CPU has no reduce-scatter: an all-reduce then a slice
    assert ("within a host", 4) in found["all-gather"], found  # the FSDP gathers of the parameters
    assert ("across hosts", 2) in found["all-reduce"], found  # FSDP-sharded gradients summed over the 2 hosts
    flat = collectives(_compile(8)[0].as_text(), host_size=4)
    assert ("across hosts", 8) in flat["all-gather"], flat


def test_the_microbatch_gradient_accumulator_is_held_on_the_param_shardings():
    """microbatches > 1: the fp32 carry of the accumulation scan is constrained to each parameter's FSDP
    sharding, where it starts and after every microbatch, instead of left to XLA's propagation (which could
    hold a whole fp32 copy of the gradients on every device). Checked on the step's jaxpr, without compiling."""
    module = _flux()
    mesh = make_mesh({"data": 1, "fsdp": 8})
    tx = ts.optimizer()
    state = train_state.abstract_train_state(module, _SMALL, tx, mesh)
    shardings = train_state.shardings_of(state.params)
    params = state.params
    sds = jax.ShapeDtypeStruct
    batch = {
        "x0": sds((16, 4, 4, 4), jnp.float32),
        "text": sds((16, 5, 24), jnp.float32),
        "pooled": sds((16, 12), jnp.float32),
    }
    step = train_state.make_train_step(
        module, tx, ts.LossConfig(), mesh, sharding.DEFAULT_RULES, train_state.shardings_of(state), microbatches=2
    )
    with jax.set_mesh(mesh):  # the Trainer's own step, traced as it is lowered
        jaxpr = step.trace(state, batch, jax.eval_shape(jax.random.key, 0), None).jaxpr.jaxpr
    constrained = lambda eqns: collections.Counter(
        (e.invars[0].aval.shape, e.invars[0].aval.dtype, e.params["sharding"])
        for e in eqns
        if e.primitive.name == "sharding_constraint"
    )
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True)
    want = collections.Counter((p.shape, jnp.dtype(jnp.float32), s) for p, s in leaves)
    assert any(s.spec != jax.sharding.PartitionSpec() for _, _, s in want)  # really FSDP-sharded
    # the carry after each microbatch (the model's own activation and RoPE-table constraints left out)
    in_body = constrained(scan.params["jaxpr"].jaxpr.eqns)
    assert collections.Counter({k: n for k, n in in_body.items() if k in want}) == want
    assert constrained(jaxpr.eqns) >= want  # the zeros it starts from


def test_the_abstract_state_is_the_state_the_trainer_allocates():
    """Same structure, shapes, dtypes and shardings, a masked optimizer's MaskedNode slots included; the
    caller's params are copied (the step donates the state)."""
    module = _flux()
    mesh = make_mesh({"data": 2, "fsdp": 4})
    params = jax.jit(lambda k: nn.unbox(module.init(k, *_SMALL))["params"])(jax.random.key(0))
    trainable = jax.tree.map(lambda _: True, params)
    trainable["x_embedder"]["bias"] = False
    tx = ts.optimizer(trainable=trainable)
    abstract = train_state.abstract_train_state(module, _SMALL, tx, mesh)
    state = train_state.init_train_state(params, tx, abstract)
    describe = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), t)
    assert describe(state) == describe(abstract)
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
    assert any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(state.opt_state, is_leaf=_is_masked))
    assert state.params["x_embedder"]["kernel"] is not params["x_embedder"]["kernel"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(params))
    assert int(state.step) == 0


def test_params_that_do_not_fit_the_model_are_named():
    module = _flux()
    mesh = make_mesh({"fsdp": 8})
    abstract = train_state.abstract_train_state(module, _SMALL, ts.optimizer(), mesh)
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract.params)
    params["x_embedder"]["kernel"] = np.zeros((3, 3), np.float32)
    del params["x_embedder"]["bias"]
    with pytest.raises(
        ValueError, match=r"(?s)\['x_embedder'\]\['bias'\]: given nothing.*\['kernel'\]: given \(3, 3\)"
    ):
        train_state.init_train_state(params, ts.optimizer(), abstract)


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)
