"""FLUX.1-dev with the F16 VAE (Diffusion-4K). Sampling settings now; the WLF training recipe joins with
the training CLI.

  python -m d4k_jax.sample --config=configs/flux_wlf.py --config.pipeline=/models/FLUX.1-dev \\
      --prompts=eval/size_4096/metadata.jsonl --outdir=/out/flux4k
"""

import ml_collections

from configs.sampling import sampling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return sampling_config("flux", steps=50, max_sequence_length=512, arg=arg)  # reference scripts: guidance 7.0
