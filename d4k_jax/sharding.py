"""Meshes and logical-axis sharding.

Models name every parameter and activation axis logically ("batch", "height", "embed", ...); the rules
that map those names to the mesh axes `data`, `fsdp`, `sequence`, `tensor` are config data, so the
same model runs data-parallel, FSDP or spatially sharded by changing a config, not the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Data-parallel over data x fsdp, parameters FSDP-sharded on their embed axis, image rows on `sequence`.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("height", "sequence"),
    ("width", None),
    ("channels", None),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("vocab", None),
    ("conv_in", None),
    ("conv_out", None),
)


def make_mesh(
    shape: dict[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    dcn: dict[str, int] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all) with axes MESH_AXES; one size may be -1 (the rest).

    `dcn` spreads axes over granules, the units joined by the slower network (hosts of a GPU cluster, slices
    of a TPU pod; see `granules`): dcn[a] ways of axis a go across granules and `shape` is then the mesh
    within one granule (axis a has shape[a] x dcn[a] devices in all, as MaxText's ici_* x dcn_*). One dcn
    size may be -1 (the rest of the granules). When the dcn sizes multiply to 1 (one granule, or dcn={}),
    `shape` covers every device, as without `dcn`.
    """
    devices = list(devices or jax.devices())
    groups = granules(devices)
    ici, across = resolve_mesh(shape or {"data": -1}, dcn or {}, len(devices), len(groups))
    if int(np.prod(list(across.values()))) == 1:
        return jax.make_mesh(
            tuple(ici[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
        )
    array = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES],
        [across[a] for a in MESH_AXES],
        devices,
        process_is_granule=granule_attribute(devices) == "process_index",
    )
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def granule_attribute(devices: Sequence[jax.Device]) -> str:
    """What makes a granule: TPU slices (`slice_index`), else processes (one per host on GPU clusters)."""
    return "slice_index" if devices[0].platform == "tpu" else "process_index"  # CPU devices have slice_index 0


def granules(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """`devices` grouped by granule (see granule_attribute), in granule order."""
    attr, groups = granule_attribute(devices), {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return [groups[k] for k in sorted(groups)]


def resolve_mesh(
    shape: dict[str, int], dcn: dict[str, int], num_devices: int, num_granules: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(sizes within a granule, sizes across granules) of every axis, each -1 resolved; a ValueError names
    what does not fit. With one granule's worth of dcn (sizes multiplying to 1), `shape` covers all devices."""
    for name, sizes in (("mesh", shape), ("mesh dcn", dcn)):
        unknown = set(sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown {name} axes {sorted(unknown)}; the axes are {MESH_AXES}")
    spans_granules = any(v != 1 for v in dcn.values())  # else one mesh over every device, even on several hosts
    across = _resolved(dcn, num_granules, "hosts / slices") if spans_granules else _resolved({}, 1, "")
    ways = int(np.prod(list(across.values())))
    return _resolved(shape, num_devices // ways, "devices" if ways == 1 else "devices per granule"), across


def filled_sizes(sizes: Mapping[str, int], total: int) -> dict[str, int]:
    """Every axis's size, absent ones 1 and a -1 the rest of `total` (not checked: see resolve_mesh)."""
    sizes = {a: 1 for a in MESH_AXES} | dict(sizes)
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    return {a: (total // fixed if s == -1 else s) for a, s in sizes.items()}


def _resolved(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    sizes = filled_sizes(sizes, total)
    if int(np.prod(list(sizes.values()))) != total:
        need = int(np.prod(list(sizes.values())))
        raise ValueError(f"mesh {sizes} needs {need} {what}, have {total}: expected sizes whose product is {total}")
    return sizes


def logical_sharding(mesh: Mesh, rules: Rules, axes: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of an array whose axes have these logical names."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def params_sharding(mesh: Mesh, rules: Rules, abstract_variables: Any) -> Any:
    """Shardings for a (boxed) variable tree from `jax.eval_shape(module.init, ...)`."""
    specs = nn.get_partition_spec(abstract_variables)
    specs = nn.logical_to_mesh(specs, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


@contextlib.contextmanager
def active(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Trace under `mesh` and `rules`: the models' logical constraints resolve onto the mesh and their
    attention runs sequence-parallel where "length" is split (nn.ulysses); e.g. around a pipeline call."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@contextlib.contextmanager
def inactive() -> Iterator[None]:
    """Trace as if no mesh were set, inside an `active` one: logical constraints and sequence-parallel
    attention are off (text encoders placed on one device; counting the whole model's FLOPs)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        yield


def sharded(fn: Callable, mesh: Mesh, rules: Rules, in_axes: Sequence[Any], out_axes: Any) -> Callable:
    """jit `fn` with inputs and outputs sharded by logical axis names (None for replicated leaves).

    Inside, `nn.with_logical_constraint` annotations resolve through the same `rules`.
    """

    def to_sharding(axes):
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(lambda a: logical_sharding(mesh, rules, a), axes, is_leaf=_is_axes)

    def wrapped(*args):
        with nn.logical_axis_rules(rules):
            return fn(*args)

    jitted = jax.jit(wrapped, in_shardings=tuple(to_sharding(a) for a in in_axes), out_shardings=to_sharding(out_axes))

    def call(*args):
        with active(mesh, rules):
            return jitted(*args)

    call.lower = lambda *args: _lower(jitted, mesh, rules, args)
    return call


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _lower(jitted, mesh, rules, args):
    with active(mesh, rules):
        return jitted.lower(*args)


def sync_processes(name: str) -> None:
    """Every process waits here until all have reached `name` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
