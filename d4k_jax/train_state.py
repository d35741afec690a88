"""The sharded train state and the jitted step, built once for the Trainer and for the memory benchmarks.

As in maxtext, the state is first built abstract: `abstract_train_state` gives every leaf as a
jax.ShapeDtypeStruct carrying its NamedSharding, with nothing allocated. From it, `init_train_state`
places real parameters (the Trainer), `make_train_step` jits train_step.train_step with those
shardings, and `lower_train_step` lowers that same jitted step from shapes alone (tools/bench.py's
memory analysis, tests/test_train_memory.py), so the benchmarks measure the program that trains.

Shardings: parameters by the logical rules (their `nn.with_logical_partitioning` names), each optimizer
moment like the parameter it follows, everything else (step counts, the key, the frozen VAE's
parameters, the metrics) replicated, every batch leaf's rows over ("data", "fsdp").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from d4k_jax import sharding
from d4k_jax import train_step as ts

NAN_POLICIES = ("stop", "skip")


def data_sharding(mesh: Mesh) -> NamedSharding:
    """A batch leaf [B, ...]: rows split over data x fsdp, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def abstract_params(model: nn.Module, init_inputs: tuple, mesh: Mesh, rules: sharding.Rules) -> Any:
    """`model`'s parameters as ShapeDtypeStructs carrying their NamedShardings (by `rules`); `init_inputs`
    are any inputs `model.init` accepts (small ones do: parameter shapes do not depend on them)."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), *init_inputs)
    shardings = sharding.params_sharding(mesh, rules, boxed)["params"]
    return jax.tree.map(_with_sharding, nn.unbox(boxed)["params"], shardings)


def abstract_train_state(
    model: nn.Module,
    init_inputs: tuple,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    params: Any = None,
) -> ts.TrainState:
    """TrainState(step [] int32, params, opt_state) of ShapeDtypeStructs with their NamedShardings; nothing
    is allocated. Moments are sharded like the parameters they follow, the rest of the optimizer state
    replicated; a frozen parameter's slot in a masked optimizer's state is an optax.MaskedNode (no leaves).
    `params`: the trained params' ShapeDtypeStructs with shardings, when they are not the model's (LoRA
    adapters, d4k_jax.lora.abstract)."""
    params = abstract_params(model, init_inputs, mesh, rules) if params is None else params
    opt_state = jax.eval_shape(tx.init, params)
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_sharding = optax.tree_map_params(
        tx,
        lambda x, s: x if masked(x) else s,
        opt_state,
        shardings_of(params),
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=masked,
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    return ts.TrainState(step, params, jax.tree.map(_with_sharding, opt_state, opt_sharding))


def shardings_of(tree: Any) -> Any:
    """The `.sharding` of every leaf (ShapeDtypeStructs or arrays), same structure."""
    return jax.tree.map(lambda x: x.sharding, tree)


def init_train_state(params: Any, tx: optax.GradientTransformation, abstract: ts.TrainState) -> ts.TrainState:
    """A real TrainState on `abstract`'s shardings: a copy of `params` (the step donates its state, and the
    caller's arrays must stay valid), `tx.init` of it computed in place, step 0."""
    _check_shapes(params, abstract.params)
    shardings = shardings_of(abstract)
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return ts.TrainState(step, params, opt_state)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_cfg: ts.LossConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    state_sharding: ts.TrainState,
    *,
    vae: nn.Module | None = None,
    microbatches: int = 1,
    encode_passes: int = 1,
    trainable: Any = None,
    nan_policy: str = "stop",
    base_sharding: Any = None,
    lora_dropout: float = 0.0,
) -> Any:
    """The jitted `step(state, batch, key, vae_params, base=None) -> (state, metrics)` the Trainer runs; call or
    lower it
    under `jax.set_mesh(mesh)` (`lower_train_step`). The state is donated and comes back on
    `state_sharding` (NamedShardings like the TrainState, `shardings_of(abstract_train_state(...))`); the
    gradient accumulator of `microbatches` > 1 is held on the parameters' shardings. Metrics (replicated):
    train_step's loss, grad_norm, sigma_mean, plus `finite` (the loss and gradient norm are finite).
    nan_policy 'skip': a step that is not finite keeps the old parameters and optimizer state, the step
    counts; 'stop' returns its result as it is (the caller stops on `finite`). LoRA training: the state's params
    are the adapters and `base` the frozen train_step.Frozen, on `base_sharding` (its shardings, like its
    params'), with `lora_dropout` on the adapters' inputs."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
    options = dict(
        model=model,
        tx=tx,
        cfg=loss_cfg,
        vae=vae,
        microbatches=microbatches,
        encode_passes=encode_passes,
        trainable=trainable,
        param_sharding=state_sharding.params,
        lora_dropout=lora_dropout,
    )

    def step(state, batch, key, vae_params, base=None):
        with nn.logical_axis_rules(rules):
            new, metrics = ts.train_step(state, batch, key, vae_params, base=base, **options)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        if nan_policy == "skip":
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
        return new, {**metrics, "finite": finite}

    return jax.jit(
        step,
        # the base, LoRA's only: jit wants one entry per positional argument given
        in_shardings=(state_sharding, data_sharding(mesh), replicated(mesh), replicated(mesh))
        + (() if base_sharding is None else (base_sharding,)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )


def lower_train_step(
    step: Any, mesh: Mesh, state: ts.TrainState, batch: dict, vae_params: Any = None, base: Any = None
) -> jax.stages.Lowered:
    """`make_train_step`'s step lowered from shapes alone (for `.compile().memory_analysis()`): `state` from
    `abstract_train_state`, `batch` global ShapeDtypeStructs ("image" [B, H, W, 3] or "x0" [B, h, w, C],
    "text" [B, T, D], "pooled" [B, P]), `vae_params` ShapeDtypeStructs or None, `base` (LoRA) the frozen
    train_step.Frozen's; the step's in_shardings place the batch, the key, the VAE parameters and the base."""
    key = jax.eval_shape(jax.random.key, 0)
    with jax.set_mesh(mesh):
        return step.lower(state, batch, key, vae_params, *(() if base is None else (base,)))


def _with_sharding(x: Any, s: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def _check_shapes(params: Any, abstract: Any) -> None:
    """One error naming every parameter whose shape differs from the model's (or that only one side has)."""
    have = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    wrong = [
        f"{k}: given {have.get(k, 'nothing')}, the model has {want.get(k, 'nothing')}"
        for k in sorted(have.keys() | want.keys())
        if have.get(k) != want.get(k)
    ]
    if wrong:
        raise ValueError("the params do not fit the model:\n  " + "\n  ".join(wrong))
