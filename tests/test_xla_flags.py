"""d4k_jax.xla_flags: the project's GPU options join XLA_FLAGS, the user's own values win, and the CPU backend
starts with every flag the project sets or measures."""

import subprocess
import sys

from d4k_jax import xla_flags


def test_project_flags_are_added_unless_the_user_set_them():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false"}
    assert xla_flags.apply(env) == env["XLA_FLAGS"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in env["XLA_FLAGS"]  # the user's value stays
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in env["XLA_FLAGS"]
    fresh = {}
    assert xla_flags.apply(fresh) == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert xla_flags.with_flags(fresh["XLA_FLAGS"]) == fresh["XLA_FLAGS"]  # applying twice adds nothing
    assert xla_flags.apply({"JAX_PLATFORMS": "cpu"}) == ""  # a CPU-only run keeps its cache keys


def test_every_flag_is_one_xla_accepts():
    """XLA aborts on a flag it does not know; all of these must start a backend (here the CPU's)."""
    flags = dict(xla_flags.GPU_FLAGS)
    for candidate in xla_flags.CANDIDATES.values():
        flags.update(candidate)
    env = {"XLA_FLAGS": xla_flags.with_flags("", flags), "JAX_PLATFORMS": "cpu", "PATH": ""}
    code = "import jax; print(float(jax.numpy.ones(3).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]
