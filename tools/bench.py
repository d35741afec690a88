"""Benchmarks: `python -m tools.bench vae_memory [--devices=8]` and friends. Results go to BENCHMARKS.md.

vae_memory: XLA's compiled memory analysis of the bf16 F16 VAE decode (and encode) of 4096² images,
on one device and spatially sharded over `--devices` (fake CPU devices are enough: nothing runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def vae_memory(args) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from d4k_jax import sharding
    from d4k_jax.models import vae as vae_lib

    cfg = dataclasses.replace(vae_lib.FLUX_VAE, stride=2)
    dtype = jnp.dtype(args.dtype)
    module = vae_lib.AutoencoderKL(cfg, dtype=dtype, param_dtype=dtype)
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), dtype))))
    params = params["params"]
    s = args.size
    spatial = ("batch", "height", "width", "channels")
    cases = {
        "decode": (jax.ShapeDtypeStruct((args.batch, s // 16, s // 16, 16), dtype), spatial),
        "encode": (jax.ShapeDtypeStruct((args.batch, s, s, 3), dtype), (spatial, spatial)),
    }
    print(f"backend={jax.default_backend()} devices={jax.device_count()} image={args.batch}x{s}x{s} {dtype} F16 VAE")
    for method, (x, out_axes) in cases.items():
        fn = lambda p, x, m=method: module.apply({"params": p}, x, method=m)
        for n in sorted({1, args.devices}):
            mesh = sharding.make_mesh({"sequence": n}, jax.devices()[:n])
            t = time.perf_counter()
            compiled = (
                sharding.sharded(fn, mesh, sharding.DEFAULT_RULES, (None, spatial), out_axes).lower(params, x).compile()
            )
            m = compiled.memory_analysis()
            peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            print(
                f"{method:6s} devices={n}: per-device peak {peak / 2**30:6.2f} GiB "
                f"(temp {m.temp_size_in_bytes / 2**30:.2f}, args {m.argument_size_in_bytes / 2**30:.2f}, "
                f"out {m.output_size_in_bytes / 2**30:.2f}) compile {time.perf_counter() - t:.0f}s",
                flush=True,
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("vae_memory", help="compiled memory of the 4096² F16 VAE encode/decode")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--devices", type=int, default=1, help="also analyse sharding over this many devices")
    args = parser.parse_args(argv)
    if args.devices > 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        )
    {"vae_memory": vae_memory}[args.cmd](args)


if __name__ == "__main__":
    main()
