"""Model FLOPs and accelerator peaks, for the MFU that the trainer logs.

MFU = model FLOPs of a step / (step time x peak FLOP/s of every device). Model FLOPs are 3x the
transformer forward's (forward + the two backward matmuls), from XLA's cost analysis of the lowered
forward: rematerialised recompute and the frozen VAE's encode are not model FLOPs, so this is MFU, not
hardware utilisation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

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
    """FLOPs of one call of `fn` at these shapes (XLA cost analysis of the lowered program; nothing runs)."""
    cost = jax.jit(fn).lower(*abstract_args).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])
