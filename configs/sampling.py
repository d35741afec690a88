"""The sampling settings shared by configs/flux_wlf.py and configs/sd3_wlf.py."""

import ml_collections

from d4k_jax import cli, distributed


def sampling_config(model: str, steps: int, max_sequence_length: int, arg: str | None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model
    c.seed = 0
    c.pipeline = ml_collections.config_dict.placeholder(str)  # diffusers pipeline folder or converted directory
    c.dtype = "bfloat16"
    c.vae_stride = 2  # the F16 VAE; 1 for the stock F8 VAE
    # images are sharded over the devices; every axis is listed so that each can be overridden
    # (`--config.mesh.fsdp=N` with shard_params; `sequence` > 1 splits one image's tokens)
    c.mesh = {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1}
    c.num_devices = 0  # 0: every device (of every host); n: the first n
    c.shard_params = False  # True: FSDP-shard the transformer over the mesh's `fsdp` axis (set mesh fsdp > 1)
    # True: the transformer computes q/k/v (Flux single blocks: and proj_mlp) as one matmul per stream, from the
    # same weights (FluxConfig / MMDiTConfig.fused_qkv); sampling and training, eval samples included
    c.fused_qkv = False
    # True: the transformer blocks' matmuls in FP8 (E4M3 with per-token and per-channel scales, d4k_jax/nn/fp8.py):
    # faster on Hopper-class GPUs, slightly different images (BENCHMARKS.md, "FP8 sampling"); sampling only
    c.fp8 = False
    # LoRA files merged into the transformer before sampling: "PATH[:SCALE][,PATH[:SCALE]...]" (scale 1.0 where none
    # is given), diffusers / peft or kohya safetensors (d4k_jax/io/lora.py); "" for none
    c.lora = ""
    # several processes (hosts): coordinator_address HOST:PORT, num_processes, process_id, or auto=True where JAX
    # detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU); see d4k_jax/distributed.py
    c.distributed = ml_collections.ConfigDict(distributed.DEFAULTS)
    # compiled programs kept here between runs (JAX's persistent compilation cache; "" turns it off): JAX's
    # JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/d4k_jax/jax_cache (d4k_jax/cli.py)
    c.compilation_cache = cli.default_compilation_cache()
    c.sample = ml_collections.ConfigDict(
        dict(
            height=4096,
            width=4096,
            steps=steps,
            guidance=7.0,
            images_per_prompt=1,
            batch_size=0,
            max_sequence_length=max_sequence_length,
            format="jpeg",
            negative_prompt="",
        )
    )  # batch_size 0: one image per device per step
    if arg == "tiny":
        c.dtype = "float32"
        c.sample.update(height=32, width=32, steps=4, max_sequence_length=16)
    elif arg:
        raise ValueError(f"unknown config variant {arg!r} (use :tiny or nothing)")
    return c
