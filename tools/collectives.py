"""The collectives of a compiled SPMD program and whether each stays within a host or crosses hosts.

`collectives(hlo_text, host_size)` reads `compiled.as_text()`: for every all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute, its replica groups (explicit `{{0,1},{2,3}}` or iota
`[G,S]<=[dims]T(perm)`) in device-assignment order, i.e. the mesh's `devices.flat`. With the devices of host h
at positions [h * host_size, (h + 1) * host_size) of that order (as `sharding.make_mesh`'s hybrid mesh and
`jax.devices()` lay them out), a group within one such block never leaves its host.
"""

from __future__ import annotations

import collections
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"^\s*\S+ = .*? (" + "|".join(KINDS) + r")(?:-start)?\((.*)$", re.M)
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_EXPLICIT = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
# newer XLA: replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}
_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}")


def _iota(dims: str, perm: str | None) -> np.ndarray:
    ids = np.arange(int(np.prod([int(x) for x in dims.split(",")]))).reshape([int(x) for x in dims.split(",")])
    return ids.transpose([int(x) for x in perm.split(",")]) if perm else ids


def groups(line: str) -> list[list[int]]:
    """The device groups of one collective's HLO line."""
    if m := _MESH.search(line):
        axes = re.findall(r"'([^']+)'=(\d+)", m[1])
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = (_iota(m[2], m[3]) if m[2] else np.arange(int(np.prod(sizes)))).reshape(sizes)
        over = [names.index(a) for a in re.findall(r"'([^']+)'", m[4])]
        rest = [i for i in range(len(names)) if i not in over]
        return ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over]))).tolist()
    if m := _IOTA.search(line):
        shape = [int(x) for x in m[1].split(",")]
        return _iota(m[2], m[3]).reshape(shape[0], -1).tolist()
    if m := _EXPLICIT.search(line):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
    if m := _PAIRS.search(line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m[1])]
    return []


def collectives(hlo_text: str, host_size: int) -> dict[str, collections.Counter]:
    """{kind: Counter({("within a host" | "across hosts", group size): number of ops})}."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for kind, rest in _OP.findall(hlo_text):
        gs = groups(rest) or [[]]
        across = any(len({d // host_size for d in g}) > 1 for g in gs)
        out[kind][("across hosts" if across else "within a host", max(len(g) for g in gs))] += 1
    return dict(out)


def summary(found: dict[str, collections.Counter]) -> str:
    """One line: kind: n within a host (group size s), m across hosts (group size t); ..."""
    parts = []
    for kind in KINDS:
        if kind in found:
            items = sorted(found[kind].items())
            parts.append(f"{kind}: " + ", ".join(f"{n} {where} (groups of {size})" for (where, size), n in items))
    return "; ".join(parts) or "no collectives"
