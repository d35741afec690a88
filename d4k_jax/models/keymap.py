"""Key maps: strict conversion between torch state dicts and Flax parameter trees.

Each model's names in the diffusers / transformers / BFL / SAI layouts are declared beside it
(`models/*_keys.py`) as lists of the rules below; `d4k_jax.io` loads with them, `conversion` exports with them.

A model's key map is a list of `Rule`s: each consumes some torch tensors and fills some Flax leaves.
`to_flax` uses every source tensor exactly once and fills every parameter, or raises one
`ConversionError` listing every missing, unexpected and mis-shaped key; `to_torch` is its exact inverse.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]
Arrays = tuple[np.ndarray, ...]
Shapes = dict[Path, tuple[int, ...]]


def param_shapes(module: nn.Module, inputs: tuple) -> Shapes:
    """{path: shape} of every parameter, from `jax.eval_shape` (no memory used)."""
    return shapes_of(abstract_params(module, inputs))


def abstract_params(module: nn.Module, inputs: tuple) -> Any:
    """The params tree of `module.init(key, *inputs)` as `jax.ShapeDtypeStruct`s still boxed with their
    logical axis names (`sharding.params_sharding` reads them), from `jax.eval_shape` (no memory used)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]


def shapes_of(abstract: Any) -> Shapes:
    """{path: shape} of a (boxed) abstract params tree."""
    return {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(nn.unbox(abstract)).items()}


@dataclasses.dataclass(frozen=True)
class Rule:
    src: tuple[str, ...]  # torch keys read
    dst: tuple[Path, ...]  # Flax leaves written
    fwd: Callable[..., Arrays]  # torch arrays -> Flax arrays
    inv: Callable[..., Arrays]  # Flax arrays -> torch arrays
    # What sharded loading may read by the slice: `perm` says fwd(x) is `(x.transpose(perm),)` of the one source
    # x when x.ndim == len(perm), `()` that it is x itself at any rank, None that fwd is no axis permutation;
    # `windows` (with `perm`) that output j is `x[windows[j]].transpose(perm)` instead (parts of one tensor);
    # `layers` are the per-layer rules of a `stacked` rule.
    perm: tuple[int, ...] | None = None
    layers: tuple[Rule, ...] = ()
    windows: tuple[tuple[slice, ...], ...] | None = None

    def permutation(self, ndim: int) -> tuple[int, ...] | None:
        """The axis permutation fwd applies to a source of rank `ndim`, or None (computed whole)."""
        if self.perm == ():
            return tuple(range(ndim))
        return self.perm if self.perm is not None and len(self.perm) == ndim else None


class ConversionError(ValueError):
    def __init__(self, what: str, missing=(), unexpected=(), misshaped=(), unfilled=()):
        groups = (
            ("missing from the checkpoint", "missing", missing),
            ("unexpected in the checkpoint", "unexpected", unexpected),
            ("wrong shape (key: checkpoint -> expected)", "wrong shape", misshaped),
            ("parameters no rule fills", "unfilled", unfilled),
        )
        counts = ", ".join(f"{len(items)} {short}" for _, short, items in groups if items)
        lines = [f"{what}: the checkpoint does not match the model ({counts})."]
        for title, _, items in groups:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        super().__init__("\n".join(lines))
        self.missing, self.unexpected, self.misshaped, self.unfilled = (
            list(missing),
            list(unexpected),
            list(misshaped),
            list(unfilled),
        )


def copy(src: str, dst: Path) -> Rule:
    return Rule((src,), (dst,), lambda x: (x,), lambda x: (x,), perm=())


def linear(src: str, dst: Path) -> Rule:
    """torch Linear weight (out, in) <-> Flax kernel (in, out)."""
    return Rule((src,), (dst,), lambda w: (_squeeze_1x1(w).T,), lambda k: (k.T,), perm=(1, 0))  # 2-D only


def conv(src: str, dst: Path) -> Rule:
    """torch Conv2d weight (O, I, kh, kw) <-> Flax kernel (kh, kw, I, O)."""
    return Rule(
        (src,), (dst,), lambda w: (w.transpose(2, 3, 1, 0),), lambda k: (k.transpose(3, 2, 0, 1),), perm=(2, 3, 1, 0)
    )


def stacked(rules: list[Rule]) -> Rule:
    """One rule for a layer stack (`nn.scan`): rule i reads layer i's tensors; the Flax leaves get a
    leading layer axis. All rules must fill the same paths."""
    dst = rules[0].dst
    if any(r.dst != dst for r in rules):
        raise ValueError(f"stacked: rules fill different parameters: {[r.dst for r in rules]}")
    width = [len(r.src) for r in rules]

    def fwd(*arrays):
        per_layer, i = [], 0
        for r, n in zip(rules, width, strict=True):
            per_layer.append(r.fwd(*arrays[i : i + n]))
            i += n
        return tuple(np.stack(leaves) for leaves in zip(*per_layer, strict=True))

    def inv(*arrays):
        return tuple(a for layer, r in enumerate(rules) for a in r.inv(*(x[layer] for x in arrays)))

    return Rule(tuple(k for r in rules for k in r.src), dst, fwd, inv, layers=tuple(rules))


def split_linear(src: str, dsts: list[tuple[str, ...]], sizes: list[int]) -> list[Rule]:
    """A fused torch Linear (rows = concatenated outputs) <-> several Flax Dense layers (weight and bias)."""
    cuts = np.cumsum(sizes)[:-1]

    def part(leaf: str, t: Any) -> Rule:
        fwd = lambda w: tuple(p.T if w.ndim == 2 else p for p in np.split(w, cuts, axis=0))
        inv = lambda *ps: (np.concatenate([p.T if p.ndim == 2 else p for p in ps], axis=0),)
        return Rule((f"{src}.{t}",), tuple((*d, leaf) for d in dsts), fwd, inv)

    return [part("kernel", "weight"), part("bias", "bias")]


def split_input(src: str, dsts: list[tuple[str, ...]], sizes: list[int]) -> list[Rule]:
    """A torch Linear over concatenated inputs (its weight's columns) <-> Flax Dense layers, one per input
    part, whose outputs add; the bias goes to the last one (the others have none)."""
    ends = np.cumsum(sizes)
    windows = tuple((slice(None), slice(int(e - n), int(e))) for e, n in zip(ends, sizes, strict=True))
    fwd = lambda w: tuple(w[window].T for window in windows)
    inv = lambda *kernels: (np.concatenate([k.T for k in kernels], axis=1),)
    kernels = Rule((f"{src}.weight",), tuple((*d, "kernel") for d in dsts), fwd, inv, perm=(1, 0), windows=windows)
    return [kernels, copy(f"{src}.bias", (*dsts[-1], "bias"))]


def dense(src: str, dst: tuple[str, ...]) -> list[Rule]:
    return [linear(f"{src}.weight", (*dst, "kernel")), copy(f"{src}.bias", (*dst, "bias"))]


def swap_halves(src: str, dst: tuple[str, ...]) -> list[Rule]:
    """BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift)."""

    def swap(a):
        first, second = np.split(a, 2, axis=0)
        return np.concatenate([second, first], axis=0)

    return [
        Rule((f"{src}.weight",), ((*dst, "kernel"),), lambda w: (swap(w).T,), lambda k: (swap(k.T),)),
        Rule((f"{src}.bias",), ((*dst, "bias"),), lambda b: (swap(b),), lambda b: (swap(b),)),
    ]


def _squeeze_1x1(w: np.ndarray) -> np.ndarray:
    # legacy checkpoints store attention projections as 1x1 convs
    return w[:, :, 0, 0] if w.ndim == 4 and w.shape[2:] == (1, 1) else w


_INDEXED = re.compile(r"^(.*)_(\d+)$")
# torch ModuleList / Sequential attributes: their Flax children are named `resnets_1` for `resnets.1`
LIST_NAMES = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out", "net"}
)


def torch_key(path: Path, layer: int | None = None, lists: frozenset[str] = LIST_NAMES) -> str:
    """The torch name of a Flax parameter path: `resnets_1` -> `resnets.1`, `kernel`/`scale` -> `weight`;
    `layer` inserts the index of a scanned stack after its first element (`transformer_blocks.3.`)."""
    *mods, leaf = path
    names = []
    for m in mods:
        match = _INDEXED.match(m)
        names.append(f"{match[1]}.{match[2]}" if match and match[1] in lists else m)
    if layer is not None:
        names.insert(1, str(layer))
    if leaf not in ("kernel", "scale", "bias", "embedding"):
        raise ValueError(f"no torch name for parameter {'/'.join(path)}")
    return ".".join([*names, "bias" if leaf == "bias" else "weight"])


def structural_rules(
    shapes: Mapping[Path, tuple[int, ...]],
    *,
    layers: Mapping[str, tuple[str, int, bool]] | None = None,
    lists: frozenset[str] = LIST_NAMES,
) -> list[Rule]:
    """Rules for a Flax tree whose names mirror the torch module tree (see `torch_key`).

    `layers` maps a top-level Flax name to (torch ModuleList name, index of its first layer, scanned):
    a scanned entry (`nn.scan`, leading layer axis) reads `name.{first + i}.…` for every layer i, an
    unscanned one is the single layer `name.{first}.…`. Kernels are transposed by rank (linear or conv).
    """
    layers = layers or {}
    rules = []
    for path, shape in shapes.items():
        torch_name, first, scanned = layers.get(path[0], (None, None, False))
        if torch_name is None:
            rules.append(_leaf_rule(torch_key(path, None, lists), path, shape))
        elif scanned:
            per_layer = [
                _leaf_rule(torch_key((torch_name, *path[1:]), first + i, lists), path, shape[1:])
                for i in range(shape[0])
            ]
            rules.append(stacked(per_layer))
        else:
            rules.append(_leaf_rule(torch_key((torch_name, *path[1:]), first, lists), path, shape))
    return rules


def _leaf_rule(key: str, path: Path, shape: tuple[int, ...]) -> Rule:
    if path[-1] != "kernel":
        return copy(key, path)
    return conv(key, path) if len(shape) == 4 else linear(key, path)


def to_flax(
    source: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    expected: Mapping[Path, tuple[int, ...]],
    what: str = "checkpoint",
) -> dict[Path, np.ndarray]:
    """Apply `rules` to `source`; strict about every key and shape (`check`, before anything is read).
    Returns {flax path: array}."""
    rules = list(rules)
    check(source, rules, expected, what)
    out = {}
    for rule in rules:
        out.update(zip(rule.dst, rule.fwd(*(source[k] for k in rule.src)), strict=True))
    return out


def check(
    source: Mapping[str, Any], rules: Iterable[Rule], expected: Mapping[Path, tuple[int, ...]], what: str
) -> None:
    """Every source key is used exactly once, every parameter filled, every shape right, or one
    ConversionError lists what is not (a second one the mis-shaped keys, once the keys are right).
    Works on shapes alone (`source.shape(key)` where the source has it, as a safetensors header does)."""
    rules = list(rules)
    used = [k for r in rules for k in r.src]
    filled = [p for r in rules for p in r.dst]
    _check_unique(used, "source key")
    _check_unique(filled, "parameter")
    missing = sorted(set(used) - set(source))
    unexpected = sorted(set(source) - set(used))
    unfilled = sorted("/".join(p) for p in set(expected) - set(filled))
    if missing or unexpected or unfilled:
        raise ConversionError(what, missing, unexpected, unfilled=unfilled)
    shape = source.shape if callable(getattr(source, "shape", None)) else lambda k: np.shape(source[k])
    misshaped = [m for r in rules for m in _misshaped(r, [tuple(shape(k)) for k in r.src], expected)]
    if misshaped:
        raise ConversionError(what, misshaped=misshaped)


class _LayersDiffer(ValueError):
    pass


def output_shapes(rule: Rule, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes `rule.fwd` gives for sources of these `shapes`, without reading any: from the permutation or
    the layers where the rule has them, else by running fwd on zero-stride stand-ins (free for views;
    a concatenating rule allocates its output once, in fp32)."""
    if rule.layers:
        per_layer, i = [], 0
        for layer in rule.layers:
            per_layer.append(output_shapes(layer, shapes[i : i + len(layer.src)]))
            i += len(layer.src)
        if any(s != per_layer[0] for s in per_layer):
            raise _LayersDiffer
        return [(len(rule.layers), *s) for s in per_layer[0]]
    perm = rule.permutation(len(shapes[0])) if len(shapes) == 1 else None
    if perm is not None and rule.windows is None:
        return [tuple(shapes[0][a] for a in perm)]
    stand_ins = (np.broadcast_to(np.zeros((), np.float32), s) for s in shapes)
    return [tuple(a.shape) for a in rule.fwd(*stand_ins)]


def _misshaped(rule: Rule, shapes: list[tuple[int, ...]], expected: Mapping[Path, tuple[int, ...]]) -> list[str]:
    keys = ", ".join(rule.src)
    try:
        got = output_shapes(rule, shapes)
    except _LayersDiffer:  # name the layers that differ from the parameter's shape less its layer axis
        out, i = [], 0
        per_layer = {p: tuple(expected[p])[1:] for p in rule.dst if p in expected}
        for n, layer in enumerate(rule.layers):
            out += [f"{m} (layer {n})" for m in _misshaped(layer, shapes[i : i + len(layer.src)], per_layer)]
            i += len(layer.src)
        return out
    except (ValueError, IndexError) as e:  # e.g. halves of an odd number of rows, a 1x1 conv of rank 2
        return [f"{keys}: {', '.join(map(str, shapes))} cannot be converted ({e})"]
    out = []
    for path, shape in zip(rule.dst, got, strict=True):
        want = expected.get(path)
        if want is None:
            out.append(f"{'/'.join(path)}: no such parameter in the model")
        elif shape != tuple(want):
            out.append(f"{keys}: {shape} -> {tuple(want)} ({'/'.join(path)})")
    return out


def to_torch(params: Mapping[Path, np.ndarray], rules: Iterable[Rule]) -> dict[str, np.ndarray]:
    """The inverse of `to_flax`: {torch key: array}."""
    out = {}
    for rule in rules:
        arrays = rule.inv(*(np.asarray(params[p]) for p in rule.dst))
        out.update(zip(rule.src, arrays, strict=True))
    return out


def _check_unique(items: list, what: str) -> None:
    seen, dup = set(), set()
    for i in items:
        (dup if i in seen else seen).add(i)
    if dup:
        raise ValueError(f"key map bug: {what}s used by more than one rule: {sorted(map(str, dup))}")
