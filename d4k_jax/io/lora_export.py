"""LoRA adapters of a Flux or SD3 transformer written as one diffusers-format safetensors file: the file diffusers'
`save_lora_weights` writes and its `load_lora_weights` / `load_lora_adapter` (and io/lora_files.py here) read.

Adapters (the layout training keeps them in): a nested dict that mirrors the transformer's params down to each adapted
Dense (its kernel's path less "kernel"), with leaves `down` [in, r] and `up` [r, out] (peft's lora_A^T and lora_B^T,
unscaled) and, optionally, `scale` []; inside a stack (nn.scan) every leaf has the leading layer axis: [L, in, r],
[L, r, out], [L]. `scale` only selects layers: a layer whose scale is 0 is not written, and the value of a non-zero
one is not either, for the file's delta is alpha / r * B @ A as peft's (fold any other per-layer factor into `up`).

Keys: `transformer.<diffusers Linear name>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], float32. The name of
an adapter (one layer of it, in a stack) is the diffusers Linear whose key-map rule (models/flux_keys.py,
mmdit_keys.py, the maps checkpoints load through) fills exactly that kernel (layer) with its weight, transposed and
nothing else (io/lora.py's `is_transpose`); an adapter with no such name (Flux
single blocks' proj_out_attn / proj_out_mlp: diffusers' proj_out is one Linear over both) or a shape that does not fit
its kernel is an error, all of them listed in one ConversionError.

alpha, as diffusers 0.42 records it: the file's `lora_adapter_metadata` holds the adapter's peft LoraConfig as JSON,
each key under `transformer.` (`_save_lora_weights` packs each component's config with its prefix), beside
`format: pt`; `lora_alpha` is `alpha`, `r` the most common rank and `rank_pattern` the others (`^<name>` keys, as
diffusers writes them), and `target_modules` a regular expression that matches exactly the modules written (peft
full-matches a string; a list would also match other modules that end in a written name, e.g. every single block's
`proj_out` for Flux's top-level `proj_out`).

Sharded adapters: an array that this process does not hold whole is gathered with `process_allgather` (every process
must call `save_lora`, in the same order of adapters: the gathers are collective); only process 0 writes the file (to a
temporary name, then renamed), and the others wait for it (d4k_jax/distributed.py's barrier) before returning.
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from d4k_jax import distributed
from d4k_jax.io.components import kind_of_module
from d4k_jax.io.lora import KeyPath, is_transpose, tables
from d4k_jax.io.lora_files import METADATA_KEY
from d4k_jax.io.safetensors_io import save_file
from d4k_jax.models.keymap import ConversionError, Shapes

PREFIX = "transformer."  # diffusers' transformer_name, the prefix of every key and metadata entry
LEAVES = ("down", "up", "scale")
WRITE_TIMEOUT_S = 600  # how long the other processes wait for process 0's file
Written = tuple[str, KeyPath, int | None]  # (diffusers Linear name, adapter module path, layer in its stack or None)


def save_lora(
    path: str | os.PathLike,
    module: nn.Module,
    shapes: Shapes,
    adapters: Mapping[str, Any],
    *,
    alpha: float,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `adapters` (module docstring) of the transformer `module` (`shapes`: {param path: shape}) as one
    diffusers-format LoRA file at `path` (.safetensors) with alpha `alpha`; `metadata`: more safetensors metadata
    (str -> str). Checks everything first (one ConversionError); returns `path` on every process."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA export path {path}: expected a .safetensors file name")
    extra = _extra_metadata(metadata)
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and math.isfinite(alpha)):
        raise ValueError(f"LoRA export alpha {alpha!r}: expected a finite number (peft's lora_alpha)")
    alpha = float(alpha)
    groups = _groups(adapters)
    scales = {p: _host(g["scale"]) for p, g in groups.items() if "scale" in g}  # collective: the same order everywhere
    leaf_shapes = {p: {k: tuple(np.shape(a)) for k, a in g.items()} for p, g in groups.items()}
    written = plan_export(module, shapes, leaf_shapes, scales, what=f"LoRA export to {path}")
    tensors, ranks = {}, {}
    for p in sorted({p for _, p, _ in written}):
        down, up = _host(groups[p]["down"]), _host(groups[p]["up"])
        for name, _, layer in (w for w in written if w[1] == p):
            d, u = (down, up) if layer is None else (down[layer], up[layer])
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(d.T)  # [r, in]
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(u.T)  # [out, r]
            ranks[name] = d.shape[1]
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        save_file(tensors, partial, {**extra, **adapter_metadata(ranks, alpha)})
        os.replace(partial, path)  # never a half-written file under the final name
    distributed.barrier(f"save_lora {path}", WRITE_TIMEOUT_S, f"process 0 writing the LoRA file {path}")
    return path


def plan_export(
    module: nn.Module,
    shapes: Shapes,
    adapters: Mapping[KeyPath, Mapping[str, tuple[int, ...]]],
    scales: Mapping[KeyPath, np.ndarray],
    what: str = "LoRA export",
) -> list[Written]:
    """What `save_lora` writes, from shapes only: (diffusers name, adapter module path, layer) of every adapter
    layer whose scale is not 0, sorted by name. `adapters`: {module path: {leaf: shape}}; `scales`: {module path:
    its `scale` leaf}. One ConversionError lists every missing or unknown leaf, every adapter with no 1:1 diffusers
    name, and every shape that does not fit."""
    names = _diffusers_names(module, shapes)
    written, missing, unexpected, misshaped = [], [], [], []
    for p, leaves in sorted(adapters.items()):
        where = "/".join(p)
        kernel = shapes.get((*p, "kernel"))
        if kernel is None or len(kernel) not in (2, 3):
            unexpected.append(f"{where} (no Dense kernel of the {type(module).__name__} at {where}/kernel)")
            continue
        unexpected += [f"{where}/{k} (an adapter's leaves are {', '.join(LEAVES)})" for k in leaves if k not in LEAVES]
        missing += [f"{where}/{k} (beside {sorted(leaves)})" for k in ("down", "up") if k not in leaves]
        if "down" not in leaves or "up" not in leaves:
            continue
        problem = _shape_problem(kernel, leaves)
        if problem:
            misshaped.append(f"{where}: {problem}")
            continue
        stacked = len(kernel) == 3
        scale = np.asarray(scales[p]) if p in scales else np.ones(kernel[:1] if stacked else ())
        layers = [int(i) for i in np.flatnonzero(scale)] if stacked else ([None] if scale != 0 else [])
        no_name = [layer for layer in layers if (p, layer) not in names or not is_transpose(names[p, layer][1], kernel)]
        if no_name:
            at = f" layer{'s' * (len(no_name) > 1)} {', '.join(map(str, no_name))}" if stacked else ""
            unexpected.append(f"{where}{at} (no diffusers Linear is exactly this kernel{_why(p)})")
            continue
        written += [(names[p, layer][0], p, layer) for layer in layers]
    if missing or unexpected or misshaped:
        raise ConversionError(what, missing=missing, unexpected=unexpected, misshaped=misshaped)
    if not written:
        raise ValueError(f"{what}: no adapter to write (none given, or every scale is 0)")
    return sorted(written)


def adapter_metadata(ranks: Mapping[str, int], alpha: float) -> dict[str, str]:
    """The safetensors metadata diffusers' `save_lora_weights` writes for a transformer adapter of these ranks
    ({diffusers name: r}) and alpha: `format` and the `transformer.`-prefixed peft LoraConfig as JSON."""
    r = collections.Counter(ranks[n] for n in sorted(ranks)).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "rank_pattern": {f"^{n}": k for n, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {},
        "target_modules": "|".join(re.escape(n) for n in sorted(ranks)),
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    packed = {f"{PREFIX}{k}": v for k, v in config.items()}
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def _diffusers_names(module: nn.Module, shapes: Shapes) -> dict[tuple[KeyPath, int | None], tuple[str, Any]]:
    """{(kernel's module path, layer): (diffusers Linear name, its rule)} for the Linears whose rule fills one kernel
    (BFL names, which io/lora.py reads too, are not written)."""
    kind = kind_of_module(module)
    dotted, _ = tables(module, shapes)
    diffusers = {s for rule in kind.rules(module.config, shapes) for leaf in (rule.layers or (rule,)) for s in leaf.src}
    out = {}
    for name, slot in dotted.items():
        if f"{name}.weight" in diffusers and len(slot.leaf.dst) == 1 and slot.leaf.dst[0][-1] == "kernel":
            out[slot.leaf.dst[0][:-1], slot.layer] = (name, slot.leaf)
    return out


def _shape_problem(kernel: tuple[int, ...], leaves: Mapping[str, tuple[int, ...]]) -> str | None:
    """What does not fit: down [L?, in, r] and up [L?, r, out] for a kernel [L?, in, out], scale [L] or []."""
    down, up, scale = leaves["down"], leaves["up"], leaves.get("scale")
    lead, (n_in, out) = kernel[:-2], kernel[-2:]
    r = down[-1] if len(down) == len(kernel) else None
    ok = r and down == (*lead, n_in, r) and up == (*lead, r, out) and scale in (None, lead)
    if ok:
        return None
    want = f"down {(*lead, n_in, 'r')}, up {(*lead, 'r', out)}" + (f", scale {lead}" if scale is not None else "")
    got = f"down {down}, up {up}" + (f", scale {scale}" if scale is not None else "")
    return f"{got} -> expected {want} (r >= 1) for the kernel {kernel}"


def _why(p: KeyPath) -> str:
    if p[-1] in ("proj_out_attn", "proj_out_mlp"):
        return ": diffusers' single-block proj_out is one Linear over both of the halves stored here"
    return ""


def _groups(adapters: Mapping[str, Any]) -> dict[KeyPath, dict[str, Any]]:
    """{module path: {leaf name: array}} of the nested adapters dict."""
    if not isinstance(adapters, Mapping):
        raise TypeError(f"LoRA adapters: expected a nested dict of modules, got {type(adapters).__name__}")
    groups: dict[KeyPath, dict[str, Any]] = {}
    for p, leaf in traverse_util.flatten_dict(dict(adapters)).items():
        groups.setdefault(tuple(p[:-1]), {})[p[-1]] = leaf
    return groups


def _host(x: Any) -> np.ndarray:
    """`x` whole on this host, float32 (a jax array this process does not hold whole is gathered: collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x).astype(np.float32)


def _extra_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    bad = [f"{k!r}: {v!r}" for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    bad += [f"{k!r} (written by save_lora)" for k in ("format", METADATA_KEY) if k in (metadata or {})]
    if bad:
        raise ValueError(f"LoRA export metadata: expected str -> str entries of your own; refused: {', '.join(bad)}")
    return dict(metadata or {})
