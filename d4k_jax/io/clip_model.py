"""transformers `CLIPModel` folders -> `d4k_jax.models.clip` (text tower) + `d4k_jax.models.clip_vision` (ViT).

A CLIPModel folder (e.g. openai/clip-vit-base-patch16) holds config.json with `text_config`,
`vision_config` and the shared `projection_dim`; model.safetensors with `text_model.*`, `text_projection`,
`vision_model.*`, `visual_projection` and `logit_scale`; and the tokenizer files. Both towers are read in
one strict pass: every tensor is used once and every parameter filled, or one ConversionError lists the
missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from d4k_jax.io.load import load_config, open_weights
from d4k_jax.models import clip_keys as clip_map
from d4k_jax.models.clip import CLIPTextModel
from d4k_jax.models.clip_vision import CLIPVisionModel
from d4k_jax.models.clip_vision_keys import vision_config_from_transformers, vision_rules
from d4k_jax.models.keymap import Rule, copy, param_shapes, to_flax
from d4k_jax.pipelines.tokenizer import Tokenizer

_TEXT_KEYS = ("text_model.", "text_projection.")


class CLIPParts(NamedTuple):
    text_module: CLIPTextModel | None  # None when loaded with text=False
    text_params: dict | None
    vision_module: CLIPVisionModel
    vision_params: dict
    tokenizer: Tokenizer | None
    logit_scale: float  # exp of the checkpoint's `logit_scale`: CLIP's logits are logit_scale * cos


def load_clip(
    path: str | os.PathLike, *, text: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> CLIPParts:
    """Both towers, the tokenizer and the logit scale of a transformers CLIPModel folder.

    text=False reads the image tower alone (the aesthetic predictor): the text tensors are then passed over
    unread and no tokenizer is needed.
    """
    path = Path(path)
    cfg = load_config(path)
    if (cfg.get("architectures") or [None])[0] != "CLIPModel" or "vision_config" not in cfg:
        raise ValueError(
            f"{path}: expected a transformers CLIPModel folder, config.json has {cfg.get('architectures')}"
        )
    projection = cfg.get("projection_dim", 512)
    vision_cfg = vision_config_from_transformers(cfg["vision_config"], projection)
    vision = CLIPVisionModel(vision_cfg, dtype=dtype, param_dtype=param_dtype)
    size = vision_cfg.image_size
    towers = {"vision": (vision, (jnp.zeros((1, size, size, vision_cfg.num_channels)),))}
    source = open_weights(path)
    rules = _under("vision", vision_rules(vision_cfg, frozenset(source)))
    if text:
        text_cfg = cfg.get("text_config", {}) | {"architectures": ["CLIPTextModelWithProjection"]}
        text_cfg = clip_map.config_from_transformers(text_cfg | {"projection_dim": projection})
        towers["text"] = (
            CLIPTextModel(text_cfg, dtype=dtype, param_dtype=param_dtype),
            (jnp.zeros((1, 1), jnp.int32),),
        )
        text_keys = frozenset(k for k in source if k.startswith(_TEXT_KEYS))
        rules += _under("text", clip_map.checkpoint_rules(text_cfg, {}, text_keys))
    else:
        source = _Without(source, _TEXT_KEYS)
    rules.append(copy("logit_scale", ("logit_scale",)))
    expected = {(name, *p): s for name, (m, x) in towers.items() for p, s in param_shapes(m, x).items()}
    flat = to_flax(source, rules, expected | {("logit_scale",): ()}, what=str(path))
    logit_scale = float(np.exp(flat.pop(("logit_scale",))))
    params = traverse_util.unflatten_dict({p: jnp.asarray(a, param_dtype) for p, a in flat.items()})
    return CLIPParts(
        text_module=towers["text"][0] if text else None,
        text_params=params.get("text"),
        vision_module=vision,
        vision_params=params["vision"],
        tokenizer=Tokenizer(path) if text else None,
        logit_scale=logit_scale,
    )


def _under(root: str, rules: list[Rule]) -> list[Rule]:
    """`rules` filling the parameters of one tower, nested under `root` in one tree of both towers."""
    return [Rule(r.src, tuple((root, *d) for d in r.dst), r.fwd, r.inv) for r in rules]


class _Without(Mapping):
    """The tensors of `source` whose names do not start with `prefixes` (lazy: nothing is read)."""

    def __init__(self, source: Mapping, prefixes: tuple[str, ...]):
        self.source, self.prefixes = source, prefixes
        self.names = [k for k in source if not k.startswith(prefixes)]

    def __getitem__(self, key: str) -> np.ndarray:
        if key.startswith(self.prefixes):
            raise KeyError(key)
        return self.source[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
