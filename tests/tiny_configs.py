"""Tiny transformer configs shared by the tests that only trace, compile or run small blocks (no torch here).

Flux: one double-stream and one single-stream block, 16 latent channels packed 2x2, RoPE axes (2, 2, 4).
SD3: two joint blocks (the last one context-pre-only) on 4-channel latents, 2x2 patches, 8x8 positions.
Heads and head width vary with what a test splits (tensor, sequence), so they are arguments.
"""

from __future__ import annotations

from d4k_jax.models.flux import FluxConfig
from d4k_jax.models.mmdit import MMDiTConfig


def tiny_flux(heads: int, head_dim: int = 8, text_dim: int = 24, **overrides) -> FluxConfig:
    return FluxConfig(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=12,
        axes_dims_rope=(2, 2, 4),
        **overrides,
    )


def tiny_sd3(heads: int, head_dim: int = 8, **overrides) -> MMDiTConfig:
    fields = dict(sample_size=8, in_channels=4, num_layers=2, joint_attention_dim=20, caption_projection_dim=32)
    fields |= dict(pooled_projection_dim=12, pos_embed_max_size=8)
    return MMDiTConfig(attention_head_dim=head_dim, num_attention_heads=heads, **fields | overrides)


def tiny_sd35(heads: int, head_dim: int = 8, **overrides) -> MMDiTConfig:
    """SD3.5-shaped: per-head RMS qk-norm and a dual-attention first block."""
    return tiny_sd3(heads, head_dim, dual_attention_layers=(0,), qk_norm="rms_norm", **overrides)
