"""Single-file checkpoints (no config.json): which model a file holds, its config, and its key map.

BFL FLUX.1 files hold the transformer alone; SAI SD3 files hold the transformer under
`model.diffusion_model.` and may also hold the text encoders and the VAE, which are left to their own
loaders: only the transformer's tensors are read (and all of them must be used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from d4k_jax.models import flux_keys as flux_map
from d4k_jax.models import mmdit_keys as sd3_map
from d4k_jax.models.keymap import Rule

RulesFor = Callable[[Any, dict], list[Rule]]


class Prefixed(Mapping):
    """The tensors of `source` under `prefix`, named without it (lazy: nothing is read)."""

    def __init__(self, source: Mapping, prefix: str, strip: bool = True):
        self.source, self.prefix, self.strip = source, prefix, strip
        self.names = {(k[len(prefix) :] if strip else k): k for k in source if k.startswith(prefix)}

    def __getitem__(self, key):
        return self.source[self.names[key]]

    def shape(self, key) -> tuple[int, ...]:
        return self.source.shape(self.names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# SAI SD3 files may carry the text encoders in transformers' naming under these prefixes.
SAI_TEXT_ENCODERS = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}


def identify(source, where: str, component: str = "transformer") -> tuple[dict[str, Any], RulesFor | None, Mapping]:
    """(config dict, rules(model config, shapes) or None for the kind's own, the tensors they read)."""
    keys = list(source)
    shapes = {k: source.shape(k) for k in keys}
    if flux_map.is_bfl(keys) and component == "transformer":
        prefix = flux_map._BFL_PREFIX if keys[0].startswith(flux_map._BFL_PREFIX) else ""
        cfg = flux_map.config_from_bfl(shapes)
        return cfg, lambda model_cfg, s: flux_map.bfl_rules(model_cfg, s, prefix), source
    if sd3_map.is_sai(keys):
        if component == "transformer":
            return sd3_map.config_from_sai(shapes), sd3_map.sai_rules, Prefixed(source, sd3_map.SAI_PREFIX, False)
        prefix = SAI_TEXT_ENCODERS.get(component)
        if prefix is None or not any(k.startswith(prefix) for k in keys):
            held = ["transformer", *(c for c, p in SAI_TEXT_ENCODERS.items() if any(k.startswith(p) for k in keys))]
            raise ValueError(
                f"{where} holds no {component!r}; it holds {held} (the VAE is read from diffusers folders)"
            )
        view = Prefixed(source, prefix)
        cfg = _t5_config(view) if component == "text_encoder_3" else _clip_config(view, component)
        return cfg, None, view
    raise ValueError(
        f"{where}: not a recognised single-file checkpoint (supported: BFL FLUX.1 and SAI SD3 transformers, SAI "
        f"SD3 text encoders), or it holds no {component!r}; first keys: {sorted(keys)[:5]}"
    )


def _clip_config(view: Prefixed, component: str) -> dict[str, Any]:
    names = list(view)
    t = "text_model." if any(k.startswith("text_model.") for k in names) else ""
    vocab, width = view.shape(f"{t}embeddings.token_embedding.weight")
    cfg = {
        "architectures": ["CLIPTextModelWithProjection"],
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": view.shape(f"{t}encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": 1 + max(int(k.split(".")[2 + bool(t)]) for k in names if ".layers." in k),
        "num_attention_heads": width // 64,
        "max_position_embeddings": view.shape(f"{t}embeddings.position_embedding.weight")[0],
        # SD3's CLIP-L is OpenAI's (quick GELU), its CLIP-G OpenCLIP's (erf GELU); shapes cannot tell
        "hidden_act": "quick_gelu" if component == "text_encoder" else "gelu",
        "projection_dim": view.shape("text_projection.weight")[0],
    }
    return cfg


def _t5_config(view: Prefixed) -> dict[str, Any]:
    names = list(view)
    vocab, d_model = view.shape("shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight")
    buckets, heads = view.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    return {
        "architectures": ["T5EncoderModel"],
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": view.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        "d_ff": view.shape("encoder.block.0.layer.1.DenseReluDense.wo.weight")[1],
        "num_layers": 1 + max(int(k.split(".")[2]) for k in names if k.startswith("encoder.block.")),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if any(".wi_1." in k for k in names) else "relu",
    }
