"""What both text-to-image pipelines share: loading, initial noise, VAE decode, uint8 output."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from d4k_jax.io import load_component
from d4k_jax.models.vae import AutoencoderKL


def load(path: Path, name: str, dtype: Any, **overrides):
    """(module, params) of one pipeline component folder (diffusers or converted)."""
    folder = path / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no {name}/ component folder (a diffusers pipeline or converted directory)")
    return load_component(folder, dtype=dtype, param_dtype=dtype, **overrides)


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
