"""transformers `CLIPTextModel` / `CLIPTextModelWithProjection` <-> `d4k_jax.models.clip`: config and key map."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from d4k_jax.models.clip import ACTIVATIONS, CLIPTextConfig
from d4k_jax.models.keymap import Rule, copy, linear, stacked

CLASS_NAMES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_OURS = ("remat",)  # keys d4k_jax reads beyond transformers' config


def _layer_table() -> list[tuple[str, tuple[str, ...], Any]]:
    """(torch name inside `encoder.layers.{i}.`, Flax path inside "layers", rule) for one encoder layer."""
    out = []
    for module, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")), ("mlp", ("fc1", "fc2"))):
        for n in names:
            out += [(f"{module}.{n}.weight", (n, "kernel"), linear), (f"{module}.{n}.bias", (n, "bias"), copy)]
    for n in ("layer_norm1", "layer_norm2"):
        out += [(f"{n}.weight", (n, "scale"), copy), (f"{n}.bias", (n, "bias"), copy)]
    return out


LAYER = _layer_table()  # one encoder layer's key map, shared with the vision tower (clip_vision.py)


def config_from_transformers(cfg: Mapping[str, Any]) -> CLIPTextConfig:
    """CLIPTextConfig from a transformers config.json dict; missing keys take transformers' defaults."""
    arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
    eos = cfg.get("eos_token_id", 49407)
    problems = []
    if arch not in CLASS_NAMES:
        problems.append(f"architectures {cfg.get('architectures')} (expected one of {CLASS_NAMES})")
    if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        problems.append(f"hidden_act {cfg['hidden_act']!r} (expected one of {sorted(ACTIVATIONS)})")
    if not isinstance(eos, int):
        problems.append(f"eos_token_id {eos!r} (expected one integer)")
    if problems:
        raise ValueError("unsupported CLIP text config: " + "; ".join(problems))
    return CLIPTextConfig(
        vocab_size=cfg.get("vocab_size", 49408),
        hidden_size=cfg.get("hidden_size", 512),
        intermediate_size=cfg.get("intermediate_size", 2048),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 8),
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        projection_dim=cfg.get("projection_dim", 512) if arch == "CLIPTextModelWithProjection" else None,
        eos_token_id=eos,
        remat=cfg.get("remat", "none"),
    )


def transformers_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json transformers itself loads: our own keys removed."""
    return {k: v for k, v in cfg.items() if k not in _OURS}


def checkpoint_rules(
    config: CLIPTextConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]], keys: Collection[str] = ()
) -> list[Rule]:
    """The key map for a checkpoint holding `keys`; with no keys, the names `rules` (export) writes.

    Real checkpoints name the text tower `text_model.*`, transformers 5 saves a `CLIPTextModel` without
    that prefix (and loads both); old checkpoints also hold the `position_ids` buffer (arange, which the model
    computes itself), which is read and dropped.
    """
    del shapes
    p = "" if "final_layer_norm.weight" in keys else "text_model."
    layers = config.num_hidden_layers
    rules = [
        copy(f"{p}embeddings.token_embedding.weight", ("token_embedding",)),
        copy(f"{p}embeddings.position_embedding.weight", ("position_embedding",)),
        copy(f"{p}final_layer_norm.weight", ("final_layer_norm", "scale")),
        copy(f"{p}final_layer_norm.bias", ("final_layer_norm", "bias")),
        *(
            stacked([rule(f"{p}encoder.layers.{i}.{name}", ("layers", *path)) for i in range(layers)])
            for name, path, rule in LAYER
        ),
    ]
    if config.projection_dim is not None:
        rules.append(linear("text_projection.weight", ("text_projection", "kernel")))
    if f"{p}embeddings.position_ids" in keys:
        arange = np.arange(config.max_position_embeddings)[None]
        rules.append(Rule((f"{p}embeddings.position_ids",), (), lambda ids: (), lambda: (arange,)))
    return rules


def rules(config: CLIPTextConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
    """The key map export writes: `text_model.*` names, which transformers 4 and 5 both load."""
    return checkpoint_rules(config, shapes)
