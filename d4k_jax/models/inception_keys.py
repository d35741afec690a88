"""torch-fidelity's FID Inception state dict <-> `d4k_jax.models.inception` variables.

The source is the file torch-fidelity downloads, `weights-inception-2015-12-05-6726825d.pth` (users supply
it; nothing here downloads), converted once to a safetensors file with the same keys
(`python -m conversion.pickled FILE.pth`); `d4k_jax.io.metric_nets.load_inception` reads it. Flax paths carry
their collection first: ("params", ..., "conv", "kernel") and ("batch_stats", ..., "bn", "mean"), because the
BatchNorm running statistics are not parameters.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d4k_jax.models.inception import INPUT_SIZE, InceptionV3
from d4k_jax.models.keymap import Rule, conv, copy, linear

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
