"""The XLA options d4k_jax sets for GPUs, and the ones it measures before setting (issue 16, lever 4).

Every command-line entry point (`cli.run`) adds `GPU_FLAGS` to the `XLA_FLAGS` environment variable before
JAX starts its backend, except a flag the user's `XLA_FLAGS` already sets: the user's value always wins.
Flags XLA does not use on the running backend are parsed and ignored (all of them are fields of XLA's one
DebugOptions), so the same list is harmless on CPUs and TPUs. A Python caller that wants the same options
calls `apply()` before its first JAX computation.

`CANDIDATES` are what NVIDIA's JAX-Toolbox and MaxText's GPU recipes set (shared/notes/perf-anchors.md §3);
tools/device_check.sh measures each alone against `GPU_FLAGS` on one GPU, and only a flag that helps there
moves into `GPU_FLAGS` (BENCHMARKS.md, "Closer to the hardware").
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

# Latency-hiding scheduler: overlaps collectives (FSDP all-gathers, Ulysses all-to-alls) with compute on
# a mesh; the one flag NVIDIA's JAX containers set by default. On one GPU there is nothing to overlap.
GPU_FLAGS: Mapping[str, str] = {"xla_gpu_enable_latency_hiding_scheduler": "true"}

CANDIDATES: Mapping[str, Mapping[str, str]] = {
    # cuBLAS for every GEMM instead of Triton-generated fused GEMMs (NVIDIA's and MaxText's GPU setting)
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": "false"},
    # cuDNN layer norm kernels (off by default)
    "cudnn_layer_norm": {"xla_gpu_enable_cudnn_layer_norm": "true"},
    # no recompute added by XLA near the memory limit (the model's remat policy already decides)
    "no_xla_remat": {"xla_disable_hlo_passes": "rematerialization"},
    # double-buffered while loops: the scan over layers overlaps one layer's prologue with the last
    "double_buffering": {"xla_gpu_enable_while_loop_double_buffering": "true"},
}


def _names(xla_flags: str) -> set[str]:
    """The flag names set in an XLA_FLAGS string ("--a=1 --b" -> {"a", "b"})."""
    return {f.lstrip("-").partition("=")[0] for f in xla_flags.split() if f.startswith("--")}


def with_flags(xla_flags: str, flags: Mapping[str, str] = GPU_FLAGS) -> str:
    """`xla_flags` with each of `flags` appended unless it already sets that flag."""
    present = _names(xla_flags)
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def apply(environ: MutableMapping[str, str] = os.environ, flags: Mapping[str, str] = GPU_FLAGS) -> str:
    """Add `flags` to environ["XLA_FLAGS"] (see `with_flags`); returns the new value. Takes effect only if
    JAX has not started a backend yet. A run held to the CPU (JAX_PLATFORMS=cpu, as the tests are) gets none:
    XLA_FLAGS are part of the persistent compilation cache's key, and GPU options would only split the cache
    between such runs and the programs compiled without them."""
    if environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
        environ["XLA_FLAGS"] = with_flags(environ.get("XLA_FLAGS", ""), flags)
    return environ.get("XLA_FLAGS", "")
