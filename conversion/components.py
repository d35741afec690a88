"""Which model each diffusers / transformers class name is, and how to build and map it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from conversion import vae as vae_map
from conversion.rules import Rule
from d4k_jax.models.vae import AutoencoderKL, VAEConfig

Shapes = dict[tuple[str, ...], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    class_names: tuple[str, ...]
    config_from: Callable[[Mapping[str, Any]], Any]  # source config dict -> model config
    build: Callable[..., nn.Module]  # (model config, dtype=, param_dtype=) -> module
    init_inputs: Callable[[Any], tuple]  # model config -> dummy inputs for `init`
    rules: Callable[[Any, Shapes], list[Rule]]  # (model config, parameter shapes) -> key map
    weights_name: str  # file name of the single-file safetensors export
    export_config: Callable[[Mapping[str, Any]], dict]


def _vae_inputs(cfg: VAEConfig) -> tuple:
    s = cfg.downsample_factor
    return (jnp.zeros((1, s, s, cfg.in_channels), jnp.float32),)


KINDS = (
    Kind(
        name="vae",
        class_names=vae_map.CLASS_NAMES,
        config_from=vae_map.config_from_diffusers,
        build=lambda cfg, **kw: AutoencoderKL(cfg, **kw),
        init_inputs=_vae_inputs,
        rules=vae_map.rules,
        weights_name="diffusion_pytorch_model.safetensors",
        export_config=vae_map.diffusers_config,
    ),
)


def class_name(cfg: Mapping[str, Any]) -> str | None:
    if "_class_name" in cfg:
        return cfg["_class_name"]
    archs = cfg.get("architectures") or [None]
    return archs[0]


def kind_for(cfg: Mapping[str, Any], where: str = "config.json") -> Kind:
    name = class_name(cfg)
    for kind in KINDS:
        if name in kind.class_names:
            return kind
    known = sorted(n for k in KINDS for n in k.class_names)
    raise ValueError(f"{where}: model class {name!r} is not supported; supported classes: {known}")


def param_shapes(module: nn.Module, inputs: tuple) -> Shapes:
    """{path: shape} of every parameter, from `jax.eval_shape` (no memory used)."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    params = nn.unbox(abstract["params"])
    return {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(params).items()}
