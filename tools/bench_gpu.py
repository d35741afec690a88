"""Timed full-size runs on an accelerator (random weights: timing and memory only, never quality).

    python -m tools.bench_gpu sample --model=sd3|flux [--size=4096 --steps=4]   # s/step, peak memory
    python -m tools.bench_gpu train --model=sd3 [--batch=8 --microbatches=8]   # step time, images/s, MFU
    python -m tools.bench_gpu torch_sample --model=sd3|flux                     # diffusers on the same GPU

`--layers=N` shrinks the transformer (a dry run on a CPU); `--out=FILE` appends one JSON line per result.
Levers of issue 16, each alone: `--remat=POLICY` (train), `--model_opt=FIELD=VALUE` (any field of the model's
config, e.g. fused_qkv=true), `--attention=mgpu` (D4K_ATTENTION: the GPU flash kernel); XLA flags come
from the environment. `--model_opt=fp8=true --images=DIR` after a bf16 run with `--images=DIR`: FP8 sampling's
PSNR against it and the count of FP8 GEMMs in the compiled program. `--profile=DIR` traces one more run and
appends its top-15 op table (tools/op_profile) to DIR/ops.md.
Sampling excludes the text encoders (the pipelines release them before denoising) and includes the F16
VAE decode; s/step is (program - decode) / steps, so the decode is not spread over the steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time


def _report(args, row: dict) -> None:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _model(args, dtype, param_dtype, remat: str):
    from d4k_jax.models.flux import Flux, FluxConfig
    from d4k_jax.models.mmdit import MMDiT, MMDiTConfig

    opts = dict(_option(o) for o in args.model_opt)
    if args.model == "flux":
        cfg = dataclasses.replace(FluxConfig(remat=remat), **opts)
        if args.layers:
            cfg = dataclasses.replace(cfg, num_layers=args.layers, num_single_layers=2 * args.layers)
        return Flux(cfg, dtype=dtype, param_dtype=param_dtype), 768, 512
    cfg = dataclasses.replace(MMDiTConfig(num_layers=args.layers or 24, remat=remat), **opts)
    return MMDiT(cfg, dtype=dtype, param_dtype=param_dtype), 2048, 77 + 256


def _option(text: str) -> tuple[str, object]:
    """'FIELD=VALUE' -> (field, value parsed as JSON when it is JSON: true, 3, 0.5; else the string)."""
    field, _, value = text.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def _levers(args) -> dict:
    """The levers a result was measured with (for its JSON line)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_gpu"))
    attention = os.environ.get("D4K_ATTENTION") or "auto"
    return dict(model_opt=",".join(args.model_opt), attention=attention, xla_flags=flags)


def _profile(args, run, compiled, title: str) -> None:
    """With --profile: one traced run of `run`, its top-15 op table appended to DIR/ops.md (+ .jsonl)."""
    if not args.profile:
        return
    from tools import op_profile

    os.makedirs(args.profile, exist_ok=True)
    trace = tempfile.mkdtemp(prefix="d4k_trace_")  # traces are large: only the table goes to DIR
    rows = op_profile.profile(run, trace, [compiled.as_text()])
    title = f"{title} ({', '.join(f'{k}={v}' for k, v in _levers(args).items() if v)})"
    op_profile.save(rows, os.path.join(args.profile, "ops.md"), title)
    print(op_profile.markdown(rows, title), flush=True)


def _init(module, inputs, dtype):
    import flax.linen as nn
    import jax

    small = tuple(jax.numpy.zeros((1, *x.shape[1:]), x.dtype) for x in inputs)
    return jax.jit(lambda k: nn.unbox(module.init(k, *small))["params"])(jax.random.key(0))


def _vae(model: str, dtype, abstract: bool = False):
    """The F16 VAE and its random params (abstract=True: their shapes and dtypes)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from d4k_jax.models import vae as vae_lib

    cfg = dataclasses.replace(vae_lib.FLUX_VAE if model == "flux" else vae_lib.SD3_VAE, stride=2)
    vae = vae_lib.AutoencoderKL(cfg, dtype=dtype, param_dtype=dtype)
    init = lambda k: nn.unbox(vae.init(k, jnp.zeros((1, 32, 32, 3), dtype)))["params"]
    key = jax.random.key(1)
    return vae, jax.eval_shape(init, key) if abstract else jax.jit(init)(key)


def _images_vs_bf16(args, fp8: bool, images, hlo: str) -> dict:
    """With --images=DIR: the run's uint8 images saved as DIR/MODEL_{bf16,fp8}.npy; an FP8 run reports its PSNR
    against the bf16 run's (same weights and noise: run bf16 first) and the FP8 cuBLAS GEMMs in its compiled program,
    which XLA could otherwise have turned back into bf16 ones. Random weights: how FP8 rounding propagates through
    the full-size network, not image quality (tests/test_fp8.py measures that on the trained demo pipeline)."""
    import numpy as np

    os.makedirs(args.images, exist_ok=True)
    np.save(os.path.join(args.images, f"{args.model}_{'fp8' if fp8 else 'bf16'}.npy"), images)
    reference = os.path.join(args.images, f"{args.model}_bf16.npy")
    if not fp8 or not os.path.exists(reference):
        return {}
    mse = np.mean((images.astype(np.float64) - np.load(reference)) ** 2)
    return dict(psnr_vs_bf16=float(10 * np.log10(255.0**2 / max(mse, 1e-12))), f8_gemms=hlo.count("matmul$f8"))


def sampling_program(model: str, module, vae):
    """The pipelines' jitted denoise + decode (Flux; SD3 with CFG, cond and uncond text in one batch of 2) as a
    function of (params, vae_params, latents, text, pooled, guidance, sigmas, timesteps); tools/bench compiles it
    at full size for its memory, and tests/test_fp8 traces it so that a change of the pipelines' signature
    cannot break the device script unseen."""
    import jax

    from d4k_jax.pipelines import flux as flux_pipe
    from d4k_jax.pipelines import sd3 as sd3_pipe

    if model == "flux":
        run = lambda params, *a: flux_pipe._sample(module, vae, {"params": params}, *a)
    else:
        run = lambda params, *a: sd3_pipe._sample(module, vae, {"params": params}, *a, cfg=True)
    return jax.jit(run)


def sample(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from d4k_jax.pipelines import base

    dtype, h = jnp.bfloat16, args.size // 16
    module, pooled_dim, text_len = _model(args, dtype, dtype, "none")
    vae, vae_params = _vae(args.model, dtype)
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    latents = normal(1, h, h, 16)
    sigmas = jnp.linspace(1.0, 0.0, args.steps + 1, dtype=jnp.float32)
    timesteps = 1000 * sigmas[:-1]
    if args.model == "flux":
        text, pooled, scale = normal(1, text_len, 4096), normal(1, pooled_dim), jnp.full((1,), 3.5, jnp.float32)
        params = _init(module, (latents, jnp.zeros((1,)), text, pooled, scale), dtype)
    else:  # CFG: conditional and unconditional text in one batch of 2
        text, pooled, scale = normal(2, text_len, 4096), normal(2, pooled_dim), jnp.float32(4.5)
        params = _init(module, (latents, jnp.zeros((1,)), text[:1], pooled[:1]), dtype)
    program = sampling_program(args.model, module, vae)
    inputs = (params, vae_params, latents, text, pooled, scale, sigmas, timesteps)
    t = time.perf_counter()
    program = program.lower(*inputs).compile()
    run = lambda: program(*inputs).block_until_ready()
    run()
    compile_s = time.perf_counter() - t
    peak = _peak_bytes()
    total = _median_time(run, args.repeats)
    fp8 = {}
    if args.images:  # one more run, for its images
        images = np.asarray(base.to_output(program(*inputs), "uint8"))
        fp8 = _images_vs_bf16(args, module.config.fp8, images, program.as_text())
    decode = jax.jit(lambda p, z: base.decode(vae, p, z))
    decode(vae_params, latents).block_until_ready()
    decode_s = _median_time(lambda: decode(vae_params, latents).block_until_ready(), args.repeats)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    _report(
        args,
        dict(
            bench="sample",
            model=args.model,
            device=jax.devices()[0].device_kind,
            size=args.size,
            params=n_params,
            steps=args.steps,
            cfg=args.model == "sd3",
            s_per_step=(total - decode_s) / args.steps,
            program_s=total,
            decode_s=decode_s,
            first_call_s=compile_s,
            peak_gib=peak / 2**30 if peak else None,
            **fp8,
            **_levers(args),
        ),
    )
    _profile(args, run, program, f"{args.model} sampling, {args.steps} steps at {args.size}² (+ F16 decode)")


def train(args) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from d4k_jax import flops, sharding, train_state
    from d4k_jax import train_step as ts
    from tools.bench import train_step_lowered

    dtype, s = jnp.bfloat16, args.size
    module, pooled_dim, _ = _model(args, dtype, jnp.float32, args.remat)
    text_len = 154 if args.model == "sd3" else 77
    b, h = args.batch, s // 16
    one = lambda *shape, dt=dtype: jnp.zeros((1, *shape), dt)
    small = (one(2, 2, 16, dt=jnp.float32), jnp.zeros((1,)), one(text_len, 4096), one(pooled_dim))
    if args.model == "flux":
        small = (*small, jnp.zeros((1,)))
    shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *small))["params"])
    trainable = None
    if args.model == "sd3":  # the fixed sincos table is not trained (as the Trainer does)
        trainable = traverse_util.path_aware_map(lambda k, _: k[0] != "pos_embed" or k[-1] != "pos_embed", shapes)
    tx = ts.optimizer(lr=1e-6, trainable=trainable)
    cfg = ts.LossConfig(model=args.model)
    from d4k_jax.models import vae as vae_lib

    vae_cfg = dataclasses.replace(vae_lib.SD3_VAE if args.model == "sd3" else vae_lib.FLUX_VAE, stride=2)
    vae = vae_lib.AutoencoderKL(vae_cfg, dtype=dtype, param_dtype=dtype)
    vae_small = (jnp.zeros((1, 32, 32, 3), dtype),)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    sds = jax.ShapeDtypeStruct
    if args.latents:  # precomputed latents: no VAE in the step (how much of the step the encode takes)
        vae = vae_small = None
    first = {"x0": sds((b, h, h, 16), jnp.float32)} if args.latents else {"image": sds((b, s, s, 3), jnp.float32)}
    batch_shapes = {**first, "text": sds((b, text_len, 4096), dtype)}
    batch_shapes["pooled"] = sds((b, pooled_dim), dtype)
    t = time.perf_counter()
    lowered, state_abs = train_step_lowered(
        module, small, tx, cfg, mesh, batch_shapes, vae=vae, vae_small=vae_small,
        encode_passes=b, microbatches=args.microbatches,
    )  # fmt: skip
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t

    # random weights placed as the Trainer places the loaded ones (a copy, optimizer state initialised in place)
    init = lambda k: nn.unbox(module.init(k, *small))["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        params = jax.jit(init, out_shardings=train_state.shardings_of(state_abs.params))(jax.random.key(0))
        vae_params = jax.jit(lambda k: nn.unbox(vae.init(k, *vae_small))["params"])(jax.random.key(1)) if vae else None
    state = train_state.init_train_state(params, tx, state_abs)
    del params
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.uniform(-1, 1, v.shape).astype(np.float32), v.dtype) for k, v in batch_shapes.items()}
    key = jax.random.key(2)
    times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, key, vae_params)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # the first call pays for the allocations
    fwd_args = (
        shapes,
        sds((b, h, h, 16), jnp.float32),
        sds((b,), jnp.float32),
        *(batch_shapes[k] for k in ("text", "pooled")),
    )
    if args.model == "flux":
        fwd_args = (*fwd_args, sds((b,), jnp.float32))
    model_flops = 3 * flops.forward_flops(lambda p, *a: module.apply({"params": p}, *a), *fwd_args)
    peak = flops.peak_flops(jax.devices()[0])
    _report(
        args,
        dict(
            bench="train",
            model=args.model,
            device=jax.devices()[0].device_kind,
            size=s,
            batch=b,
            microbatches=args.microbatches,
            remat=args.remat,
            vae_in_step=not args.latents,
            step_s=step_s,
            images_per_s=b / step_s,
            model_tflops_per_step=model_flops / 1e12,
            mfu=model_flops / (step_s * peak) if peak else None,
            loss=float(metrics["loss"]),
            compile_s=compile_s,
            peak_gib=(_peak_bytes() or 0) / 2**30,
            **_levers(args),
        ),
    )
    step = lambda: compiled(state, batch, key, vae_params)[1]["loss"].block_until_ready()
    _profile(args, step, compiled, f"{args.model} train step, batch {b} at {s}², remat {args.remat}")


def torch_sample(args) -> None:
    """diffusers' transformer and an Euler loop in torch bf16 on the same GPU: the per-step baseline."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_default_dtype(torch.bfloat16)
    h = args.size // 16
    with dev:
        if args.model == "flux":
            layers = dict(num_layers=args.layers, num_single_layers=2 * args.layers) if args.layers else {}
            model = FluxTransformer2DModel(guidance_embeds=True, **layers).eval()
            x = torch.randn(1, (h // 2) ** 2, 64)
            ids = torch.zeros((h // 2) ** 2, 3)
            ids[:, 1] = torch.arange(h // 2).repeat_interleave(h // 2)
            ids[:, 2] = torch.arange(h // 2).repeat(h // 2)
            kw = dict(
                encoder_hidden_states=torch.randn(1, 512, 4096),
                pooled_projections=torch.randn(1, 768),
                guidance=torch.full((1,), 3.5),
                img_ids=ids,
                txt_ids=torch.zeros(512, 3),
            )
            velocity = lambda x, t: model(x, timestep=t.expand(1) / 1000, **kw, return_dict=False)[0]
        else:
            model = SD3Transformer2DModel(
                sample_size=128, num_layers=args.layers or 24, attention_head_dim=64, num_attention_heads=24,
                caption_projection_dim=1536, pos_embed_max_size=192,
            ).eval()  # fmt: skip
            x = torch.randn(1, 16, h, h)
            text, pooled = torch.randn(2, 77 + 256, 4096), torch.randn(2, 2048)

            def velocity(x, t):
                v = model(torch.cat([x, x]), text, pooled, t.expand(2), return_dict=False)[0]
                uncond, cond = v.chunk(2)
                return uncond + 4.5 * (cond - uncond)

    sigmas = torch.linspace(1, 0, args.steps + 1, device=dev, dtype=torch.float32)

    @torch.no_grad()
    def run():
        z = x
        for i in range(args.steps):
            v = velocity(z, 1000 * sigmas[i])
            z = (z.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    run()
    total = _median_time(run, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    n_params = sum(p.numel() for p in model.parameters())
    _report(
        args,
        dict(bench="torch_sample", model=args.model, device=name, size=args.size, params=n_params,
             steps=args.steps, cfg=args.model == "sd3", s_per_step=total / args.steps, peak_gib=peak),
    )  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cmd", choices=["sample", "train", "torch_sample"])
    parser.add_argument("--model", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--size", type=int, default=0, help="default 4096")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--latents", action="store_true", help="train on precomputed latents (no VAE encode)")
    parser.add_argument("--layers", type=int, default=0, help="shrink the transformer (dry runs)")
    parser.add_argument("--model_opt", action="append", default=[], help="FIELD=VALUE of the model config")
    parser.add_argument("--attention", default="", help="the GPU flash kernel: sets D4K_ATTENTION (mgpu)")
    parser.add_argument("--profile", default="", help="append a top-15 op table of one traced run to DIR/ops.md")
    parser.add_argument("--images", default="", help="sample: save the images in DIR; an fp8 run compares to bf16's")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.size = args.size or 4096
    if args.attention:  # nn.attention reads it when a program is traced: mgpu where it fits, cuDNN elsewhere
        os.environ["D4K_ATTENTION"] = args.attention
    dict(sample=sample, train=train, torch_sample=torch_sample)[args.cmd](args)


if __name__ == "__main__":
    main()
