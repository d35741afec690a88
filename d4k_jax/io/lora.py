"""LoRA files merged into a Flux or SD3 transformer's params: kernel += scale * (alpha / r) * (B @ A)^T, for every
Linear a file targets, through the models' own key maps (models/flux_keys.py, mmdit_keys.py), so that a name means
here what it means when a checkpoint loads: diffusers names (`transformer_blocks.0.attn.to_q`) through the diffusers
map, BFL names (`double_blocks.0.img_attn.qkv`, kohya's `double_blocks_0_img_attn_qkv`) through the BFL single-file
map, whose fused q/k/v (and single blocks' q/k/v/mlp `linear1`) split the up matrix's rows as they split the weight's,
and whose single-block `linear2` splits the down matrix's columns. File layouts and alpha: io/lora_files.py.

Each key-map rule of a Linear turns a torch weight [out, in] into kernels [in_j, out_j] that are its transposed row
and column selections; `selections` reads those selections off the rule itself (by running it on index arrays), so
that the kernel's delta is down_j @ up_j with down_j = A[:, cols_j]^T [in_j, r], up_j = B[rows_j]^T [r, out_j].

Merging (`merge_lora`) checks every file against the model first (names, shapes: one ConversionError per file lists
all that does not match), then adds each kernel's low-rank delta in float32 on the kernel's own devices and casts back
to its dtype, in a jitted function whose output sharding is the kernel's: a sharded model is never gathered, and the
host holds only the factors. Several files (and several modules on one kernel) concatenate along the rank, so each
kernel is rounded once. The merge is not undone (in bf16, subtracting the delta back is not exact): to drop a LoRA,
load the base weights again. Kept separate (unmerged), `factors` become the "lora" collection (d4k_jax/lora.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from d4k_jax.io.components import kind_for, kind_of_module
from d4k_jax.io.load import load_config
from d4k_jax.io.lora_files import LoraFile, Module, read_lora_file
from d4k_jax.models import flux_keys
from d4k_jax.models.keymap import ConversionError, Rule, Shapes, param_shapes

KeyPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a torch Linear weight goes: `leaf` maps it (one layer) to kernels; `layer` is its index in a stack."""

    leaf: Rule
    layer: int | None


@dataclasses.dataclass(frozen=True)
class Update:
    """One kernel (one layer of it, for a stack) that a LoRA module changes: its input rows come from the module's
    down columns `cols`, its output columns from the module's up rows `rows`."""

    path: KeyPath
    layer: int | None
    module: Module
    cols: np.ndarray
    rows: np.ndarray


def tables(module: nn.Module, shapes: Shapes, bfl: bool = True) -> tuple[dict[str, Slot], dict[str, Slot | None]]:
    """({torch Linear name: Slot}, the same with `_` for `.`; None where two names collide) of the transformer's key
    maps: diffusers names, and for Flux (unless `bfl` is False) the BFL single-file names too."""
    kind = kind_of_module(module)
    if kind.name not in ("flux", "mmdit"):
        raise ValueError(f"LoRA files are merged into Flux and SD3 transformers, not a {type(module).__name__}")
    rules = kind.rules(module.config, shapes)
    if kind.name == "flux" and bfl:
        rules = rules + flux_keys.bfl_rules(module.config, shapes)
    dotted: dict[str, Slot] = {}
    for rule in rules:
        for i, leaf in enumerate(rule.layers or (rule,)):
            linear = len(leaf.src) == 1 and leaf.src[0].endswith(".weight") and leaf.dst[0][-1] == "kernel"
            if linear and len(leaf.perm or ()) != 4:  # not a conv kernel
                dotted[leaf.src[0].removesuffix(".weight")] = Slot(leaf, i if rule.layers else None)
    underscored: dict[str, Slot | None] = {}
    for name, slot in dotted.items():
        flat = name.replace(".", "_")
        underscored[flat] = None if flat in underscored else slot
    return dotted, underscored


def plan(lora: LoraFile, module: nn.Module, shapes: Shapes) -> list[Update]:
    """The kernels each module of `lora` changes; one ConversionError lists every module that names no Linear of
    the model, or whose shapes do not fit it (shapes only: no tensor is read)."""
    dotted, underscored = tables(module, shapes)
    sd3 = kind_of_module(module).name == "mmdit"
    updates, unexpected, misshaped = [], [], []
    for raw, m in lora.modules.items():
        if m.kohya and sd3:
            unexpected.append(f"{raw} (kohya-format SD3 LoRAs are not supported: use the diffusers format)")
            continue
        slot = underscored.get(m.name) if m.kohya else dotted.get(m.name) or underscored.get(m.name)
        if slot is None:
            unexpected.append(f"{raw} (no Linear of the {type(module).__name__} is named {m.name!r})")
            continue
        (out, r), (_, n_in) = lora.source.shape(m.up), lora.source.shape(m.down)
        try:
            picked = selections(slot.leaf, out, n_in)
        except (ValueError, IndexError) as e:  # e.g. halves of an odd number of rows
            misshaped.append(f"{raw}: [out {out}, in {n_in}] does not fit {slot.leaf.src[0]} ({e})")
            continue
        for path, (cols, rows) in zip(slot.leaf.dst, picked, strict=True):
            want = tuple(shapes[path][1:] if slot.layer is not None else shapes[path])
            if (len(cols), len(rows)) != want:
                misshaped.append(
                    f"{raw}: up [{out}, {r}] @ down [{r}, {n_in}] -> kernel {(len(cols), len(rows))}, "
                    f"expected {want} ({'/'.join(path)})"
                )
                continue
            updates.append(Update(path, slot.layer, m, cols, rows))
    if unexpected or misshaped:
        raise ConversionError(f"LoRA file {lora.path}", unexpected=unexpected, misshaped=misshaped)
    return updates


def selections(leaf: Rule, out: int, n_in: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(torch columns, torch rows) of each kernel [in_j, out_j] that `leaf` makes from a weight [out, n_in]: the rule
    run on the row and the column index of every element (zero-stride views; float32 holds indices exactly)."""
    rows = leaf.fwd(np.broadcast_to(np.arange(out, dtype=np.float32)[:, None], (out, n_in)))
    cols = leaf.fwd(np.broadcast_to(np.arange(n_in, dtype=np.float32)[None, :], (out, n_in)))
    return [(c[:, 0].astype(np.intp), r[0, :].astype(np.intp)) for r, c in zip(rows, cols, strict=True)]


def is_transpose(leaf: Rule, kernel: tuple[int, ...]) -> bool:
    """Whether `leaf` makes the kernel [..., in, out] from a weight [out, in] by transposing it, nothing else (what a
    trained adapter needs: its down and up are then peft's lora_A and lora_B, transposed)."""
    n_in, out = kernel[-2:]
    try:
        ((cols, rows),) = selections(leaf, out, n_in)
    except (ValueError, IndexError):
        return False
    return np.array_equal(cols, np.arange(n_in)) and np.array_equal(rows, np.arange(out))


def factors(
    planned: Sequence[tuple[LoraFile, float, list[Update]]], shapes: Shapes
) -> dict[KeyPath, tuple[np.ndarray, np.ndarray]]:
    """{kernel path: (down [..., in, R], up [..., R, out])} in float32, each file's `scale` times each module's
    alpha / r folded into up; every module on a kernel (or on one layer of a stack: the other layers get zeros)
    concatenated along the rank R."""
    parts: dict[KeyPath, dict[int | None, list[tuple[np.ndarray, np.ndarray]]]] = {}
    for lora, scale, updates in planned:
        read: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for u in updates:
            m = u.module
            if m.down not in read:  # once per module (a fused one changes several kernels)
                up = np.asarray(lora.source[m.up], np.float32) * np.float32(scale * lora.scale(m))
                read[m.down] = (np.asarray(lora.source[m.down], np.float32), up)
            a, b = read[m.down]
            parts.setdefault(u.path, {}).setdefault(u.layer, []).append((a[:, u.cols].T, b[u.rows].T))
    out = {}
    for path, by_layer in parts.items():
        cat = lambda pairs: (np.concatenate([d for d, _ in pairs], 1), np.concatenate([u for _, u in pairs], 0))
        joined = {layer: cat(pairs) for layer, pairs in by_layer.items()}
        if None in joined:
            out[path] = joined[None]
            continue
        n, (n_in, n_out), rank = shapes[path][0], shapes[path][1:], max(d.shape[1] for d, _ in joined.values())
        down, up = np.zeros((n, n_in, rank), np.float32), np.zeros((n, rank, n_out), np.float32)
        for layer, (d, u) in joined.items():
            down[layer, :, : d.shape[1]], up[layer, : u.shape[0]] = d, u
        out[path] = down, up
    return out


def merge_lora(
    module: nn.Module, params: Any, loras: Sequence[tuple[str | os.PathLike, float]], donate: bool = False
) -> Any:
    """`params` (the transformer's, any dtype and sharding) with every (LoRA file, scale) of `loras` merged in, each
    leaf on its own sharding and in its own dtype. Every file is checked against the model before any is merged.
    `donate`: the changed leaves' buffers are reused (the old arrays are deleted), so that no second copy of them
    is held; without it, both are until the caller drops the old params."""
    flat = traverse_util.flatten_dict(params)
    shapes = {p: tuple(a.shape) for p, a in flat.items()}
    planned = []
    for path, scale in loras:
        lora = read_lora_file(path)
        planned.append((lora, float(scale), plan(lora, module, shapes)))
    for path, (down, up) in factors(planned, shapes).items():
        flat[path] = add_low_rank(flat[path], down, up, donate)
    return traverse_util.unflatten_dict(flat)


def add_low_rank(kernel: Any, down: np.ndarray, up: np.ndarray, donate: bool = False) -> jax.Array:
    """kernel + down @ up, summed in float32 where the kernel lives and cast to its dtype, on its sharding (the
    factors replicated beside it: each device computes only its own shard of the delta)."""
    kernel = kernel if isinstance(kernel, jax.Array) else jnp.asarray(kernel)
    sharding = kernel.sharding
    beside = sharding if sharding.is_fully_replicated else _replicated(sharding)
    down, up = (jax.make_array_from_callback(x.shape, beside, lambda index, x=x: x[index]) for x in (down, up))
    return jax.jit(_add, out_shardings=sharding, donate_argnums=(0,) if donate else ())(kernel, down, up)


def _add(kernel: jax.Array, down: jax.Array, up: jax.Array) -> jax.Array:
    def one(k, d, u):  # [in, out] + [in, R] @ [R, out]
        delta = jnp.einsum("ir,ro->io", d, u, precision=jax.lax.Precision.HIGHEST)
        return (k.astype(jnp.float32) + delta).astype(k.dtype)

    # a stack layer by layer: one layer's float32 delta at a time (FLUX.1-dev's 38 proj_mlp kernels: 5.7 GB at once)
    return one(kernel, down, up) if kernel.ndim == 2 else jax.lax.map(lambda x: one(*x), (kernel, down, up))


def _replicated(sharding: jax.sharding.Sharding) -> NamedSharding:
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"cannot merge a LoRA into a kernel on {sharding}: expected a NamedSharding or one device")
    return NamedSharding(sharding.mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------------------
# The sample CLI's option: --config.lora=PATH[:SCALE][,PATH[:SCALE]...]


def parse_spec(spec: str | None) -> list[tuple[str, float]]:
    """`PATH[:SCALE]` entries separated by commas -> [(path, scale)], scale 1.0 where none is given; '' -> []."""
    out = []
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        path, sep, scale = item.rpartition(":")
        try:
            out.append((path, float(scale)) if sep else (item, 1.0))
        except ValueError:
            out.append((item, 1.0))  # a ':' in the path itself: reported as a missing file if it is not one
    return out


def transformer_shapes(folder: str | os.PathLike) -> tuple[nn.Module | None, Shapes | None]:
    """(module, param shapes) of the transformer in `folder` from its config.json alone (no weights read); (None,
    None) when it cannot be read, a problem reported where the pipeline folder is checked."""
    try:
        cfg = load_config(folder)
        kind = kind_for(cfg, str(folder))
        module = kind.build(kind.config_from(cfg))
        return module, param_shapes(module, kind.init_inputs(module.config))
    except (ValueError, OSError):
        return None, None


def spec_problems(spec: str | None, transformer_folder: str | os.PathLike) -> list[str]:
    """What is wrong with a `--config.lora` value for the transformer of `transformer_folder` (its config.json:
    no weights are read): each file must exist and match the model's names and shapes."""
    if not parse_spec(spec):
        return []
    problems, (module, shapes) = [], transformer_shapes(transformer_folder)
    for path, _ in parse_spec(spec):
        try:
            lora = read_lora_file(path)
            if module is not None:
                updates = plan(lora, module, shapes)
                [lora.scale(u.module) for u in updates]  # a bad alpha fails here, not after the weights load
        except (ValueError, OSError) as e:
            problems.append(f"config.lora={spec!r}: {e} (entries are PATH or PATH:SCALE, separated by commas)")
    return problems
