"""Tiny random diffusers SD3 transformers, run as StableDiffusion3Pipeline runs them."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import SD3Transformer2DModel

TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=20,
    caption_projection_dim=32,
    pooled_projection_dim=12,
    out_channels=4,
    pos_embed_max_size=12,
)


def make_sd3(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # every parameter random (not the zero-initialised ones), the sincos table kept
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn_like(p))
    return model


@torch.no_grad()
def sd3_forward(model, latents_nhwc, timestep, text, pooled) -> np.ndarray:
    dtype = model.dtype
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(dtype)
    out = model(
        hidden_states=t(latents_nhwc.transpose(0, 3, 1, 2)),
        timestep=torch.from_numpy(np.asarray(timestep, np.float32)),
        encoder_hidden_states=t(text),
        pooled_projections=t(pooled),
        return_dict=False,
    )[0]
    return out.float().numpy().transpose(0, 2, 3, 1)
