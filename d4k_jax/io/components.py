"""The component registry: which model each diffusers / transformers class name is, how to build and map it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from d4k_jax.models import clip_keys as clip_map
from d4k_jax.models import flux_keys as flux_map
from d4k_jax.models import mmdit_keys as sd3_map
from d4k_jax.models import t5_keys as t5_map
from d4k_jax.models import vae_keys as vae_map
from d4k_jax.models.clip import CLIPTextModel
from d4k_jax.models.flux import Flux, FluxConfig
from d4k_jax.models.keymap import Rule, Shapes
from d4k_jax.models.mmdit import MMDiT, MMDiTConfig
from d4k_jax.models.t5 import T5EncoderModel
from d4k_jax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    class_names: tuple[str, ...]
    config_from: Callable[[Mapping[str, Any]], Any]  # source config dict -> model config
    build: Callable[..., nn.Module]  # (model config, dtype=, param_dtype=) -> module
    init_inputs: Callable[[Any], tuple]  # model config -> dummy inputs for `init`
    rules: Callable[[Any, Shapes], list[Rule]]  # (model config, parameter shapes) -> key map
    module_type: type  # the Flax module class `build` returns
    weights_name: str  # file name of the single-file safetensors export
    export_config: Callable[[Mapping[str, Any]], dict]
    # (model config, parameter shapes, a checkpoint's keys) -> its key map, for kinds whose checkpoints name
    # tensors in more than one way (tied duplicates, optional prefixes and buffers); `rules` is what export writes
    rules_for_keys: Callable[[Any, Shapes, Collection[str]], list[Rule]] | None = None

    def checkpoint_rules(self, cfg: Any, shapes: Shapes, keys: Collection[str]) -> list[Rule]:
        """The key map for loading a checkpoint that holds `keys`."""
        return self.rules(cfg, shapes) if self.rules_for_keys is None else self.rules_for_keys(cfg, shapes, keys)


def _vae_inputs(cfg: VAEConfig) -> tuple:
    s = cfg.downsample_factor
    return (jnp.zeros((1, s, s, cfg.in_channels), jnp.float32),)


def _flux_inputs(cfg: FluxConfig) -> tuple:
    z = jnp.zeros
    guidance = z((1,)) if cfg.guidance_embeds else None
    return (
        z((1, 2, 2, cfg.latent_channels)),
        z((1,)),
        z((1, 1, cfg.joint_attention_dim)),
        z((1, cfg.pooled_projection_dim)),
        guidance,
    )


def _mmdit_inputs(cfg: MMDiTConfig) -> tuple:
    z, p = jnp.zeros, cfg.patch_size
    return z((1, p, p, cfg.in_channels)), z((1,)), z((1, 1, cfg.joint_attention_dim)), z((1, cfg.pooled_projection_dim))


KINDS = (
    Kind(
        name="vae",
        module_type=AutoencoderKL,
        class_names=vae_map.CLASS_NAMES,
        config_from=vae_map.config_from_diffusers,
        build=lambda cfg, **kw: AutoencoderKL(cfg, **kw),
        init_inputs=_vae_inputs,
        rules=vae_map.rules,
        weights_name="diffusion_pytorch_model.safetensors",
        export_config=vae_map.diffusers_config,
    ),
    Kind(
        name="flux",
        module_type=Flux,
        class_names=flux_map.CLASS_NAMES,
        config_from=flux_map.config_from_diffusers,
        build=lambda cfg, **kw: Flux(cfg, **kw),
        init_inputs=_flux_inputs,
        rules=flux_map.rules,
        weights_name="diffusion_pytorch_model.safetensors",
        export_config=dict,
    ),
    Kind(
        name="mmdit",
        module_type=MMDiT,
        class_names=sd3_map.CLASS_NAMES,
        config_from=sd3_map.config_from_diffusers,
        build=lambda cfg, **kw: MMDiT(cfg, **kw),
        init_inputs=_mmdit_inputs,
        rules=sd3_map.rules,
        weights_name="diffusion_pytorch_model.safetensors",
        export_config=dict,
    ),
    Kind(
        name="clip_text",
        module_type=CLIPTextModel,
        class_names=clip_map.CLASS_NAMES,
        config_from=clip_map.config_from_transformers,
        build=lambda cfg, **kw: CLIPTextModel(cfg, **kw),
        init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
        rules=clip_map.rules,
        weights_name="model.safetensors",
        export_config=clip_map.transformers_config,
        rules_for_keys=clip_map.checkpoint_rules,
    ),
    Kind(
        name="t5_encoder",
        module_type=T5EncoderModel,
        class_names=t5_map.CLASS_NAMES,
        config_from=t5_map.config_from_transformers,
        build=lambda cfg, **kw: T5EncoderModel(cfg, **kw),
        init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
        rules=t5_map.rules,
        weights_name="model.safetensors",
        export_config=t5_map.transformers_config,
        rules_for_keys=t5_map.checkpoint_rules,
    ),
)


def kind_of_module(module: nn.Module) -> Kind:
    """The kind whose `build` made `module`."""
    for kind in KINDS:
        if isinstance(module, kind.module_type):
            return kind
    raise ValueError(f"no registered component kind builds {type(module).__name__}")


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


class _Reads(dict):
    """A config dict that records which keys are looked up."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def keys_read(kind: Kind, cfg: Mapping[str, Any]) -> set[str]:
    """The config.json keys that `kind.config_from` reads from `cfg`: the only ones an override can change.

    Found by running it: that is exact where a key is read only in some settings (CLIP reads projection_dim
    only for CLIPTextModelWithProjection), and covers keys checked but not stored (the VAE's act_fn)."""
    recorder = _Reads(cfg)
    kind.config_from(recorder)
    return recorder.read


def override_problem(cfg: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> str | None:
    """Why `overrides` (already merged into `cfg`) cannot all apply to this model, or None.

    An override the model does not read would be dropped silently (a misspelt key, or a key of another
    component): it is named with the keys that do apply."""
    if not overrides:
        return None
    kind = kind_for(cfg, where)
    valid = keys_read(kind, cfg)
    unknown = sorted(set(overrides) - valid)
    if not unknown:
        return None
    return f"{where}: override keys {unknown} are not read by {class_name(cfg)}; the keys it reads: {sorted(valid)}"
