"""Tiny random diffusers AutoencoderKLs, and the independent torch reference of the F16 VAE (REFERENCE.md §1),
which lives in tools/torch_f16.py (shared with tools/parity.py) and is re-exported here."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from tools.torch_f16 import f16_decode, f16_encode

__all__ = ["f16_decode", "f16_encode", "make_vae"]


def make_vae(seed: int = 0, **config) -> AutoencoderKL:
    """A diffusers AutoencoderKL with every parameter randomised (GroupNorm affine included)."""
    defaults = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * len(config.get("block_out_channels", (32, 64))),
        up_block_types=("UpDecoderBlock2D",) * len(config.get("block_out_channels", (32, 64))),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**defaults, **config}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(p + 0.1 * torch.randn_like(p))
    return vae
