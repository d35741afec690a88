"""d4k_jax.xla_flags: the project's GPU options join XLA_FLAGS, the user's own values win, and the CPU backend
starts with every flag the project sets or measures; the CLIs' compilation cache (cli.use_compilation_cache)."""

import subprocess
import sys

from d4k_jax import cli, xla_flags


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


def test_the_compilation_cache_folder_is_the_one_given(tmp_path):
    """What the CLIs do first with config.compilation_cache (`~` expanded): compiled programs are written there
    and read back by the next process; '' turns the persistent cache off."""
    env = {"HOME": str(tmp_path), "JAX_PLATFORMS": "cpu", "PATH": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    code = (
        "import sys; from d4k_jax import cli; cli.use_compilation_cache(sys.argv[1]); import jax; "
        "print(float(jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).sum()))"
    )
    run = lambda folder: subprocess.run(
        [sys.executable, "-c", code, folder], env=env, capture_output=True, text=True, timeout=120
    )
    for folder in ("~/cache", ""):
        out = run(folder)
        assert out.returncode == 0 and out.stdout.strip() == "9.0", out.stderr[-2000:]
    assert any(p.name.startswith("jit_") for p in (tmp_path / "cache").iterdir())
    assert cli.default_compilation_cache()  # the configs' default: a folder
