"""What every text-to-image pipeline shares: the `Pipeline` interface that sample.py and train.py drive
(so that neither asks which model it holds), `Component` (a loaded model), loading, initial noise, the
call's batch inputs as global arrays (`global_rows`: each process builds only the rows it holds), VAE
decode, uint8 output."""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from d4k_jax import lora as lora_adapters
from d4k_jax.diffusion.flow import SchedulerConfig
from d4k_jax.io import class_name, kind_for, load_component, load_config, lora
from d4k_jax.models import vae_keys
from d4k_jax.models.vae import AutoencoderKL
from d4k_jax.nn import ulysses
from d4k_jax.pipelines.scheduler import load_scheduler

# Latents [B, h, w, C] by logical axis: under sharding.active, rows over data x fsdp and each image's rows over
# `sequence`, so that the denoising loop never gathers one image onto one device.
LATENTS = ("batch", "height", "width", "channels")


class Component(NamedTuple):
    """One loaded model: `module.apply({"params": params}, ...)`. A tuple, so `module, params = component`
    works and callers may still pass plain (module, params) pairs; params may be None until they are set
    (the trainer's transformer)."""

    module: nn.Module
    params: Any


def component(pair: tuple[nn.Module, Any] | Deferred | None) -> Component | Deferred | None:
    """A (module, params) pair as a Component (None and Deferred components stay as they are)."""
    return pair if pair is None or isinstance(pair, Deferred) else Component(*pair)


class Deferred:
    """A component whose module is built from its config.json at once and whose weights are read the first
    time `params` is used: the text encoders, which a run may never need (a resumed training run whose text
    cache and eval embeddings exist never reads T5-XXL's 9.5 GB)."""

    def __init__(self, folder: Path, dtype: Any):
        cfg = load_config(folder)
        kind = kind_for(cfg, str(folder / "config.json"))
        self.folder, self.dtype = folder, dtype
        self.module = kind.build(kind.config_from(cfg), dtype=dtype, param_dtype=dtype)
        self._params = None

    @property
    def params(self) -> Any:
        if self._params is None:
            logging.info("reading %s", self.folder)
            self._params = load_component(self.folder, dtype=self.dtype, param_dtype=self.dtype)[1]
        return self._params

    @property
    def loaded(self) -> bool:
        return self._params is not None


def deferred(path: Path, name: str, dtype: Any) -> Deferred:
    """One pipeline component folder, read on first use (see Deferred)."""
    if not (path / name).is_dir():
        raise FileNotFoundError(f"{path}: no {name}/ component folder (a diffusers pipeline or converted directory)")
    return Deferred(path / name, dtype)


def load(path: Path, name: str, dtype: Any, **overrides: Any) -> Component:
    """One pipeline component folder (diffusers or converted), computing and stored in `dtype` unless
    `overrides` say otherwise (param_dtype, remat, stride, ...)."""
    folder = path / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no {name}/ component folder (a diffusers pipeline or converted directory)")
    return Component(*load_component(folder, **{"dtype": dtype, "param_dtype": dtype, **overrides}))


class Pipeline(abc.ABC):
    """Prompts -> images for one model kind. Subclasses hold `transformer` and `vae` Components (plus their
    text encoders) and say what differs between models: the transformer class, how pixels map to latent
    tokens, the latent channels, whether a negative prompt is encoded (CFG). Their constructors take
    `transformer`, `vae`, `scheduler` and the `text_components` by keyword; their calls take DESIGN.md's
    arguments (prompts, height, width, num_inference_steps, guidance_scale, seed, latents, negative_prompt,
    max_sequence_length, prompt_embeds, output; SD3 also negative_prompt_embeds)."""

    model: ClassVar[str]  # the config's model kind, this class's key in d4k_jax.pipelines.PIPELINES
    transformer_class: ClassVar[str]  # the diffusers class its transformer/ folder holds
    default_scheduler: ClassVar[SchedulerConfig]  # the base model's, for a folder without scheduler/
    uses_negative_prompt: ClassVar[bool] = False  # classifier-free guidance with a negative prompt
    transformer: Component
    vae: Component
    adapters: Any = None  # LoRA adapters kept separate (load_lora_weights(merge=False)): the "lora" collection

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: Any = jnp.bfloat16,
        vae_stride: int | None = None,
        transformer: tuple | None = None,
        vae: tuple | None = None,
        vae_sharding: jax.sharding.Sharding | None = None,
        **opts: Any,
    ) -> Self:
        """A diffusers pipeline folder or its converted directory; vae_stride=2 selects the F16 VAE. `opts`
        override the transformer's config (e.g. remat, param_dtype) and place it (`sharding`, as
        load_component); `vae_sharding` places the VAE (e.g. replicated over a mesh: each process reads it onto
        its own devices); `transformer` / `vae`, (module, params) pairs, are used instead of loading those."""
        path = pipeline_dir(path)
        scheduler = load_scheduler(path, cls.default_scheduler)  # before the weights: a bad config fails fast
        transformer = component(transformer) or load(path, "transformer", dtype, **opts)
        vae_opts = ({} if vae_stride is None else {"stride": vae_stride}) | (
            {} if vae_sharding is None else {"sharding": vae_sharding}
        )
        vae = component(vae) or load(path, "vae", dtype, **vae_opts)
        return cls(transformer=transformer, vae=vae, scheduler=scheduler, **cls.text_components(path, dtype))

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0, merge: bool = True) -> None:
        """Applies a LoRA file to the transformer at `scale` (diffusers / peft or kohya safetensors; see
        d4k_jax/io/lora.py); repeated calls add. merge=True merges it into the params, on their shardings and in
        their dtype, in place as diffusers' fuse_lora: the changed params' buffers are reused, so arrays of the old
        params held elsewhere are deleted; a merge is not undone (in bf16, subtracting it back is not exact).
        merge=False keeps it separate (`adapters`, the "lora" collection of d4k_jax/lora.py, in float32 beside the
        kernels): the params are untouched and each step computes the low-rank terms; files concatenate."""
        module, params = self.transformer
        if params is None:
            raise ValueError("the transformer has no params yet: set them before loading a LoRA")
        if merge:
            self.transformer = Component(module, lora.merge_lora(module, params, [(path, scale)], donate=True))
            return
        shapes = {p: tuple(a.shape) for p, a in traverse_util.flatten_dict(params).items()}
        file = lora.read_lora_file(path)
        planned = [(file, float(scale), lora.plan(file, module, shapes))]
        added = lora_adapters.place(lora_adapters.from_factors(lora.factors(planned, shapes)), params)
        self.adapters = lora_adapters.concatenate(self.adapters, added)

    def transformer_variables(self, params: Any = None) -> dict:
        """What the transformer's apply takes: {"params": ...} (the transformer's, or `params`) and the kept-separate
        LoRA `adapters` as the "lora" collection, if any."""
        params = self.transformer.params if params is None else params
        return {"params": params} if not self.adapters else {"params": params, "lora": self.adapters}

    @classmethod
    @abc.abstractmethod
    def text_components(cls, path: Path, dtype: Any) -> dict[str, Any]:
        """The constructor's text encoders and tokenizers, loaded from the pipeline folder `path`."""

    @abc.abstractmethod
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> tuple[jax.Array, jax.Array]:
        """(encoder_hidden_states [B, T, D], pooled_projections [B, P]), as the call's `prompt_embeds`."""

    @abc.abstractmethod
    def release_text_encoders(self) -> None:
        """Drop the text encoders' device memory; encode_prompt fails afterwards."""

    @classmethod
    @abc.abstractmethod
    def token_geometry(cls, vae_factor: int, transformer_config: dict[str, Any]) -> tuple[int, int | None]:
        """(pixels per latent token side, the largest image side or None) from the VAE's downsampling and
        the transformer's config.json."""

    @property
    @abc.abstractmethod
    def factor(self) -> int:
        """Pixels per latent token side: the VAE's factor times the transformer's patch."""

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """C of the latents the transformer denoises."""

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[B, h, w, C] of the initial noise for height x width images (multiples of `factor`)."""
        return latent_shape(batch, height, width, self.factor, self.latent_channels)

    def initial_latents(self, latents: Any, seed: int, batch: int, height: int, width: int) -> jax.Array:
        """The caller's initial noise `latents` (checked against `latent_shape`), else noise drawn from
        `seed`; in the transformer's compute dtype."""
        shape, dtype = self.latent_shape(batch, height, width), self.transformer.module.dtype
        latents = initial_noise(seed, shape, dtype) if latents is None else jnp.asarray(latents)
        if latents.shape != shape:
            raise ValueError(f"latents must be {shape} for {batch} prompts at {height}x{width}, got {latents.shape}")
        return latents.astype(dtype)

    def negative_embeds(
        self, negative_prompt: str, batch: int, guidance_scale: float, max_sequence_length: int
    ) -> tuple[jax.Array, jax.Array] | None:
        """The call's `negative_prompt_embeds` for `batch` images, or None where the call takes none."""
        del negative_prompt, batch, guidance_scale, max_sequence_length
        return None

    @classmethod
    def geometry(cls, path: str | os.PathLike, vae_stride: int | None = None) -> tuple[int, int | None]:
        """`token_geometry` of the pipeline folder `path`, read from its vae/ and transformer/ config.json
        (no weights); an error when its transformer is another model's."""
        folder = pipeline_dir(path)
        stride = {} if vae_stride is None else {"stride": vae_stride}
        vae_factor = vae_keys.config_from_diffusers(load_config(folder / "vae", **stride)).downsample_factor
        cfg = load_config(folder / "transformer")
        if class_name(cfg) not in (None, cls.transformer_class):
            raise ValueError(
                f"config.model={cls.model!r} expects a {cls.transformer_class} but {folder}/transformer holds a "
                f"{class_name(cfg)}: set --config.model to the pipeline's model"
            )
        return cls.token_geometry(vae_factor, cfg)


def sequence_problems(
    pipeline: type[Pipeline], path: str | os.PathLike, vae_stride: int | None, mesh: dict[str, int], sizes: dict
) -> list[str]:
    """Why the mesh's `sequence` degree cannot split images of `sizes` ({field: pixels}) of the pipeline folder
    `path` (nn.ulysses): it must divide the transformer's heads per `tensor` shard and each image's rows of
    tokens. Read from config.json (no weights); [] when the folder itself is wrong (reported elsewhere)."""
    if mesh["sequence"] == 1:
        return []
    try:
        factor, _ = pipeline.geometry(path, vae_stride)
        heads = load_config(pipeline_dir(path) / "transformer")["num_attention_heads"]
    except (ValueError, OSError, KeyError):
        return []
    problems = []
    for field, size in sizes.items():
        if isinstance(size, int) and size > 0 and size % factor == 0:
            found = ulysses.degree_problems(mesh["sequence"], heads, mesh["tensor"], size // factor)
            problems += [f"{p} ({field}={size} / {factor} pixels per token)" for p in found]
    return problems


def pipeline_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path, or an error naming it when it is not a pipeline folder (one with model_index.json)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pipeline folder {path} does not exist (expected a diffusers pipeline folder)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; expected a diffusers pipeline folder (with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    return path


def latent_shape(batch: int, height: int, width: int, factor: int, channels: int) -> tuple[int, int, int, int]:
    """[B, H/f, W/f, C]; H and W must be multiples of `factor` (the VAE's times the transformer's 2x2)."""
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor} for this pipeline, got {height}x{width}")
    return batch, height // (factor // 2), width // (factor // 2), channels


def initial_noise(seed: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal noise from one seed (same seed, same noise), drawn in float32 and cast to `dtype`
    (as torch.randn(dtype=bfloat16) does): drawn in bfloat16 it would hold only 128 distinct values, |z| <= 2.89."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def rows_held(sharding: jax.sharding.Sharding, batch: int) -> list[int]:
    """The rows of a [batch, ...] array on `sharding` that this process's devices hold (sorted; every row where
    the batch axis is not split)."""
    held = set()
    for index in sharding.addressable_devices_indices_map((batch,)).values():
        held.update(range(batch)[index[0]])
    return sorted(held)


def global_rows(sharding: jax.sharding.Sharding, batch: int, row: Callable[[int], Any]) -> jax.Array:
    """The [batch, ...] global array whose row i is `row(i)`, on `sharding` (which may split the batch axis
    only). Each process calls `row` once for each row it holds and for no other, so that no process builds,
    or compares with the others (as a device_put onto a multi-process sharding does), the whole batch."""
    rows = {i: np.asarray(row(i)) for i in rows_held(sharding, batch)}
    if not rows:
        raise ValueError(f"this process holds no device of {sharding}: every process must take part in the mesh")
    first = next(iter(rows.values()))

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if any(i != slice(None) for i in index[1:]):
            raise ValueError(f"{sharding} splits an axis other than the batch: {index}")
        return np.stack([rows[i] for i in range(batch)[index[0]]])

    return jax.make_array_from_callback((batch, *first.shape), sharding, shard)


def decode(vae: AutoencoderKL, vae_params: Any, latents: jax.Array) -> jax.Array:
    """Normalised latents -> images in [0, 1] [B, H, W, 3] float32 (diffusers' (x / 2 + 0.5).clamp(0, 1))."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    x = vae.apply({"params": vae_params}, z.astype(vae.dtype), method="decode").astype(jnp.float32)
    return jnp.clip(x / 2 + 0.5, 0, 1)


def to_output(images: jax.Array, output: str) -> jax.Array:
    """ "uint8": x255 rounded, as diffusers' numpy_to_pil; "float": [0, 1] as decoded."""
    if output == "float":
        return images
    if output != "uint8":
        raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
    return jnp.round(images * 255).astype(jnp.uint8)


def as_prompts(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts
