"""FLUX.1-dev with the F16 VAE (Diffusion-4K). Training (the reference recipe) and sampling.

  python -m d4k_jax.sample --config=configs/flux_wlf.py --config.pipeline=/models/FLUX.1-dev \\
      --prompts=eval/size_4096/metadata.jsonl --outdir=/out/flux4k
"""

import ml_collections

from configs.sampling import sampling_config
from configs.training import add_training, tiny_lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base = "tiny" if arg == "tiny_lora" else arg  # :tiny_lora is :tiny training LoRA adapters
    c = sampling_config("flux", steps=50, max_sequence_length=512, arg=base)  # reference scripts: guidance 7.0
    c = add_training(c, base)
    return tiny_lora(c) if arg == "tiny_lora" else c
