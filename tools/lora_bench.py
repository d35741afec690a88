"""Compiled per-device memory of the LoRA train step (issue 17) at 4096² on ONE device, per rank; results in
BENCHMARKS.md ("LoRA training at 4096²"):

    python -m tools.lora_bench --model=sd3|flux [--ranks=16,64] [--latents] [--attention_chunk=128] [--dtype=float32]

The transformer is frozen in the compute dtype (a step input: no gradient, no moments), the adapters float32
(d4k_jax.lora, the diffusers scripts' default targets unless --targets) with AdamW; images are encoded inside the
step by the frozen F16 VAE, or precomputed latents (--latents); WLF loss. The Trainer's step (d4k_jax.train_state)
lowered from shapes alone (tools.bench.train_step_lowered); on a CPU-only host, XLA's CPU analysis.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import traverse_util

from d4k_jax import lora, sharding, train_state
from d4k_jax import train_step as ts
from d4k_jax.models import vae as vae_lib
from d4k_jax.nn import attention
from tools.bench import _full_size, _ints, _per_device_bytes, train_step_lowered


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["flux", "sd3"], default="flux")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="images per step (one per encode pass and microbatch)")
    p.add_argument("--text_len", type=int, default=0, help="default: 154 (SD3), 77 (Flux)")
    p.add_argument("--ranks", type=_ints, default=[16, 64])
    p.add_argument("--latents", action="store_true", help="batches of precomputed latents: no VAE encode in the step")
    p.add_argument("--targets", default="", help="peft module names, commas; default the diffusers scripts'")
    p.add_argument("--remat", default="full")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute and base dtype")
    p.add_argument("--budget", type=float, default=80e9, help="bytes per device")
    p.add_argument("--attention_chunk", type=int, default=0, help="queries per chunk of the chunked attention")
    return p


def main(argv=None) -> None:
    """Prints the memory analysis of the LoRA step for each rank (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.attention_chunk:
        attention.dot_product_attention.__kwdefaults__["chunk_size"] = args.attention_chunk
    dtype, sd3, s = jnp.dtype(args.dtype), args.model == "sd3", args.size
    text_len, pooled = args.text_len or (154 if sd3 else 77), 2048 if sd3 else 768
    module, _, small = _full_size(args.model, 1, s, text_len, dtype, args.remat)  # the base stored in `dtype`
    vae = vae_lib.AutoencoderKL(
        dataclasses.replace(vae_lib.SD3_VAE if sd3 else vae_lib.FLUX_VAE, stride=2), dtype=dtype, param_dtype=dtype
    )
    rules, mesh = sharding.DEFAULT_RULES, sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    base_params = train_state.abstract_params(module, small, mesh, rules)
    shapes = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(base_params).items()}
    targets = lora.resolve(module, shapes, tuple(args.targets.split(",")) if args.targets else lora.DEFAULT_TARGETS)
    cfg, tx, gib = ts.LossConfig(model=args.model), ts.optimizer(lr=1e-4), lambda b: b / 2**30
    batch = {
        "text": jax.ShapeDtypeStruct((args.batch, text_len, 4096), dtype),
        "pooled": jax.ShapeDtypeStruct((args.batch, pooled), dtype),
    }
    if args.latents:  # precomputed F16 latents (a latent cache): no VAE in the step
        batch["x0"], vae = jax.ShapeDtypeStruct((args.batch, s // 16, s // 16, 16), jnp.float32), None
    else:
        batch["image"] = jax.ShapeDtypeStruct((args.batch, s, s, 3), jnp.uint8)
    print(
        f"{args.model} LoRA train step at {s}² on one {jax.devices()[0].device_kind} ({jax.default_backend()}): batch "
        f"{args.batch} ({'latents' if args.latents else 'images encoded in the step'}), text {text_len}x4096, "
        f"base {dtype} frozen, adapters fp32 + AdamW fp32 on {len(targets)} "
        f"Linears ({', '.join(args.targets.split(',')) if args.targets else 'default targets'}), remat "
        f"{args.remat!r}, budget {args.budget / 1e9:.1f} GB ({gib(args.budget):.2f} GiB)",
        flush=True,
    )
    for rank in args.ranks:
        adapters = jax.eval_shape(lambda r=rank: lora.init(jax.random.key(0), targets, r))
        scales = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=train_state.replicated(mesh)),
            lora.scales(targets, 1.0),
        )
        base = ts.Frozen(base_params, scales)
        t = time.perf_counter()
        lowered, state = train_step_lowered(
            module,
            small,
            tx,
            cfg,
            mesh,
            batch,
            vae=vae,
            vae_small=(jnp.zeros((1, 32, 32, 3), dtype),),
            encode_passes=args.batch,
            microbatches=args.batch,
            trained=lora.abstract(adapters, base_params),
            base=base,
        )
        m = lowered.compile().memory_analysis()
        arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
        alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
        peak = arg + out - alias + temp
        adapter_bytes, moments = _per_device_bytes(state.params), _per_device_bytes(state.opt_state)
        print(
            f"  rank {rank}: args {gib(arg):.2f} GiB (base {gib(_per_device_bytes(base_params)):.2f}, adapters "
            f"{gib(adapter_bytes):.3f}, AdamW {gib(moments):.3f}), out {gib(out):.3f}, alias {gib(alias):.3f}, temp "
            f"{gib(temp):.2f}, peak = args + out - alias + temp = {gib(peak):.2f} GiB ({peak / 1e9:.1f} GB): "
            f"{'fits' if peak <= args.budget else 'does not fit'} (compile {time.perf_counter() - t:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
