"""LoRA adapters kept separate from a Flux or SD3 transformer's params: which Linear layers they adapt, their
initialisation and shardings, and the "lora" variable collection that `nn.linear.Dense` reads (see its docstring).

Targets are named as peft names them: a target matches a diffusers module name equal to it or ending in "." + it
(`to_q` matches every `transformer_blocks.<i>.attn.to_q`; `transformer_blocks.1.attn.to_q` only one layer). Names
resolve through the models' key maps (io/lora.py's `tables`), so that a name means what it means in a checkpoint;
a module that is not exactly one of our kernels (Flux single blocks' `proj_out`, stored here split in two; a
layer whose rows are permuted) is refused, with every target that matches nothing, in one error.

Layout (the export, io/lora_export.py, reads the same): adapters = {module path: {"down": [..., in, r],
"up": [..., r, out]}} float32, unscaled (peft's lora_A^T and lora_B^T, the layers of a stack leading), and beside
them the fixed `scales` {module path: {"scale": [] or [layers]}}: alpha / r on the layers a target selects, 0 on
the others (which therefore get no gradient). `variables(params, adapters, scales)` is what `apply` takes.

This module is above nn/ and models/ (it needs the key maps), so the layer-level part lives in nn/linear.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from d4k_jax.io import lora as lora_io
from d4k_jax.models.keymap import Shapes
from d4k_jax.nn.linear import LORA

KeyPath = tuple[str, ...]
# the diffusers training scripts' default: attention q/k/v/out of both streams
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float | None = None  # None: alpha = rank (scale 1), as peft
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted Dense: its module path, its kernel's shape ([layers,] in, out) and, for a stack, the layers
    a target selects (None: not stacked)."""

    path: KeyPath
    shape: tuple[int, ...]
    layers: tuple[int, ...] | None


def resolve(module: nn.Module, shapes: Shapes, targets: Sequence[str]) -> list[Target]:
    """The Dense layers `targets` select in `module` (params of `shapes`), sorted by path; one ValueError lists
    every target that matches nothing and every matched module that is not exactly one of our kernels."""
    dotted, _ = lora_io.tables(module, shapes, bfl=False)
    matched: dict[str, list[str]] = {t: [] for t in targets}
    for name in dotted:
        for t in targets:
            if name == t or name.endswith("." + t):
                matched[t].append(name)
    unmatched = [t for t, names in matched.items() if not names]
    selected: dict[KeyPath, set[int] | None] = {}
    refused = []
    for name in sorted({n for names in matched.values() for n in names}):
        slot = dotted[name]
        path = slot.leaf.dst[0] if len(slot.leaf.dst) == 1 else None
        shape = shapes[path][1:] if path and slot.layer is not None else shapes.get(path)
        if path is None or not lora_io.is_transpose(slot.leaf, shape):
            where = ", ".join("/".join(p) for p in slot.leaf.dst)
            refused.append(f"{name} (stored here as {where}: not one kernel of the same layout)")
            continue
        if slot.layer is None:
            selected[path] = None
        else:
            selected.setdefault(path, set()).add(slot.layer)
    if unmatched or refused:
        problems = [f"targets that match no Linear of the {type(module).__name__}: {unmatched}"] if unmatched else []
        problems += [f"modules that are not one kernel here (adapt them merged, or name others): {refused}"] * bool(
            refused
        )
        raise ValueError("LoRA targets: " + "; ".join(problems))
    return [
        Target(path[:-1], tuple(shapes[path]), None if layers is None else tuple(sorted(layers)))
        for path, layers in sorted(selected.items())
    ]


def init(key: jax.Array, targets: Sequence[Target], rank: int) -> dict:
    """peft's initialisation, float32: down U(-1/sqrt(in), 1/sqrt(in)) (lora_A's kaiming_uniform(a=sqrt(5))), up 0."""
    flat = {}
    for i, t in enumerate(targets):
        *lead, n_in, out = t.shape
        bound = 1 / math.sqrt(n_in)
        down = jax.random.uniform(jax.random.fold_in(key, i), (*lead, n_in, rank), jnp.float32, -bound, bound)
        flat[t.path] = {"down": down, "up": jnp.zeros((*lead, rank, out), jnp.float32)}
    return _nested(flat)


def scales(targets: Sequence[Target], scale: float) -> dict:
    """{module path: {"scale": [] or [layers]}} float32: `scale` on the selected layers, 0 on the others."""
    flat = {}
    for t in targets:
        if t.layers is None:
            flat[t.path] = {"scale": np.float32(scale)}
        else:
            s = np.zeros(t.shape[0], np.float32)
            s[list(t.layers)] = scale
            flat[t.path] = {"scale": s}
    return _nested(flat)


def abstract(adapters: dict, params: Any) -> dict:
    """`adapters` (arrays or ShapeDtypeStructs, e.g. jax.eval_shape of `init`) as float32 ShapeDtypeStructs whose
    NamedShardings follow each base kernel's in `params` (ShapeDtypeStructs or arrays on NamedShardings): down the
    kernel's (layers?, in) partitioning and a whole rank axis, up a whole rank axis and the kernel's out one."""
    kernels = traverse_util.flatten_dict(params)
    flat = {}
    for path, leaves in _by_module(adapters).items():
        kernel = kernels[(*path, "kernel")]
        down, up = adapter_shardings(kernel.sharding, len(kernel.shape))
        shaped = lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s)
        flat[path] = {"down": shaped(leaves["down"], down), "up": shaped(leaves["up"], up)}
    return _nested(flat)


def adapter_shardings(kernel: jax.sharding.Sharding, ndim: int) -> tuple[Any, Any]:
    """(down's, up's) sharding beside a kernel of rank `ndim` on `kernel` (another kind of sharding: the same)."""
    if not isinstance(kernel, NamedSharding):
        return kernel, kernel
    spec = (*kernel.spec, *(None,) * (ndim - len(kernel.spec)))
    down, up = PartitionSpec(*spec[:-1], None), PartitionSpec(*spec[:-2], None, spec[-1])
    return NamedSharding(kernel.mesh, down), NamedSharding(kernel.mesh, up)


def variables(params: Any, adapters: dict | None, scale_tree: dict | None = None) -> dict:
    """What `module.apply` takes: {"params": params} and, with adapters, the "lora" collection (adapters' down and
    up beside `scale_tree`'s scales; without one, each adapter's scale is 1)."""
    if not adapters:
        return {"params": params}
    flat = traverse_util.flatten_dict(adapters)
    scale = traverse_util.flatten_dict(scale_tree or {})
    for (*path, leaf), x in list(flat.items()):
        if leaf == "down" and (*path, "scale") not in scale:
            scale[(*path, "scale")] = jnp.ones(x.shape[:-2], jnp.float32)
    return {"params": params, LORA: traverse_util.unflatten_dict(flat | scale)}


def from_factors(factors: dict[KeyPath, tuple[np.ndarray, np.ndarray]]) -> dict:
    """io/lora.py's `factors` ({kernel path: (down, up)}, scale folded into up) as adapters with scale 1."""
    flat = {}
    for path, (down, up) in factors.items():
        flat[path[:-1]] = {"down": down, "up": up, "scale": np.ones(down.shape[:-2], np.float32)}
    return _nested(flat)


def concatenate(a: dict | None, b: dict) -> dict:
    """Two "lora" collections as one: each adapter's scale folded into its up, then the ranks concatenated."""
    if not a:
        return b
    fa, fb = (_by_module(x) for x in (a, b))
    out = {}
    for path in fa.keys() | fb.keys():
        parts = [_folded(f[path]) for f in (fa, fb) if path in f]
        down = jnp.concatenate([jnp.asarray(d) for d, _ in parts], -1)
        up = jnp.concatenate([jnp.asarray(u) for _, u in parts], -2)
        out[path] = {"down": down, "up": up, "scale": jnp.ones(down.shape[:-2], jnp.float32)}
    return _nested(out)


def _folded(leaves: dict) -> tuple[Any, Any]:
    return leaves["down"], jnp.asarray(leaves["up"]) * jnp.asarray(leaves["scale"])[..., None, None]


def place(collection: dict, params: Any) -> dict:
    """A host "lora" collection on devices beside `params`' kernels (`adapter_shardings`; scales replicated on the
    kernel's mesh). Each process builds only the shards it holds."""
    kernels = traverse_util.flatten_dict(params)
    out = {}
    for path, leaves in _by_module(collection).items():
        kernel = kernels[(*path, "kernel")]
        sharding = getattr(kernel, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        down, up = adapter_shardings(sharding, kernel.ndim)
        scale = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding
        placed = {}
        for name, s in (("down", down), ("up", up), ("scale", scale)):
            x = np.asarray(leaves[name], np.float32)
            placed[name] = jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])
        out[path] = placed
    return _nested(out)


def _by_module(tree: dict) -> dict[KeyPath, dict]:
    flat = traverse_util.flatten_dict(tree)
    out: dict[KeyPath, dict] = {}
    for (*path, leaf), x in flat.items():
        out.setdefault(tuple(path), {})[leaf] = x
    return out


def _nested(by_module: dict[KeyPath, dict]) -> dict:
    return traverse_util.unflatten_dict({(*p, k): v for p, leaves in by_module.items() for k, v in leaves.items()})


# ---------------------------------------------------------------------------------------------------------
# The training config's `train.lora` (configs/training.py)


def from_config(c: Any) -> LoraConfig | None:
    """`train.lora` (rank, alpha, dropout, targets as a comma-separated string, "" for the default) as a LoraConfig;
    None for rank 0 (full fine-tuning)."""
    if not c or not c.get("rank"):
        return None
    targets = tuple(t.strip() for t in (c.get("targets") or "").split(",") if t.strip()) or DEFAULT_TARGETS
    alpha = c.get("alpha")
    return LoraConfig(int(c["rank"]), None if alpha is None else float(alpha), float(c.get("dropout") or 0), targets)


def train_problems(c: Any, transformer_folder: str | os.PathLike | None) -> list[str]:
    """`config_problems` of `train.lora` against the transformer of `transformer_folder` (its config.json only)."""
    module = shapes = None
    if c and c.get("rank") and transformer_folder:
        module, shapes = lora_io.transformer_shapes(transformer_folder)
    return config_problems(c, module, shapes)


def config_problems(c: Any, module: nn.Module | None, shapes: Shapes | None) -> list[str]:
    """What is wrong with `train.lora` `c`, its targets checked against the transformer `module` (params of
    `shapes`; None: not checked, the pipeline's own problems are reported elsewhere)."""
    if not c:
        return []
    rank, alpha, dropout = c.get("rank"), c.get("alpha"), c.get("dropout")
    problems = []
    if not isinstance(rank, int) or rank < 0:
        problems.append(f"train.lora.rank={rank!r}: expected an integer >= 0 (0: full fine-tuning)")
    if alpha is not None and (not isinstance(alpha, int | float) or alpha <= 0):
        problems.append(f"train.lora.alpha={alpha!r}: expected a positive number, or None (the rank)")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        problems.append(f"train.lora.dropout={dropout!r}: expected a number in [0, 1)")
    if not problems and rank and module is not None:
        try:
            resolve(module, shapes, from_config(c).targets)
        except ValueError as e:
            problems.append(f"train.lora.targets={c.get('targets')!r}: {e}")
    return problems
