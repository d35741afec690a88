"""diffusers `AutoencoderKL` <-> `d4k_jax.models.vae`: config translation and key map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from d4k_jax.models.keymap import Rule, structural_rules
from d4k_jax.models.vae import VAEConfig

CLASS_NAMES = ("AutoencoderKL",)
_OURS = ("stride", "shifted_tail")  # keys d4k_jax adds to diffusers' config


def config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers config.json dict (with the reference's "stride" key, if any)."""
    blocks = tuple(cfg.get("block_out_channels", (64,)))
    down = cfg.get("down_block_types", ("DownEncoderBlock2D",) * len(blocks))
    up = cfg.get("up_block_types", ("UpDecoderBlock2D",) * len(blocks))
    problems = []
    if set(down) != {"DownEncoderBlock2D"} or len(down) != len(blocks):
        problems.append(f"down_block_types {down} (expected {len(blocks)} x DownEncoderBlock2D)")
    if set(up) != {"UpDecoderBlock2D"} or len(up) != len(blocks):
        problems.append(f"up_block_types {up} (expected {len(blocks)} x UpDecoderBlock2D)")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        problems.append(f"act_fn {cfg['act_fn']!r} (expected 'silu')")
    if cfg.get("norm_type", "group") != "group":
        problems.append(f"norm_type {cfg['norm_type']!r} (expected 'group')")
    if problems:
        raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4),
        block_out_channels=blocks,
        layers_per_block=cfg.get("layers_per_block", 1),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
        use_quant_conv=cfg.get("use_quant_conv", True),
        use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0,
        stride=cfg.get("stride", 1),
        shifted_tail=cfg.get("shifted_tail", False),
    )


def diffusers_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json diffusers itself can load: our own keys removed."""
    return {k: v for k, v in cfg.items() if k not in _OURS}


def rules(config: VAEConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
    """The module tree mirrors diffusers' names, so the key map is the naming rule."""
    del config  # the module tree mirrors diffusers' names
    return structural_rules(shapes)
