"""Sharded loading: every parameter is built on its target sharding from the slices its devices hold, read
from the checkpoint as it is placed, so that no device (and no process) ever holds a whole model.

`Placement`, what `load_component(..., sharding=...)` takes, is one of
- a `(mesh, rules)` pair: each parameter sharded by its logical axis names through `rules`
  (`(mesh, d4k_jax.sharding.DEFAULT_RULES)` is FSDP over the mesh's `fsdp` axis);
- a pytree of `jax.sharding.Sharding` with the params' structure (`sharding.params_sharding(...)["params"]`,
  a train state's parameter shardings);
- one `Sharding` for every parameter (replicated over a mesh, or one device).

Host memory, per process: a rule that only permutes axes (`copy`, `linear`, `conv`, `split_input`'s column
windows and `stacked` of them: all of a diffusers-layout model) reads exactly the slice each device needs
(`get_slice`), one distinct shard at a time; a replicated parameter is read whole, once. Any other rule (BFL /
SAI fused qkv `split_linear`, `swap_halves`, tied embeddings, squeezed 1x1 convs, stacks of those) is converted
whole on the host once and sliced per shard: the peak is that one rule's outputs in the checkpoint's dtype (a
stack is converted layer by layer into them), plus one layer's sources and one shard. The largest is FLUX.1-dev's
BFL `single_blocks.*.linear1` (fused q, k, v, mlp) stacked over 38 layers: 38 x 21504 x 3072 bf16, 5.0 GB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, Sharding

from d4k_jax import sharding as shardings_lib
from d4k_jax.io.safetensors_io import Index, TensorSource
from d4k_jax.io.single_file import Prefixed
from d4k_jax.models.keymap import Path, Rule, Shapes, shapes_of

Placement = Sharding | tuple[Mesh, shardings_lib.Rules] | Mapping[str, Any]
Reader = Callable[[Index], np.ndarray]


def resolve(placement: Placement, abstract: Any) -> dict[Path, Sharding]:
    """{parameter path: Sharding} for every parameter of `abstract` (the boxed tree of
    `keymap.abstract_params`, whose logical axis names a `(mesh, rules)` placement maps)."""
    paths = list(traverse_util.flatten_dict(abstract))  # boxed leaves are not dicts: they flatten whole
    if isinstance(placement, Sharding):
        placement = traverse_util.unflatten_dict(dict.fromkeys(paths, placement))
    if isinstance(placement, tuple) and len(placement) == 2 and isinstance(placement[0], Mesh):
        mesh, rules = placement
        placement = shardings_lib.params_sharding(mesh, rules, {"params": abstract})["params"]
    if not isinstance(placement, Mapping):
        raise TypeError(
            f"sharding={placement!r}: expected a (mesh, rules) pair, a pytree of jax.sharding.Sharding shaped like "
            "the params, or one Sharding"
        )
    flat = traverse_util.flatten_dict(placement)
    missing, extra = sorted(set(paths) - set(flat)), sorted(set(flat) - set(paths))
    wrong = sorted(p for p, s in flat.items() if not isinstance(s, Sharding))
    if missing or extra or wrong:
        name = lambda ps: ["/".join(p) for p in ps[:10]]
        raise ValueError(
            f"sharding does not match the params: no sharding for {name(missing)}, no such parameter "
            f"{name(extra)}, not a jax.sharding.Sharding at {name(wrong)} (first 10 of each)"
        )
    uneven = [
        f"{'/'.join(p)} {shape}: {getattr(flat[p], 'spec', flat[p])}"
        for p, shape in shapes_of(abstract).items()
        if not _fits(flat[p], shape)
    ]
    if uneven:
        raise ValueError(
            f"these parameters do not divide evenly over their shards ({len(uneven)}; choose a mesh or rules that "
            f"divide them):\n  " + "\n  ".join(uneven)
        )
    return flat


def _fits(sharding: Sharding, shape: tuple[int, ...]) -> bool:
    try:
        sharding.shard_shape(shape)
    except ValueError:  # jax's IndivisibleError
        return False
    return True


def place(
    source: Mapping[str, Any], rules: list[Rule], shapes: Shapes, shardings: Mapping[Path, Sharding], dtype: Any
) -> dict[Path, jax.Array]:
    """{path: global array on `shardings[path]`, in `dtype`} for every parameter the (already checked) `rules`
    fill from `source`; each process reads only what its addressable devices hold."""
    out = {}
    for rule in rules:
        readers = _slice_readers(source, rule, dtype)
        if readers is not None:
            for path, read in zip(rule.dst, readers, strict=True):
                out[path] = _build(shapes[path], shardings[path], dtype, read)
            continue
        whole = functools.cache(lambda rule=rule: _convert(source, rule))  # freed after the rule
        for i, path in enumerate(rule.dst):
            out[path] = _build(shapes[path], shardings[path], dtype, lambda index, i=i, whole=whole: whole()[i][index])
    return out


def _build(shape: tuple[int, ...], sharding: Sharding, dtype: Any, read: Reader) -> jax.Array:
    """The global array from each addressable device's `read(index)`. Not `jax.make_array_from_callback`, which
    holds every device's slice on the host until it places them all (a whole leaf for one process with 8 GPUs):
    here each distinct slice is read, put on the devices that hold it, and dropped."""
    devices_at: dict[tuple, tuple[Index, list]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop, s.step) for s in index)  # slices are unhashable before Python 3.12
        devices_at.setdefault(key, (index, []))[1].append(device)
    arrays = []
    for index, devices in devices_at.values():
        host = np.asarray(read(index), dtype)
        arrays += [jax.device_put(host, d) for d in devices]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _convert(source: Mapping[str, Any], rule: Rule) -> tuple[np.ndarray, ...]:
    """`rule.fwd` of its sources; a stack layer by layer into its outputs (stacked.fwd would hold every
    layer's sources and outputs at once: twice the rule's size)."""
    if not rule.layers:
        return rule.fwd(*(source[k] for k in rule.src))
    out = None
    for n, layer in enumerate(rule.layers):
        parts = _convert(source, layer)
        if out is None:
            out = tuple(np.empty((len(rule.layers), *p.shape), p.dtype) for p in parts)
        for o, p in zip(out, parts, strict=True):
            o[n] = p
    return out


def _slice_readers(source: Mapping[str, Any], rule: Rule, dtype: Any) -> list[Reader] | None:
    """For each of the rule's outputs, index -> that slice of it, read by the slice: for a rule that only permutes
    the axes of (windows of) its one source, or a stack of such rules, cast layer by layer into `dtype`; None
    for any other rule."""
    layers = rule.layers or (rule,)
    if any(len(r.src) != 1 or r.layers or (r.windows is None and len(r.dst) != 1) for r in layers):
        return None
    perms = [r.permutation(len(_shape(source, r.src[0]))) for r in layers]
    if any(p is None for p in perms):
        return None

    def one(i: int, j: int, index: Index) -> np.ndarray:
        layer, perm = layers[i], perms[i]
        window = layer.windows[j] if layer.windows else (slice(None),) * len(perm)
        at = list(window)
        for axis, s in zip(perm, index, strict=True):  # output axis k is source axis perm[k], within the window
            lo = window[axis].start or 0
            start, stop, _ = s.indices((window[axis].stop or _shape(source, layer.src[0])[axis]) - lo)
            at[axis] = slice(lo + start, lo + stop)
        return read_slice(source, layer.src[0], tuple(at)).transpose(perm)

    def stacked(j: int, index: Index) -> np.ndarray:
        ids = range(*index[0].indices(len(layers)))
        out = None
        for n, i in enumerate(ids):
            part = one(i, j, index[1:])
            if out is None:
                out = np.empty((len(ids), *part.shape), dtype)
            out[n] = part
        return out

    if not rule.layers:
        return [functools.partial(one, 0, j) for j in range(len(rule.dst))]
    return [functools.partial(stacked, j) for j in range(len(rule.dst))]


def read_slice(source: Mapping[str, Any], name: str, index: Index) -> np.ndarray:
    """`source[name][index]`, reading only that slice from a safetensors file (other mappings: in memory)."""
    while isinstance(source, Prefixed):  # a single file's view under a prefix
        source, name = source.source, source.names[name]
    if isinstance(source, TensorSource):
        return source.read(name, index)
    return np.asarray(source[name])[index]


def _shape(source: Mapping[str, Any], name: str) -> tuple[int, ...]:
    return tuple(source.shape(name)) if callable(getattr(source, "shape", None)) else np.shape(source[name])
