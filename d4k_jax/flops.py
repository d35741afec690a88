"""Model FLOPs and accelerator peaks, for the MFU that the trainer logs.

MFU = model FLOPs of a step / (step time x peak FLOP/s of every device). Model FLOPs are 3x the
transformer forward's matmul and convolution FLOPs (forward + the two backward matmuls), counted on
its jaxpr: rematerialised recompute and the frozen VAE's encode are not model FLOPs, so this is MFU,
not hardware utilisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.extend

from d4k_jax import sharding
from d4k_jax.nn import attention

# dense bf16 peak FLOP/s per device, matched by substring of `device.device_kind`
PEAK_FLOPS = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "H800": 989.4e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """The device's bf16 peak, or None where unknown (CPUs): MFU is then not reported."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return flops
    return None


def forward_flops(fn: Callable, *abstract_args) -> float:
    """Matmul and convolution FLOPs of one call of `fn` at these shapes, from its jaxpr (nothing compiles or
    runs). Scanned layers and query chunks count once per iteration, which XLA's cost analysis does not
    do (it counts a loop body once), and attention is traced in its plain form so that an opaque kernel
    (cuDNN) still counts its two matmuls. Elementwise work is not counted, as usual for MFU. The call is traced
    without the context mesh: a sequence-parallel attention's shard_map body holds one device's share of the
    work, while these are the whole model's FLOPs."""
    with attention.forced("xla"), sharding.inactive():
        closed = jax.make_jaxpr(fn)(*abstract_args)
    return float(_jaxpr_flops(closed.jaxpr))


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = math.prod(lhs[d] for d in contracting)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) positions
            per_output = math.prod(rhs[d] for d in spec[1:])  # in channels per group x kernel window
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name == "while":
            raise ValueError("a while loop's trip count is unknown: FLOPs cannot be counted (use lax.scan)")
        else:
            subs = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
            if name == "cond":
                total += max(subs, default=0)  # one branch runs
            else:
                total += eqn.params.get("length", 1) * sum(subs) if name == "scan" else sum(subs)
    return total


def _sub_jaxprs(params: dict):
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v
