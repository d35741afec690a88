"""One training step of Diffusion-4K fine-tuning: noise levels, the velocity prediction, the WLF loss, AdamW.

Batches hold precomputed inputs (the VAE and text encoders are frozen, outside the step): normalised
latents `x0` [B, h, w, C], text states `text` [B, T, D] and pooled text `pooled` [B, P]. The step draws
sigma and noise from a key folded with the step number, so the same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from d4k_jax.diffusion import flow, wavelet


@dataclasses.dataclass(frozen=True)
class LossConfig:
    model: str = "flux"  # "flux": timestep = sigma with a guidance input; "sd3": timestep = 1000 sigma
    loss: str = "wlf"  # "wlf" or "flow" (the fine-tune-without-WLF ablation)
    timesteps: str = "reference"  # "reference" (per model, REFERENCE.md §3) or "shifted_uniform"
    shift: float = 3.0  # SD3's table shift, or the shifted_uniform shift
    guidance: float = 3.5  # Flux's guidance input during training
    wavelet: str = "haar"
    level: int = 1
    subband_weights: tuple[float, ...] | None = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def optimizer(
    lr: float | optax.Schedule = 1e-6,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
    trainable: Any = None,
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (the reference's optimizer in effect). `trainable` is a pytree of
    bools (or a function of params) selecting what is trained; the rest (e.g. SD3's sincos table) is frozen."""
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay))
    if trainable is None:
        return tx
    return optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()},
        lambda p: jax.tree.map(
            lambda t: "train" if t else "freeze", trainable(p) if callable(trainable) else trainable
        ),
    )


def sample_sigmas(key: jax.Array, batch: int, cfg: LossConfig) -> jax.Array:
    if cfg.timesteps == "shifted_uniform":
        return flow.shifted_uniform_sigmas(key, batch, cfg.shift)
    if cfg.timesteps != "reference":
        raise ValueError(f"timesteps must be 'reference' or 'shifted_uniform', got {cfg.timesteps!r}")
    if cfg.model == "sd3":
        return flow.sd3_training_sigmas(key, batch, cfg.shift)
    return flow.flux_training_sigmas(key, batch)


def loss_from_noise(model: nn.Module, params, batch: dict, noise: jax.Array, sigma: jax.Array, cfg: LossConfig):
    """The loss for given noise and sigma (what the parity test drives)."""
    x0 = batch["x0"]
    x_t = flow.add_noise(x0.astype(jnp.float32), noise.astype(jnp.float32), sigma).astype(model.dtype)
    if cfg.model == "flux":
        guidance = jnp.full(sigma.shape, cfg.guidance) if model.config.guidance_embeds else None
        v = model.apply({"params": params}, x_t, sigma, batch["text"], batch["pooled"], guidance)
    else:
        v = model.apply({"params": params}, x_t, sigma * 1000, batch["text"], batch["pooled"])
    if cfg.loss == "wlf":
        return wavelet.wlf_loss(
            v, x0, noise, sigma, wavelet=cfg.wavelet, level=cfg.level, subband_weights=cfg.subband_weights
        )
    if cfg.loss == "flow":
        return wavelet.flow_matching_loss(v, x0, noise)
    raise ValueError(f"loss must be 'wlf' or 'flow', got {cfg.loss!r}")


def train_step(
    state: TrainState,
    batch: dict,
    key: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: LossConfig,
) -> tuple[TrainState, dict]:
    """One optimizer step. `key` is the run's key; the step's randomness is fold_in(key, step)."""
    k_sigma, k_noise = jax.random.split(jax.random.fold_in(key, state.step))
    x0 = batch["x0"]
    sigma = sample_sigmas(k_sigma, x0.shape[0], cfg)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    loss, grads = jax.value_and_grad(lambda p: loss_from_noise(model, p, batch, noise, sigma, cfg))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "sigma_mean": sigma.mean()}
    return TrainState(state.step + 1, params, opt_state), metrics
