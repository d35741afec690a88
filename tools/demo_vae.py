"""The demo's F16 VAE: its config, its training on the procedural demo images, and what is measured of it
(held-out PSNR, the latent shift and scale written into its config.json). Used by tools/make_demo_pipeline.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d4k_jax.metrics import recon
from d4k_jax.models.vae import AutoencoderKL, VAEConfig, sample_posterior

SIZE = 64  # demo image size; the pipeline samples at this size
DIFFUSERS_VERSION = "0.42.1"
VAE = VAEConfig(
    latent_channels=8,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    mid_block_add_attention=True,
    stride=2,  # F16: 64x64 -> 8x8 (4 from the blocks, 2 from the strided conv_in)
)


def images_of(examples: list[tuple[np.ndarray, str]]) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 in [-1, 1]."""
    return np.stack([img for img, _ in examples]).astype(np.float32) / 127.5 - 1


def train_vae(
    images: np.ndarray, key: jax.Array, log: Callable[[str], None], steps: int, batch: int, lr: float, kl_weight: float
) -> dict:
    """L1 of the decoded posterior sample + kl_weight x KL(q || N(0, 1)) per element; Adam, warmup + cosine."""
    vae = AutoencoderKL(VAE)
    init_key, key = jax.random.split(key)
    params = nn.unbox(jax.jit(vae.init)(init_key, jnp.zeros((1, SIZE, SIZE, 3)))["params"])
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr / 20)
    opt = optax.adam(schedule)
    state = opt.init(params)

    def loss_fn(p, x, k):
        mean, logvar = vae.apply({"params": p}, x, method="encode")
        y = vae.apply({"params": p}, sample_posterior(k, mean, logvar), method="decode")
        kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1 - logvar)
        l1 = jnp.mean(jnp.abs(y - x))
        return l1 + kl_weight * kl, (l1, kl)

    @jax.jit
    def step(p, s, x, k):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, k)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, aux

    data = jnp.asarray(images)
    start = time.time()
    for i in range(steps):
        k = jax.random.fold_in(key, i)
        idx = jax.random.randint(jax.random.fold_in(k, 1), (batch,), 0, len(images))
        params, state, (l1, kl) = step(params, state, data[idx], k)
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"vae step {i + 1}/{steps}: l1 {float(l1):.4f} kl {float(kl):.3f} ({time.time() - start:.0f} s)")
    return params


def reconstruct(vae: AutoencoderKL, params: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """[-1, 1] images -> uint8 reconstructions through the posterior mean, as the pipeline would output them."""
    fn = jax.jit(
        lambda x: vae.apply({"params": params}, vae.apply({"params": params}, x, method="encode")[0], method="decode")
    )
    out = np.concatenate([np.asarray(fn(images[i : i + batch])) for i in range(0, len(images), batch)])
    return np.round(np.clip(out / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def psnr(originals: np.ndarray, recons: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 images."""
    return float(np.mean(recon.psnr(np.stack(originals), np.stack(recons))))


def latent_stats(vae: AutoencoderKL, params: Any, images: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """(shift, scale) = (mean, 1 / std) of the posterior means over `images`, as the SD3 / Flux VAE configs."""
    fn = jax.jit(lambda x: vae.apply({"params": params}, x, method="encode")[0])
    means = np.concatenate([np.asarray(fn(images[i : i + batch])) for i in range(0, len(images), batch)])
    return float(means.mean()), float(1 / means.std())


def vae_config(shift: float, scale: float) -> dict[str, Any]:
    """diffusers' AutoencoderKL config.json, plus the "stride": 2 that makes d4k_jax build the F16 VAE."""
    n = len(VAE.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(VAE.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": VAE.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": VAE.layers_per_block,
        "mid_block_add_attention": VAE.mid_block_add_attention,
        "norm_num_groups": VAE.norm_num_groups,
        "out_channels": 3,
        "sample_size": SIZE,
        "scaling_factor": round(scale, 4),
        "shift_factor": round(shift, 4),
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
        "stride": VAE.stride,
    }
