"""FLUX.1 transformer: diffusers `FluxTransformer2DModel` folders and BFL single files <-> `d4k_jax.models.flux`.

The diffusers map is the naming rule (the Flax tree mirrors diffusers). The BFL map (`flux1-dev.safetensors`:
`double_blocks.N.img_attn.qkv`, fused single-block `linear1` / `linear2`, `img_in`, `time_in`, ...) is
declared below; the tests check it against diffusers' own single-file converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from d4k_jax.models.flux import FluxConfig
from d4k_jax.models.keymap import (
    Rule,
    copy,
    dense,
    split_input,
    split_linear,
    stacked,
    structural_rules,
    swap_halves,
)

CLASS_NAMES = ("FluxTransformer2DModel",)
_LAYERS = {name: (name, 0, True) for name in ("transformer_blocks", "single_transformer_blocks")}
_BFL_PREFIX = "model.diffusion_model."


def config_from_diffusers(cfg: Mapping[str, Any]) -> FluxConfig:
    if cfg.get("patch_size", 1) != 1:
        raise ValueError(f"FluxTransformer2DModel patch_size {cfg['patch_size']} is not supported (expected 1)")
    return FluxConfig(
        in_channels=cfg.get("in_channels", 64),
        out_channels=cfg.get("out_channels"),
        num_layers=cfg.get("num_layers", 19),
        num_single_layers=cfg.get("num_single_layers", 38),
        attention_head_dim=cfg.get("attention_head_dim", 128),
        num_attention_heads=cfg.get("num_attention_heads", 24),
        joint_attention_dim=cfg.get("joint_attention_dim", 4096),
        pooled_projection_dim=cfg.get("pooled_projection_dim", 768),
        guidance_embeds=cfg.get("guidance_embeds", False),
        axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
        remat=cfg.get("remat", "none"),
        fused_qkv=cfg.get("fused_qkv", False),
        fp8=cfg.get("fp8", False),
    )


def rules(config: FluxConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
    """The naming rule, but for the single blocks' proj_out, split into its attention and MLP parts."""
    split = {p for p in shapes if p[0] == "single_transformer_blocks" and p[1] in SINGLE_PROJ_OUT}
    return [
        *structural_rules({p: s for p, s in shapes.items() if p not in split}, layers=_LAYERS),
        *_single_proj_out(config, "single_transformer_blocks.{}.proj_out"),
    ]


SINGLE_PROJ_OUT = ("proj_out_attn", "proj_out_mlp")


def _single_proj_out(config: FluxConfig, src: str) -> list[Rule]:
    """Layer i's torch proj_out (over concat([attn, mlp])) -> the stacked proj_out_attn / proj_out_mlp."""
    parts, sizes = [("single_transformer_blocks", name) for name in SINGLE_PROJ_OUT], [config.dim, config.mlp_dim]
    per_layer = [split_input(src.format(i), parts, sizes) for i in range(config.num_single_layers)]
    return [stacked(list(layer_rules)) for layer_rules in zip(*per_layer, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# BFL single-file format


def is_bfl(keys) -> bool:
    return any(k.removeprefix(_BFL_PREFIX).startswith("double_blocks.") for k in keys)


def config_from_bfl(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers config of a BFL checkpoint, read off its tensor shapes."""
    s = {k.removeprefix(_BFL_PREFIX): v for k, v in shapes.items()}
    count = lambda prefix: 1 + max(int(k.split(".")[1]) for k in s if k.startswith(prefix))
    dim, in_channels = s["img_in.weight"]
    head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    cfg = {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": s["final_layer.linear.weight"][0],
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "joint_attention_dim": s["txt_in.weight"][1],
        "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
    }
    if head_dim == 128:  # every released FLUX.1; other head dims need an axes_dims_rope override
        cfg["axes_dims_rope"] = [16, 56, 56]
    return cfg


def bfl_rules(config: FluxConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]], prefix: str = "") -> list[Rule]:
    d = config.dim
    mlp = int(d * config.mlp_ratio)

    def double(i: int) -> list[Rule]:
        b, a = f"{prefix}double_blocks.{i}.", ("transformer_blocks", "attn")
        out = []
        for stream, (q, k, v), (nq, nk), proj, mod, ff in (
            ("img", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out_0", "norm1", "ff"),
            (
                "txt",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                ("norm_added_q", "norm_added_k"),
                "to_add_out",
                "norm1_context",
                "ff_context",
            ),
        ):
            out += split_linear(f"{b}{stream}_attn.qkv", [(*a, q), (*a, k), (*a, v)], [d, d, d])
            out += [copy(f"{b}{stream}_attn.norm.query_norm.scale", (*a, nq, "scale"))]
            out += [copy(f"{b}{stream}_attn.norm.key_norm.scale", (*a, nk, "scale"))]
            out += dense(f"{b}{stream}_attn.proj", (*a, proj))
            out += dense(f"{b}{stream}_mod.lin", ("transformer_blocks", mod, "linear"))
            out += dense(f"{b}{stream}_mlp.0", ("transformer_blocks", ff, "net_0", "proj"))
            out += dense(f"{b}{stream}_mlp.2", ("transformer_blocks", ff, "net_2"))
        return out

    def single(i: int) -> list[Rule]:
        b, s = f"{prefix}single_blocks.{i}.", "single_transformer_blocks"
        qkvm = [(s, "attn", "to_q"), (s, "attn", "to_k"), (s, "attn", "to_v"), (s, "proj_mlp")]
        return [
            *split_linear(f"{b}linear1", qkvm, [d, d, d, mlp]),
            *dense(f"{b}modulation.lin", (s, "norm", "linear")),
            copy(f"{b}norm.query_norm.scale", (s, "attn", "norm_q", "scale")),
            copy(f"{b}norm.key_norm.scale", (s, "attn", "norm_k", "scale")),
        ]

    out = [
        *_single_proj_out(config, prefix + "single_blocks.{}.linear2"),
        *dense(f"{prefix}img_in", ("x_embedder",)),
        *dense(f"{prefix}txt_in", ("context_embedder",)),
        *dense(f"{prefix}final_layer.linear", ("proj_out",)),
        *swap_halves(f"{prefix}final_layer.adaLN_modulation.1", ("norm_out", "linear")),
    ]
    for bfl, ours in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        if ours == "guidance_embedder" and not config.guidance_embeds:
            continue
        out += dense(f"{prefix}{bfl}.in_layer", ("time_text_embed", ours, "linear_1"))
        out += dense(f"{prefix}{bfl}.out_layer", ("time_text_embed", ours, "linear_2"))
    # one stacked rule per (rule position) across layers: every layer has the same rule list
    for per_layer in (
        [double(i) for i in range(config.num_layers)],
        [single(i) for i in range(config.num_single_layers)],
    ):
        out += [stacked(list(layer_rules)) for layer_rules in zip(*per_layer, strict=True)]
    return out
