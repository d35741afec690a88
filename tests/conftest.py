"""Test setup: 8 fake CPU devices for the sharding tests, fp32 matmuls, shared helpers."""

import json
import os
from pathlib import Path

# Must precede the first jax import: sharding tests run on 8 fake CPU devices. The tests' programs are tiny and
# compiled once each, so LLVM's optimisation passes cost more than they save (about a third of a compile); the
# float semantics do not change (no fast-math either way). The CLIs the tests start get the same flags.
# XLA:CPU's concurrency-optimised schedule deadlocked a data x fsdp train step on 8 fake devices (rendezvous "may be
# stuck", abort after 40 s; 4 of 5 runs): the devices waited in different collectives. With the sequential schedule
# the same test passed 3 of 3 runs. tools/launch.py sets it for its CPU processes too.
os.environ["D4K_TEST_XLA_FLAGS"] = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", os.environ["D4K_TEST_XLA_FLAGS"]]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, which the CLIs the tests start as subprocesses inherit:
# a program compiled again (by another test, xdist worker or process) is read back instead of recompiled. A run
# writes about 20 MB; no size cap, because JAX's LRU eviction races between processes (missing -atime files).
# `make clean` removes it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# DESIGN.md: max relative error for single layers and for whole models / pipelines, fp32.
LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (DESIGN.md's relative error)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))
    _MEASURED[_CURRENT[0]] = max(err, _MEASURED.get(_CURRENT[0], 0.0))
    return err


# The largest rel_err each test measured; with D4K_PARITY_REPORT=FILE they are written there as JSON (one file
# per xdist worker), to see which parity tests sit close to their bound.
_MEASURED: dict[str, float] = {}
_CURRENT = [""]


def pytest_runtest_setup(item):
    _CURRENT[0] = item.nodeid


def pytest_sessionfinish(session):
    if (path := os.environ.get("D4K_PARITY_REPORT")) and _MEASURED:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{path}.{worker}", "w") as f:
            json.dump(dict(sorted(_MEASURED.items(), key=lambda kv: -kv[1])), f, indent=1)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)
