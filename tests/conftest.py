"""Test setup: 8 fake CPU devices for the sharding tests, fp32 matmuls, shared helpers."""

import os

# Must precede the first jax import: sharding tests run on 8 fake CPU devices.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)
