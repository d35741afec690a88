"""SD3-medium with the F16 VAE (Diffusion-4K). Sampling now; the WLF training recipe joins with training.

  python -m d4k_jax.sample --config=configs/sd3_wlf.py --config.pipeline=/models/sd3-medium \\
      --prompts=eval/size_4096/metadata.jsonl --outdir=/out/sd34k
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "sd3"
    c.seed = 0
    c.pipeline = ml_collections.config_dict.placeholder(str)  # diffusers SD3 folder or converted directory
    c.dtype = "bfloat16"
    c.vae_stride = 2  # the F16 VAE; 1 for the stock F8 VAE
    c.mesh = {"data": -1}  # images are sharded over the devices
    c.num_devices = 0  # 0: every device (of every host); n: the first n
    c.shard_params = False  # True: FSDP-shard the transformer over the mesh's `fsdp` axis (set mesh fsdp > 1)
    c.distributed = False  # True on multi-host (TPU pods, GPU clusters): jax.distributed.initialize() first
    c.sample = ml_collections.ConfigDict(
        dict(
            height=4096,
            width=4096,
            steps=28,
            guidance=7.0,
            images_per_prompt=1,
            batch_size=0,
            max_sequence_length=256,
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
