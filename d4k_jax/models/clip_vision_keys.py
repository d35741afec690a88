"""transformers `CLIPModel` names <-> `d4k_jax.models.clip_vision` (ViT): config and the vision tower's key map.

The vision tower reuses the text tower's per-layer map (`clip_keys.LAYER`); `d4k_jax.io.clip_model` reads both
towers of a CLIPModel folder with these maps in one strict pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from d4k_jax.models import clip_keys as clip_map
from d4k_jax.models.clip_vision import CLIPVisionConfig
from d4k_jax.models.keymap import Rule, conv, copy, linear, stacked

_NORM = (("weight", "scale"), ("bias", "bias"))  # torch LayerNorm -> d4k_jax.nn.LayerNorm


def vision_config_from_transformers(cfg: Mapping[str, Any], projection_dim: int | None) -> CLIPVisionConfig:
    """CLIPVisionConfig from a `vision_config` dict; missing keys take transformers' defaults (ViT-B/32)."""
    if cfg.get("hidden_act", "quick_gelu") not in clip_map.ACTIVATIONS:
        raise ValueError(f"unsupported CLIP vision hidden_act {cfg['hidden_act']!r}")
    return CLIPVisionConfig(
        hidden_size=cfg.get("hidden_size", 768),
        intermediate_size=cfg.get("intermediate_size", 3072),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 12),
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 32),
        num_channels=cfg.get("num_channels", 3),
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        projection_dim=projection_dim,
    )


def vision_rules(config: CLIPVisionConfig, keys: Collection[str] = ()) -> list[Rule]:
    """The key map of a CLIPModel's `vision_model.*` and `visual_projection` (old files: + position_ids)."""
    p = "vision_model."
    rules = [
        conv(f"{p}embeddings.patch_embedding.weight", ("patch_embedding",)),  # (D, C, p, p) -> (p, p, C, D)
        copy(f"{p}embeddings.class_embedding", ("class_embedding",)),
        copy(f"{p}embeddings.position_embedding.weight", ("position_embedding",)),
        *(copy(f"{p}{n}.{t}", (n, leaf)) for n in ("pre_layrnorm", "post_layernorm") for t, leaf in _NORM),
        *(
            stacked([rule(f"{p}encoder.layers.{i}.{name}", ("layers", *path)) for i in range(config.num_hidden_layers)])
            for name, path, rule in clip_map.LAYER
        ),
    ]
    if config.projection_dim is not None:
        rules.append(linear("visual_projection.weight", ("visual_projection", "kernel")))
    if f"{p}embeddings.position_ids" in keys:  # a buffer (arange) the model computes itself: read and dropped
        arange = np.arange(config.num_patches + 1)[None]
        rules.append(Rule((f"{p}embeddings.position_ids",), (), lambda ids: (), lambda: (arange,)))
    return rules
