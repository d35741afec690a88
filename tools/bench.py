"""Benchmarks: `python -m tools.bench vae_memory [--devices=8]` and friends. Results go to BENCHMARKS.md.

vae_memory: XLA's compiled memory analysis of the bf16 F16 VAE decode (and encode) of 4096² images,
on one device and spatially sharded over `--devices` (fake CPU devices are enough: nothing runs).
train_memory: the same for the whole SD3-medium / FLUX.1-dev train step at 4096² (images encoded by the
frozen VAE inside it, AdamW), FSDP over n devices, smallest n that fits `--budget` bytes per device:
`python -m tools.bench train_memory --model=sd3|flux [--devices=1,2,4,8] [--all]`.
(The LoRA train step's memory: tools/lora_bench.py.)
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


def _timings(run, repeats: int, warmup: int = 3) -> float:
    """Median wall time of run() in seconds, after `warmup` calls (compilation, caches)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _full_size(model: str, batch: int, size: int, text_len: int, dtype, remat: str, param_dtype=None):
    """(module, abstract inputs, small inputs) of FLUX.1-dev or SD3-medium at size² pixels (F16 latents);
    parameters stored in `param_dtype` (default: the compute `dtype`)."""
    import jax
    import jax.numpy as jnp

    from d4k_jax.models.flux import Flux, FluxConfig
    from d4k_jax.models.mmdit import MMDiT, MMDiTConfig

    sds, h = jax.ShapeDtypeStruct, size // 16
    param_dtype = param_dtype or dtype
    if model == "flux":
        module = Flux(FluxConfig(remat=remat), dtype=dtype, param_dtype=param_dtype)
        shapes = [(h, h, 16), (), (text_len, 4096), (768,), ()]
    else:
        module = MMDiT(
            MMDiTConfig(num_layers=24, caption_projection_dim=1536, remat=remat), dtype=dtype, param_dtype=param_dtype
        )
        shapes = [(h, h, 16), (), (text_len, 4096), (2048,)]
    dtypes = [dtype, jnp.float32, dtype, dtype, jnp.float32]
    inputs = tuple(sds((batch, *s), d) for s, d in zip(shapes, dtypes, strict=False))
    small = tuple(
        jnp.zeros((1, 2, 2, 16) if i == 0 else (1, *s), d) for i, (s, d) in enumerate(zip(shapes, dtypes, strict=False))
    )
    return module, inputs, small


def forward_memory(args) -> None:
    """Compiled memory of one full-size forward (FLUX.1-dev or SD3-medium) at args.size², nothing executed."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    text_len = args.text_len or (512 if args.model == "flux" else 154)
    module, inputs, small = _full_size(args.model, args.batch, args.size, text_len, dtype, args.remat)
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *small))["params"])
    t = time.perf_counter()
    compiled = jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(params, *inputs).compile()
    m = compiled.memory_analysis()
    gib = lambda b: b / 2**30
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    tokens = (args.size // 32) ** 2
    sizes = f"args {gib(m.argument_size_in_bytes):.2f} GiB, temp {gib(m.temp_size_in_bytes):.2f} GiB"
    print(
        f"{args.model} {dtype} forward, batch {args.batch}, {args.size}² ({tokens} image + {text_len} text tokens) "
        f"on {jax.default_backend()}: {sizes}, peak {gib(peak):.2f} GiB (compile {time.perf_counter() - t:.0f}s)"
    )


def tiny_forward(args) -> None:
    """Forward time of a tiny Flux or SD3, d4k_jax vs diffusers, same inputs and CPU threads, both warmed up."""
    import pathlib
    import tempfile

    import jax
    import numpy as np
    import torch

    sys.path.insert(0, "tests")
    from helpers import save_component

    from conversion import load_component

    rng = np.random.default_rng(0)
    b = args.batch
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    if args.model == "flux":
        from torch_flux import flux_forward as ref_forward
        from torch_flux import make_flux as make

        a = (r(b, 32, 32, 4), np.full(b, 0.5, np.float32), r(b, 77, 24), r(b, 12), np.full(b, 3.5, np.float32))
    else:
        from torch_sd3 import make_sd3 as make
        from torch_sd3 import sd3_forward as ref_forward

        a = (r(b, 24, 24, 4), np.full(b, 500.0, np.float32), r(b, 77, 20), r(b, 12))
    model = make(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        module, params = load_component(save_component(model, pathlib.Path(tmp) / "m"))
    fn = jax.jit(module.apply)
    runs = {
        "d4k_jax": lambda: fn({"params": params}, *a).block_until_ready(),
        "diffusers": lambda: ref_forward(model, *a),
    }
    for name, run in runs.items():
        times = _timings(run, args.repeats)
        print(
            f"{name:9s} tiny {args.model} forward, batch {b}, inputs {[x.shape for x in a[:1]]}: median "
            f"{1e3 * times:.1f} ms over {args.repeats} runs, torch threads {torch.get_num_threads()}"
        )


def tiny_steps(args) -> None:
    """Seconds per denoising step of a tiny Flux / SD3 pipeline, d4k_jax vs diffusers: (t(2n) - t(n)) / n, so
    that prompt encoding and decoding cancel out; same prompts and noise, both warmed up."""
    import pathlib
    import tempfile

    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, "tests")
    from tiny_pipelines import flux_pipeline, sd3_pipeline

    from d4k_jax.pipelines.flux import FluxPipeline
    from d4k_jax.pipelines.sd3 import SD3Pipeline

    prompts = ["a red cat on the sky", "a blue dog"]
    with tempfile.TemporaryDirectory() as tmp:
        ref = (flux_pipeline if args.model == "flux" else sd3_pipeline)(pathlib.Path(tmp))
        ours = (FluxPipeline if args.model == "flux" else SD3Pipeline).from_pretrained(
            pathlib.Path(tmp) / args.model, dtype=jnp.float32
        )
    latents = np.random.default_rng(0).normal(size=(2, 16, 16, 4)).astype(np.float32)  # 32x32 pixels
    torch_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    if args.model == "flux":
        torch_latents = ref._pack_latents(torch_latents, 2, 4, 16, 16)
    kw = dict(height=32, width=32, max_sequence_length=16)
    runs = {
        "d4k_jax": lambda n: np.asarray(ours(prompts, num_inference_steps=n, latents=latents, **kw)),
        "diffusers": lambda n: ref(prompts, num_inference_steps=n, latents=torch_latents, output_type="np", **kw),
    }
    n = args.steps
    for name, run in runs.items():
        with torch.no_grad():  # JAX compiles once per step count: the warm-up call covers it
            timings = {k: _timings(lambda k=k, run=run: run(k), args.repeats, warmup=1) for k in (n, 2 * n)}
        per_step = (timings[2 * n] - timings[n]) / n
        print(
            f"{name:9s} tiny {args.model} pipeline, batch 2, 32x32 ({'CFG, ' if args.model == 'sd3' else ''}"
            f"{n} vs {2 * n} steps): {1e3 * per_step:.2f} ms/step (torch threads {torch.get_num_threads()})"
        )


def pipeline_memory(args) -> None:
    """Compiled memory of the whole bf16 sampling program (denoising loop + VAE decode) at args.size² on one
    device: the peak one device needs once the text encoders are released."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from d4k_jax.models import vae as vae_lib
    from tools import bench_gpu

    dtype = jnp.dtype(args.dtype)
    text_len = 512 if args.model == "flux" else 77 + 256  # sampling: T5 512 (Flux); 77 CLIP + 256 T5 (SD3)
    module, inputs, small = _full_size(args.model, 1, args.size, text_len, dtype, "none")
    vae = vae_lib.AutoencoderKL(
        dataclasses.replace(vae_lib.FLUX_VAE if args.model == "flux" else vae_lib.SD3_VAE, stride=2),
        dtype=dtype,
        param_dtype=dtype,
    )
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *small))["params"])
    vae_params = jax.eval_shape(
        lambda: nn.unbox(vae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), dtype)))["params"]
    )
    sigmas = jax.ShapeDtypeStruct((args.steps + 1,), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((args.steps,), jnp.float32)
    latents, _, text, pooled = inputs[:4]
    t = time.perf_counter()
    fn = bench_gpu.sampling_program(args.model, module, vae)
    if args.model == "flux":
        lowered = fn.lower(params, vae_params, latents, text, pooled, inputs[4], sigmas, timesteps)
    else:  # CFG: cond and uncond text in one batch of 2
        two = lambda x: jax.ShapeDtypeStruct((2, *x.shape[1:]), x.dtype)
        lowered = fn.lower(
            params,
            vae_params,
            latents,
            two(text),
            two(pooled),
            jax.ShapeDtypeStruct((), jnp.float32),
            sigmas,
            timesteps,
        )
    m = lowered.compile().memory_analysis()
    gib = lambda b: b / 2**30
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    print(
        f"{args.model} {dtype} sampling program ({args.steps} steps + F16 decode) at {args.size}² on "
        f"{jax.default_backend()}: args {gib(m.argument_size_in_bytes):.2f} GiB, temp {gib(m.temp_size_in_bytes):.2f}"
        f" GiB, peak {gib(peak):.2f} GiB (compile {time.perf_counter() - t:.0f}s)"
    )


def tiny_train_step(args) -> None:
    """One training step of a tiny Flux (WLF loss, AdamW), d4k_jax (jitted) vs torch (diffusers + the reference
    loss, autograd, torch.optim.AdamW), same batch, both warmed up."""
    import pathlib
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, "tests")
    from helpers import save_component
    from test_train_step import _torch_loss
    from torch_flux import make_flux

    from conversion import load_component
    from d4k_jax import train_step as ts

    model = make_flux(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        module, params = load_component(save_component(model, pathlib.Path(tmp) / "m"))
    rng = np.random.default_rng(0)
    b = args.batch
    x0, eps = rng.normal(size=(2, b, 32, 32, 4)).astype(np.float32)
    text, pooled = rng.normal(size=(b, 77, 24)).astype(np.float32), rng.normal(size=(b, 12)).astype(np.float32)
    sigma = np.linspace(0.1, 0.9, b).astype(np.float32)
    tx = ts.optimizer(lr=1e-6)
    state = ts.TrainState(jnp.int32(0), params, tx.init(params))
    batch = {"x0": jnp.asarray(x0), "text": jnp.asarray(text), "pooled": jnp.asarray(pooled)}
    step = jax.jit(lambda s, bt, k: ts.train_step(s, bt, k, model=module, tx=tx, cfg=ts.LossConfig()), donate_argnums=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-4)

    def torch_step():
        opt.zero_grad()
        loss = _torch_loss("flux", model, x0, eps, sigma, text, pooled)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def jax_step():
        nonlocal state
        state, metrics = step(state, batch, jax.random.key(0))
        metrics["loss"].block_until_ready()

    for name, run in (("d4k_jax", jax_step), ("torch", torch_step)):
        times = _timings(run, args.repeats)
        print(
            f"{name:8s} tiny Flux train step, batch {b}, 256 image + 77 text tokens: median "
            f"{1e3 * times:.1f} ms over {args.repeats} (torch threads {torch.get_num_threads()})"
        )


def train_step_lowered(
    module,
    small,
    tx,
    cfg,
    mesh,
    batch: dict,
    *,
    vae=None,
    vae_small=None,
    encode_passes=1,
    microbatches=1,
    trained=None,
    base=None,
):
    """The Trainer's jitted train step (d4k_jax.train_state: the same state shardings, in/out shardings,
    donation and "finite" metric) lowered from abstract shapes, nothing allocated.

    `small` are inputs that `module.init` accepts; `batch` maps "image" (or "x0"), "text" and "pooled" to
    global ShapeDtypeStructs. A frozen `vae` (its parameter shapes from `vae.init(key, *vae_small)`,
    replicated as the Trainer places them) encodes images inside the step in `encode_passes` passes. Rules:
    sharding.DEFAULT_RULES; nan_policy 'stop'. LoRA: `trained` the abstract adapters (d4k_jax.lora.abstract) and
    `base` the frozen train_step.Frozen of ShapeDtypeStructs with shardings. Returns (lowered, abstract state); the
    state's leaves carry their shardings.
    """
    import flax.linen as nn
    import jax

    from d4k_jax import sharding, train_state

    rules = sharding.DEFAULT_RULES
    state = train_state.abstract_train_state(module, small, tx, mesh, rules, params=trained)
    step = train_state.make_train_step(
        module,
        tx,
        cfg,
        mesh,
        rules,
        train_state.shardings_of(state),
        vae=vae,
        microbatches=microbatches,
        encode_passes=encode_passes,
        base_sharding=None if base is None else train_state.shardings_of(base),
    )
    vae_params = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), *vae_small))["params"] if vae else None
    return train_state.lower_train_step(step, mesh, state, batch, vae_params, base=base), state


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax
    import numpy as np

    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)


def _saved_for_backward(module, params, cfg, x0, text, pooled) -> int | None:
    """Bytes the transformer's forward keeps for its backward pass (jax's saved residuals under the remat
    policy, in the program's own dtypes, parameters excluded) for these inputs: backend-independent."""
    import jax
    import jax.numpy as jnp

    from d4k_jax import train_step as ts

    try:
        from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints
    except ImportError:
        return None
    sigma = jax.ShapeDtypeStruct(x0.shape[:1], jnp.float32)

    def loss(p, x0, noise, sigma, text, pooled):
        return ts.loss_from_noise(module, p, {"x0": x0, "text": text, "pooled": pooled}, noise, sigma, cfg)

    residuals = saved_residuals(loss, params, x0, x0, sigma, text, pooled)
    return sum(a.size * a.dtype.itemsize for a, why in residuals if not why.startswith("from the argument"))


def train_memory(args) -> None:
    """Compiled memory of the whole full-size train step (SD3-medium or FLUX.1-dev at args.size², images
    encoded by the frozen F16 VAE inside the step, WLF loss, clip + AdamW with fp32 state, transformer
    remat), FSDP over n devices for n in args.devices, stopping at the first n whose per-device peak fits
    args.budget bytes. On a CPU-only host the devices are fake host devices (main sets XLA_FLAGS); on a
    GPU/TPU host the real devices are used and larger n are skipped."""
    import dataclasses

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from d4k_jax import train_step as ts
    from d4k_jax.models import vae as vae_lib
    from d4k_jax.nn import attention
    from tools.collectives import collectives, summary

    if args.attention_chunk:  # queries per chunk of the chunked (non-cuDNN) attention; the library's default is 1024
        attention.dot_product_attention.__kwdefaults__["chunk_size"] = args.attention_chunk
    dtype = jnp.dtype(args.dtype)
    sd3 = args.model == "sd3"
    per_device = args.batch or (8 if sd3 else 4)
    text_len = args.text_len or (154 if sd3 else 77)
    s, pooled = args.size, 2048 if sd3 else 768
    module, _, small = _full_size(args.model, 1, s, text_len, dtype, args.remat, param_dtype=jnp.float32)
    vae_cfg = dataclasses.replace(vae_lib.SD3_VAE if sd3 else vae_lib.FLUX_VAE, stride=2)
    vae = vae_lib.AutoencoderKL(vae_cfg, dtype=dtype, param_dtype=dtype)  # frozen: stored in the compute dtype
    vae_small = (jnp.zeros((1, 32, 32, 3), dtype),)
    shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *small))["params"])
    # SD3's sincos position table is a parameter but not trained (as the reference): no moments for it. A
    # static mask: optax.tree_map_params (the Trainer's moment shardings) cannot call a mask function.
    trainable = None
    if sd3:
        trainable = traverse_util.path_aware_map(lambda k, _: k[0] != "pos_embed" or k[-1] != "pos_embed", shapes)
    tx = ts.optimizer(lr=1e-6, trainable=trainable)
    cfg = ts.LossConfig(model=args.model)
    devices = jax.devices()
    gib = lambda b: b / 2**30
    tokens = jax.ShapeDtypeStruct((1, (s // 32) ** 2 + text_len, 1, 64), dtype)  # what the joint attention sees
    print(
        f"{args.model} train step at {s}² on {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}): "
        f"per-device batch {per_device} (encode passes {per_device}, microbatches {args.microbatches}), "
        f"text {text_len}x4096 + pooled {pooled}, "
        f"compute {dtype}, params fp32, AdamW fp32, VAE {dtype}, remat {args.remat!r}, attention "
        f"{attention.choose_implementation(tokens, tokens, has_bias=False, has_mask=False)} "
        f"(chunk {attention.dot_product_attention.__kwdefaults__['chunk_size']}), "
        f"budget {args.budget / 1e9:.1f} GB ({gib(args.budget):.2f} GiB) per device",
        flush=True,
    )
    one = lambda *shape, dt=dtype: jax.ShapeDtypeStruct((per_device, *shape), dt)
    saved = _saved_for_backward(
        module, shapes, cfg, one(s // 16, s // 16, 16, dt=jnp.float32), one(text_len, 4096), one(pooled)
    )
    if saved is not None:  # activations are batch-sharded: one device keeps its per-device batch's share
        print(f"  saved for the backward pass, per device (program dtypes, remat {args.remat!r}): {gib(saved):.2f} GiB")
    for n in args.devices:
        if n > len(devices):
            print(f"  fsdp={n}: skipped, only {len(devices)} devices here")
            continue
        mesh = _train_mesh(n, args.hosts, devices)
        b = per_device * n
        batch = {
            "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),  # as the loader ships them
            "text": jax.ShapeDtypeStruct((b, text_len, 4096), dtype),
            "pooled": jax.ShapeDtypeStruct((b, pooled), dtype),
        }
        t = time.perf_counter()
        lowered, state = train_step_lowered(
            module,
            small,
            tx,
            cfg,
            mesh,
            batch,
            vae=vae,
            vae_small=vae_small,
            encode_passes=per_device,
            microbatches=args.microbatches,
        )
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        seconds = time.perf_counter() - t
        arg, out, alias, temp = (
            m.argument_size_in_bytes,
            m.output_size_in_bytes,
            m.alias_size_in_bytes,
            m.temp_size_in_bytes,
        )
        peak = arg + out - alias + temp
        params, moments = _per_device_bytes(state.params), _per_device_bytes(state.opt_state)
        print(
            f"  {_mesh_name(mesh)} (global batch {b}): args {gib(arg):.2f} GiB (params {gib(params):.2f}, AdamW "
            f"{gib(moments):.2f}), out {gib(out):.2f}, alias {gib(alias):.2f}, temp {gib(temp):.2f}, "
            f"peak = args + out - alias + temp = {gib(peak):.2f} GiB ({peak / 1e9:.1f} GB): "
            f"{'fits' if peak <= args.budget else 'does not fit'} (compile {seconds:.0f}s)",
            flush=True,
        )
        if args.hosts > 1:
            per_host = n // args.hosts
            print(f"  collectives ({per_host} devices per host): {summary(collectives(compiled.as_text(), per_host))}")
        if peak <= args.budget and not args.all:
            break


def _mesh_name(mesh) -> str:
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items() if s > 1) or "one device"


def _train_mesh(n: int, hosts: int, devices: list):
    """FSDP over n devices; with hosts > 1 the hybrid mesh sharding.make_mesh builds for train.mesh_dcn's
    default on `hosts` hosts of n / hosts devices (data across hosts, FSDP within each), its granules taken
    as consecutive blocks of the devices (fake CPU devices of one process have no host of their own)."""
    import numpy as np
    from jax.sharding import Mesh

    from d4k_jax import sharding

    if hosts == 1:
        return sharding.make_mesh({"data": 1, "fsdp": n}, devices[:n])
    return Mesh(np.array(devices[:n]).reshape(hosts, n // hosts, 1, 1), sharding.MESH_AXES)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("vae_memory", help="compiled memory of the 4096² F16 VAE encode/decode")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--devices", type=int, default=1, help="also analyse sharding over this many devices")
    p = sub.add_parser("forward_memory", help="compiled memory of a full-size FLUX.1-dev / SD3-medium forward")
    p.add_argument("--model", choices=["flux", "sd3"], default="flux")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text_len", type=int, default=0, help="default: 512 (Flux), 154 (SD3)")
    p.add_argument("--remat", default="none")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p = sub.add_parser("tiny_forward", help="tiny Flux / SD3 forward time, d4k_jax vs diffusers")
    p.add_argument("--model", choices=["flux", "sd3"], default="flux")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p = sub.add_parser("tiny_steps", help="tiny pipeline seconds per denoising step, d4k_jax vs diffusers")
    p.add_argument("--model", choices=["flux", "sd3"], default="flux")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("pipeline_memory", help="compiled memory of the whole 4K sampling program on one device")
    p.add_argument("--model", choices=["flux", "sd3"], default="flux")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p = sub.add_parser("train_memory", help="compiled memory of the full-size 4096² train step, FSDP over n devices")
    p.add_argument("--model", choices=["flux", "sd3"], default="sd3")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=0, help="per-device batch; default 8 (SD3), 4 (Flux)")
    p.add_argument("--text_len", type=int, default=0, help="default: 154 (SD3), 77 (Flux)")
    p.add_argument("--remat", default="full")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--devices", type=_ints, default=None, help="fsdp sizes; default 1,2,4,8 (SD3), 4,8,16,32 (Flux)")
    p.add_argument("--budget", type=float, default=80e9, help="bytes per device")
    p.add_argument("--attention_chunk", type=int, default=0, help="queries per chunk of the chunked attention")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation over this many slices")
    p.add_argument("--all", action="store_true", help="do not stop at the first fitting size")
    p.add_argument("--hosts", type=int, default=1, help="n devices as this many hosts: data across, FSDP within")
    p = sub.add_parser("tiny_train_step", help="tiny Flux train step, d4k_jax vs torch")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.cmd == "train_memory" and args.devices is None:
        args.devices = [1, 2, 4, 8] if args.model == "sd3" else [4, 8, 16, 32]
    # fake host devices; the flag only touches the CPU platform, so GPU/TPU hosts still use their own devices
    fake = max(args.devices) if isinstance(getattr(args, "devices", 1), list) else getattr(args, "devices", 1)
    if fake > 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={fake}"
    commands = dict(
        vae_memory=vae_memory,
        forward_memory=forward_memory,
        tiny_forward=tiny_forward,
        tiny_train_step=tiny_train_step,
        tiny_steps=tiny_steps,
        pipeline_memory=pipeline_memory,
        train_memory=train_memory,
    )
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
