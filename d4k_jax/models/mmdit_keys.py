"""SD3 / SD3.5 MMDiT: diffusers `SD3Transformer2DModel` folders and SAI single files <-> `d4k_jax.models.mmdit`.

The Flax tree mirrors diffusers except that runs of identical blocks are scanned (`transformer_blocks_0`
holds blocks 0..n-1 stacked). SAI files (`sd3_medium.safetensors`: `model.diffusion_model.joint_blocks.N.
x_block.attn.qkv`, ...) may also hold the text encoders and the VAE; this map reads the transformer's
tensors; the tests check it against diffusers' own single-file converter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from d4k_jax.models.keymap import Rule, copy, dense, split_linear, stacked, structural_rules, swap_halves
from d4k_jax.models.mmdit import MMDiTConfig

CLASS_NAMES = ("SD3Transformer2DModel",)
SAI_PREFIX = "model.diffusion_model."
# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers (without "_class_name")
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)


def config_from_diffusers(cfg: Mapping[str, Any]) -> MMDiTConfig:
    if cfg.get("pos_embed_max_size") is None:
        raise ValueError("SD3Transformer2DModel without pos_embed_max_size is not supported (SD3 always sets it)")
    return MMDiTConfig(
        sample_size=cfg.get("sample_size", 128),
        patch_size=cfg.get("patch_size", 2),
        in_channels=cfg.get("in_channels", 16),
        out_channels=cfg.get("out_channels"),
        num_layers=cfg.get("num_layers", 18),
        attention_head_dim=cfg.get("attention_head_dim", 64),
        num_attention_heads=cfg.get("num_attention_heads", 18),
        joint_attention_dim=cfg.get("joint_attention_dim", 4096),
        caption_projection_dim=cfg.get("caption_projection_dim", 1152),
        pooled_projection_dim=cfg.get("pooled_projection_dim", 2048),
        pos_embed_max_size=cfg["pos_embed_max_size"],
        dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        qk_norm=cfg.get("qk_norm"),
        remat=cfg.get("remat", "none"),
        fused_qkv=cfg.get("fused_qkv", False),
        fp8=cfg.get("fp8", False),
    )


def _layers(config: MMDiTConfig) -> dict[str, tuple[str, int, bool]]:
    return {
        f"transformer_blocks_{first}": ("transformer_blocks", first, first != config.num_layers - 1)
        for first, _, _ in config.groups()
    }


def rules(config: MMDiTConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
    table = ("pos_embed", "pos_embed")
    rest = {p: s for p, s in shapes.items() if p != table}
    return [copy("pos_embed.pos_embed", table), *structural_rules(rest, layers=_layers(config))]


def is_sai(keys) -> bool:
    return any(k.startswith(f"{SAI_PREFIX}joint_blocks.") for k in keys)


def config_from_sai(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers config of a SAI checkpoint's transformer, read off its tensor shapes."""
    s = {k.removeprefix(SAI_PREFIX): v for k, v in shapes.items() if k.startswith(SAI_PREFIX)}
    layer_ids = lambda part: sorted({int(k.split(".")[1]) for k in s if k.startswith("joint_blocks.") and part in k})
    dim, in_channels, patch, _ = s["x_embedder.proj.weight"]
    head_dim = 64  # every released SD3 / SD3.5 (64-wide heads); others need attention_head_dim and heads overrides
    num_layers = len(layer_ids(".x_block."))
    return {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": s["final_layer.linear.weight"][0] // (patch * patch),
        "num_layers": num_layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "joint_attention_dim": s["context_embedder.weight"][1],
        "caption_projection_dim": s["context_embedder.weight"][0],
        "pooled_projection_dim": s["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": round(s["pos_embed"][1] ** 0.5),
        "dual_attention_layers": tuple(layer_ids(".x_block.attn2.")),
        "qk_norm": "rms_norm" if any(".ln_q." in k for k in s) else None,
    }


_QK_NORMS = (
    ("x_block.attn.ln_q", "norm_q"),
    ("x_block.attn.ln_k", "norm_k"),
    ("context_block.attn.ln_q", "norm_added_q"),
    ("context_block.attn.ln_k", "norm_added_k"),
)


# A declaration (one entry per SAI tensor family), read top to bottom against the SAI layout: kept whole.
def sai_rules(config: MMDiTConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[Rule]:
    d, p = config.dim, SAI_PREFIX
    qk = config.qk_norm is not None

    def block(i: int, flax_name: str) -> list[Rule]:
        b, last, dual = f"{p}joint_blocks.{i}.", i == config.num_layers - 1, i in config.dual_attention_layers
        a = (flax_name, "attn")
        out = [
            *split_linear(f"{b}x_block.attn.qkv", [(*a, "to_q"), (*a, "to_k"), (*a, "to_v")], [d, d, d]),
            *split_linear(
                f"{b}context_block.attn.qkv", [(*a, "add_q_proj"), (*a, "add_k_proj"), (*a, "add_v_proj")], [d, d, d]
            ),
            *dense(f"{b}x_block.attn.proj", (*a, "to_out_0")),
            *dense(f"{b}x_block.adaLN_modulation.1", (flax_name, "norm1", "linear")),
            *dense(f"{b}x_block.mlp.fc1", (flax_name, "ff", "net_0", "proj")),
            *dense(f"{b}x_block.mlp.fc2", (flax_name, "ff", "net_2")),
        ]
        if qk:
            for sai, ours in _QK_NORMS:
                out.append(copy(f"{b}{sai}.weight", (*a, ours, "scale")))
        if last:  # AdaLayerNormContinuous: SAI stores (shift, scale), diffusers (scale, shift)
            out += swap_halves(f"{b}context_block.adaLN_modulation.1", (flax_name, "norm1_context", "linear"))
        else:
            out += [
                *dense(f"{b}context_block.attn.proj", (*a, "to_add_out")),
                *dense(f"{b}context_block.adaLN_modulation.1", (flax_name, "norm1_context", "linear")),
                *dense(f"{b}context_block.mlp.fc1", (flax_name, "ff_context", "net_0", "proj")),
                *dense(f"{b}context_block.mlp.fc2", (flax_name, "ff_context", "net_2")),
            ]
        if dual:
            a2 = (flax_name, "attn2")
            out += [
                *split_linear(f"{b}x_block.attn2.qkv", [(*a2, "to_q"), (*a2, "to_k"), (*a2, "to_v")], [d, d, d]),
                *dense(f"{b}x_block.attn2.proj", (*a2, "to_out_0")),
            ]
            if qk:
                out += [
                    copy(f"{b}x_block.attn2.ln_q.weight", (*a2, "norm_q", "scale")),
                    copy(f"{b}x_block.attn2.ln_k.weight", (*a2, "norm_k", "scale")),
                ]
        return out

    out = [
        copy(f"{p}pos_embed", ("pos_embed", "pos_embed")),
        Rule(
            (f"{p}x_embedder.proj.weight",),
            (("pos_embed", "proj", "kernel"),),
            lambda w: (w.transpose(2, 3, 1, 0),),
            lambda k: (k.transpose(3, 2, 0, 1),),
        ),
        copy(f"{p}x_embedder.proj.bias", ("pos_embed", "proj", "bias")),
        *dense(f"{p}t_embedder.mlp.0", ("time_text_embed", "timestep_embedder", "linear_1")),
        *dense(f"{p}t_embedder.mlp.2", ("time_text_embed", "timestep_embedder", "linear_2")),
        *dense(f"{p}y_embedder.mlp.0", ("time_text_embed", "text_embedder", "linear_1")),
        *dense(f"{p}y_embedder.mlp.2", ("time_text_embed", "text_embedder", "linear_2")),
        *dense(f"{p}context_embedder", ("context_embedder",)),
        *dense(f"{p}final_layer.linear", ("proj_out",)),
        *swap_halves(f"{p}final_layer.adaLN_modulation.1", ("norm_out", "linear")),
    ]
    for first, count, _ in config.groups():
        name = f"transformer_blocks_{first}"
        if first == config.num_layers - 1:
            out += block(first, name)
        else:
            out += [stacked(list(rs)) for rs in zip(*(block(first + i, name) for i in range(count)), strict=True)]
    return out
