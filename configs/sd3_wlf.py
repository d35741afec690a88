"""SD3-medium with the F16 VAE (Diffusion-4K). Sampling settings now; the WLF training recipe joins with
the training CLI.

  python -m d4k_jax.sample --config=configs/sd3_wlf.py --config.pipeline=/models/sd3-medium \\
      --prompts=eval/size_4096/metadata.jsonl --outdir=/out/sd34k
"""

import ml_collections

from configs.sampling import sampling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return sampling_config("sd3", steps=28, max_sequence_length=256, arg=arg)  # CFG 7.0, empty negative prompt
