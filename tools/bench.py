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


def flux_memory(args) -> None:
    """Compiled memory of one bf16 FLUX.1-dev forward at args.size² (F16 latents), nothing executed."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from d4k_jax.models.flux import Flux, FluxConfig

    cfg = FluxConfig(remat=args.remat)
    dtype = jnp.dtype(args.dtype)
    module = Flux(cfg, dtype=dtype, param_dtype=dtype)
    h = args.size // 16
    sds = jax.ShapeDtypeStruct
    inputs = (sds((args.batch, h, h, 16), dtype), sds((args.batch,), jnp.float32),
              sds((args.batch, args.text_len, 4096), dtype), sds((args.batch, 768), dtype),
              sds((args.batch,), jnp.float32))  # fmt: skip
    small = tuple(jnp.zeros((1, 2, 2, 16)) if i == 0 else jnp.zeros((1, *x.shape[1:])) for i, x in enumerate(inputs))
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *small))["params"])
    t = time.perf_counter()
    compiled = jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(params, *inputs).compile()
    m = compiled.memory_analysis()
    gib = lambda b: b / 2**30
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    print(
        f"FLUX.1-dev {dtype} forward, batch {args.batch}, {args.size}² ({h // 2 * (h // 2)} image + "
        f"{args.text_len} text tokens) on {jax.default_backend()}: params {gib(m.argument_size_in_bytes):.2f} GiB, "
        f"temp {gib(m.temp_size_in_bytes):.2f} GiB, out {gib(m.output_size_in_bytes):.3f} GiB, "
        f"peak {gib(peak):.2f} GiB (compile {time.perf_counter() - t:.0f}s)"
    )


def flux_tiny(args) -> None:
    """Forward time of a tiny Flux, d4k_jax vs diffusers, same inputs, same CPU threads, both warmed up."""
    import jax
    import numpy as np
    import torch

    sys.path.insert(0, "tests")
    import tempfile

    from helpers import save_component
    from torch_flux import flux_forward, make_flux

    from conversion import load_component

    model = make_flux(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        module, params = load_component(save_component(model, __import__("pathlib").Path(tmp) / "f"))
    rng = np.random.default_rng(0)
    b = args.batch
    a = (rng.normal(size=(b, 32, 32, 4)).astype(np.float32), np.full(b, 0.5, np.float32),
         rng.normal(size=(b, 77, 24)).astype(np.float32), rng.normal(size=(b, 12)).astype(np.float32),
         np.full(b, 3.5, np.float32))  # fmt: skip
    fn = jax.jit(module.apply)
    jax_run = lambda: fn({"params": params}, *a).block_until_ready()
    torch_run = lambda: flux_forward(model, *a)
    for name, run in (("d4k_jax", jax_run), ("diffusers", torch_run)):
        for _ in range(3):
            run()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        print(
            f"{name:9s} tiny Flux forward (batch {b}, 256 image + 77 text tokens): "
            f"median {1e3 * float(np.median(times)):.1f} ms over {args.repeats} runs, "
            f"torch threads {torch.get_num_threads()}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("vae_memory", help="compiled memory of the 4096² F16 VAE encode/decode")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--devices", type=int, default=1, help="also analyse sharding over this many devices")
    p = sub.add_parser("flux_memory", help="compiled memory of a bf16 FLUX.1-dev forward")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text_len", type=int, default=512)
    p.add_argument("--remat", default="none")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p = sub.add_parser("flux_tiny", help="tiny Flux forward time, d4k_jax vs diffusers")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if getattr(args, "devices", 1) > 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        )
    {"vae_memory": vae_memory, "flux_memory": flux_memory, "flux_tiny": flux_tiny}[args.cmd](args)


if __name__ == "__main__":
    main()
