"""torch-fidelity's FID Inception state dict <-> `d4k_jax.models.inception` variables.

The source is the file torch-fidelity downloads, `weights-inception-2015-12-05-6726825d.pth` (users supply
it; nothing here downloads), or a safetensors file with the same keys (see `export`), which loads
without torch. Flax paths carry their collection first: ("params", ..., "conv", "kernel") and
("batch_stats", ..., "bn", "mean"), because the BatchNorm running statistics are not parameters.

    python -m conversion.inception SRC.pth DST.safetensors   # convert once; later runs need no torch
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from conversion.load import read_state_dict
from conversion.rules import Rule, conv, copy, linear, to_flax, to_torch
from conversion.safetensors_io import save_file
from d4k_jax.models.inception import INPUT_SIZE, InceptionV3

Shapes = dict[tuple[str, ...], tuple[int, ...]]
_LEAVES = {  # (collection, Flax leaf) -> (torch suffix, rule)
    ("params", "kernel"): ("weight", None),  # conv or linear, by rank
    ("params", "scale"): ("weight", copy),
    ("params", "bias"): ("bias", copy),
    ("batch_stats", "mean"): ("running_mean", copy),
    ("batch_stats", "var"): ("running_var", copy),
}


def variable_shapes(module: InceptionV3) -> Shapes:
    """{(collection, *path): shape} of every variable, from `jax.eval_shape` (no memory used)."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    return {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(nn.unbox(abstract)).items()}


def checkpoint_rules(shapes: Mapping[tuple[str, ...], tuple[int, ...]], keys: Collection[str] = ()) -> list[Rule]:
    """The key map for a state dict holding `keys`; with no keys, the names `export` writes.

    torch state dicts also hold each BatchNorm's `num_batches_tracked` counter, which inference does
    not use: read and dropped when present (torch fills it in when loading a file without it).
    """
    rules = []
    for path, shape in shapes.items():
        collection, *mods, leaf = path
        suffix, rule = _LEAVES.get((collection, leaf), (None, None))
        if suffix is None:
            raise ValueError(f"no torch name for variable {'/'.join(path)}")
        if rule is None:
            rule = conv if len(shape) == 4 else linear
        rules.append(rule(".".join([*mods, suffix]), path))
    for key in sorted(k for k in keys if k.endswith(".num_batches_tracked")):
        rules.append(Rule((key,), (), lambda n: (), lambda: (np.zeros((), np.int64),)))
    return rules


def load_inception(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[InceptionV3, dict]:
    """(module, variables) for `module.apply(variables, images)`; strict about every key and shape."""
    module = InceptionV3(dtype=dtype, param_dtype=param_dtype)
    shapes = variable_shapes(module)
    source = read_state_dict(path, "the FID Inception weights")
    flat = to_flax(source, checkpoint_rules(shapes, frozenset(source)), shapes, what=str(path))
    # Running statistics stay float32: they are tiny and bf16 would shift every BatchNorm.
    cast = {p: jnp.asarray(a, param_dtype if p[0] == "params" else jnp.float32) for p, a in flat.items()}
    return module, traverse_util.unflatten_dict(cast)


def export(variables: Mapping, dst: str | os.PathLike) -> Path:
    """Write `variables` as a safetensors file with torch-fidelity's key names (which `load_inception`
    and torch's `load_state_dict` both read)."""
    flat = {p: np.asarray(a, np.float32) for p, a in traverse_util.flatten_dict(dict(variables)).items()}
    tensors = to_torch(flat, checkpoint_rules({p: a.shape for p, a in flat.items()}))
    save_file(tensors, Path(dst), metadata={"format": "pt"})
    return Path(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m conversion.inception SRC.pth DST.safetensors")
    print(export(load_inception(sys.argv[1])[1], sys.argv[2]))
