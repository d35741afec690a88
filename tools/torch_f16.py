"""The independent torch reference of the F16 VAE (REFERENCE.md §1), on a diffusers AutoencoderKL's weights.

diffusers has no F16 VAE: the F16 model is the F8 one's weights with the encoder's conv_in at stride 2 and
a nearest 2x upsample before the decoder's conv_out. tools/parity.py and the tests (tests/torch_vae.py)
share this reference; it needs torch and diffusers (test and tooling dependencies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


@torch.no_grad()
def f16_encode(vae: AutoencoderKL, x: torch.Tensor):
    """The F16 encoder: the same weights with conv_in at stride 2. (mean, logvar), NCHW."""
    vae.encoder.conv_in.stride = (2, 2)
    try:
        dist = vae.encode(x).latent_dist
    finally:
        vae.encoder.conv_in.stride = (1, 1)
    return dist.mean, dist.logvar


@torch.no_grad()
def f16_decode(vae: AutoencoderKL, z: torch.Tensor, shifted: bool) -> torch.Tensor:
    """The F16 decoder tail: GroupNorm -> SiLU -> nearest 2x -> conv_out.

    shifted=True is the reference's partitioned decode: the tail on a 2x2 grid of tiles, each cut with
    one pixel of overlap, zero padded on its outer sides and cropped after the conv.
    """
    d = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = d.mid_block(d.conv_in(z))
    for block in d.up_blocks:
        h = block(h)
    h = d.conv_act(d.conv_norm_out(h))
    if not shifted:
        return d.conv_out(F.interpolate(h, scale_factor=2, mode="nearest"))
    H, W = h.shape[2:]
    th, tw = H // 2, W // 2
    rows = []
    for i in (0, th):
        row = []
        for j in (0, tw):
            tile = h[:, :, max(i - 1, 0) : min(i + th + 1, H), max(j - 1, 0) : min(j + tw + 1, W)]
            # grow the tile by one zero pixel on the side where it was clipped at the image edge
            tile = F.pad(tile, (1 if j == 0 else 0, 0 if j == 0 else 1, 1 if i == 0 else 0, 0 if i == 0 else 1))
            tile = d.conv_out(F.interpolate(tile, scale_factor=2, mode="nearest"))
            row.append(tile[:, :, 1 : 2 * th + 1, 1 : 2 * tw + 1])
        rows.append(torch.cat(row, dim=3))
    return torch.cat(rows, dim=2)
