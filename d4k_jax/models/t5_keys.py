"""transformers `T5EncoderModel` <-> `d4k_jax.models.t5`: config and key map."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from d4k_jax.models.keymap import Rule, copy, linear, stacked
from d4k_jax.models.t5 import ACTIVATIONS, T5Config

CLASS_NAMES = ("T5EncoderModel",)
_OURS = ("remat",)  # keys d4k_jax reads beyond transformers' config
# The input embedding is tied: transformers saves `shared.weight`; .bin files and other writers hold both names
# or only the second.
TIED = ("shared.weight", "encoder.embed_tokens.weight")


def config_from_transformers(cfg: Mapping[str, Any]) -> T5Config:
    """T5Config from a transformers config.json dict; missing keys take transformers' defaults."""
    proj = cfg.get("feed_forward_proj", "relu")
    *gate, act = proj.split("-")
    act = "gelu_new" if proj == "gated-gelu" else act  # transformers' backward-compatible meaning
    problems = []
    if gate not in ([], ["gated"]) or act not in ACTIVATIONS:
        problems.append(f"feed_forward_proj {proj!r} (expected ACT or gated-ACT, ACT one of {sorted(ACTIVATIONS)})")
    if cfg.get("is_decoder", False):
        problems.append("is_decoder=True (T5EncoderModel is the encoder)")
    if problems:
        raise ValueError("unsupported T5 encoder config: " + "; ".join(problems))
    return T5Config(
        vocab_size=cfg.get("vocab_size", 32128),
        d_model=cfg.get("d_model", 512),
        d_kv=cfg.get("d_kv", 64),
        d_ff=cfg.get("d_ff", 2048),
        num_layers=cfg.get("num_layers", 6),
        num_heads=cfg.get("num_heads", 8),
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
        dense_act_fn=act,
        is_gated_act=bool(gate),
        remat=cfg.get("remat", "none"),
    )


def transformers_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json transformers itself loads: our own keys removed."""
    return {k: v for k, v in cfg.items() if k not in _OURS}


def tied_embedding(names: tuple[str, ...]) -> Rule:
    """One rule reading every copy of the tied embedding present; they must be equal. Export writes them all."""

    def fwd(*arrays):
        for name, a in zip(names[1:], arrays[1:], strict=True):
            if a.shape != arrays[0].shape or not np.array_equal(a, arrays[0]):
                raise ValueError(f"tied embeddings differ: {name} is not equal to {names[0]}")
        return (arrays[0],)

    return Rule(names, (("shared",),), fwd, lambda e: (e,) * len(names))


def checkpoint_rules(
    config: T5Config, shapes: Mapping[tuple[str, ...], tuple[int, ...]], keys: Collection[str] = ()
) -> list[Rule]:
    """The key map for a checkpoint holding `keys`; with no keys, the names `rules` (export) writes."""
    del shapes
    ffn = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
    table = [  # (torch name inside `encoder.block.{i}.layer.`, Flax path inside "block", rule)
        *((f"0.SelfAttention.{n}.weight", (n, "kernel"), linear) for n in "qkvo"),
        ("0.layer_norm.weight", ("attn_norm", "scale"), copy),
        *((f"1.DenseReluDense.{n}.weight", (n, "kernel"), linear) for n in (*ffn, "wo")),
        ("1.layer_norm.weight", ("ffn_norm", "scale"), copy),
    ]
    layers = range(config.num_layers)
    return [
        tied_embedding(tuple(k for k in TIED if k in keys) or TIED[:1]),
        copy("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", ("relative_attention_bias",)),
        copy("encoder.final_layer_norm.weight", ("final_layer_norm", "scale")),
        *(
            stacked([rule(f"encoder.block.{i}.layer.{name}", ("block", *path)) for i in layers])
            for name, path, rule in table
        ),
    ]


def rules(config: T5Config, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
    """The key map export writes: `shared.weight` alone, as transformers' save_pretrained does."""
    return checkpoint_rules(config, shapes)
