"""Tiny random diffusers Flux transformers, run the way diffusers' FluxPipeline runs them."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def make_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # every parameter random (qk-norm scales included), at a scale that keeps outputs O(1)
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn_like(p))
    return model


@torch.no_grad()
def flux_forward(model, latents_nhwc, timestep, text, pooled, guidance=None) -> np.ndarray:
    """Velocity [B, H, W, C] (float32) from diffusers for NHWC latents, packing as FluxPipeline does;
    inputs are cast to the model's dtype."""
    dtype = model.dtype
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32)).to(dtype)
    b, h, w, c = latents_nhwc.shape
    packed = FluxPipeline._pack_latents(t(latents_nhwc.transpose(0, 3, 1, 2)), b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", dtype)
    out = model(
        hidden_states=packed,
        timestep=t(timestep),
        guidance=t(guidance),
        pooled_projections=t(pooled),
        encoder_hidden_states=t(text),
        txt_ids=torch.zeros(text.shape[1], 3, dtype=dtype),
        img_ids=img_ids,
        return_dict=False,
    )[0]
    # FluxPipeline._unpack_latents works in pixel units (vae_scale_factor 8 -> latents h = height // 8)
    unpacked = FluxPipeline._unpack_latents(out.float(), h * 8, w * 8, 8)
    return unpacked.numpy().transpose(0, 2, 3, 1)
