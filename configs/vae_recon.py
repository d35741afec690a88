"""VAE reconstruction: encode images with the (F16) VAE and decode them back.

python -m d4k_jax.reconstruct --config=configs/vae_recon.py --config.vae_path=FLUX/vae --workdir=DIR
python -m d4k_jax.reconstruct --config=configs/vae_recon.py:tiny --workdir=DIR   # the demo VAE, 64², CPU
"""

from pathlib import Path

import ml_collections

from d4k_jax import distributed

DEMO_VAE = str(Path(__file__).resolve().parent.parent / "d4k_jax" / "data" / "demo_pipeline" / "vae")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.vae_path = ml_collections.config_dict.placeholder(str)  # diffusers vae folder or converted one
    c.stride = 2  # 2: the F16 VAE of Diffusion-4K; 1: the stock F8 VAE
    c.shifted_tail = False  # (quirk) reproduce the reference's one-pixel shift of the F16 decode
    c.images = ml_collections.config_dict.placeholder(str)  # a folder of images; default: the demo set
    c.num_images = 8
    c.image_size = 4096
    c.batch_size = 1
    c.dtype = "bfloat16"
    c.sample_posterior = False  # decode the posterior mean (False) or a sample (True)
    # rows of every activation are split over the devices; every axis is listed so that each can be overridden
    c.mesh = {"data": 1, "fsdp": 1, "sequence": -1, "tensor": 1}
    c.distributed = ml_collections.ConfigDict(distributed.DEFAULTS)  # several processes: d4k_jax/distributed.py
    c.random_vae = ml_collections.ConfigDict(
        {"enabled": False, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
    )
    if arg == "tiny":
        c.vae_path = DEMO_VAE  # the small F16 VAE trained on the demo set (tools/make_demo_pipeline.py)
        c.num_images = 4
        c.image_size = 64
        c.dtype = "float32"
    elif arg:
        raise ValueError(f"unknown config variant {arg!r}; use configs/vae_recon.py or configs/vae_recon.py:tiny")
    return c
