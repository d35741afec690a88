"""SD3-medium with the F16 VAE (Diffusion-4K). Training (the reference recipe) and sampling.

  python -m d4k_jax.sample --config=configs/sd3_wlf.py --config.pipeline=/models/sd3-medium \\
      --prompts=eval/size_4096/metadata.jsonl --outdir=/out/sd34k
"""

import ml_collections

from configs.sampling import sampling_config
from configs.training import add_training, tiny_lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base = "tiny" if arg == "tiny_lora" else arg  # :tiny_lora is :tiny training LoRA adapters
    c = sampling_config("sd3", steps=28, max_sequence_length=256, arg=base)  # CFG 7.0, empty negative prompt
    c = add_training(c, base)
    return tiny_lora(c) if arg == "tiny_lora" else c
