"""One training step of Diffusion-4K fine-tuning: noise levels, the velocity prediction, the WLF loss, AdamW.

A batch holds either images `image` [B, H, W, 3] (uint8 as the loader ships them, or floats in [-1, 1]; see
`to_unit_range`), which the frozen VAE encodes inside the
step (a posterior sample, as the reference trains), or precomputed normalised latents `x0` [B, h, w, C];
plus text states `text` [B, T, D] and pooled text `pooled` [B, P] from the text-embedding cache. The step
draws sigma, noise and the posterior sample from a key folded with the step number, so the same seed gives
the same run, whatever the microbatching or the device count.

Only the trainable parameters are differentiated (`trainable_mask`: all but SD3's fixed sincos table); the
frozen ones enter the loss as constants and come out of the step bit-identical, so no gradient of theirs is
computed, all-reduced or counted in the logged `grad_norm`, which is the norm the optimizer clips.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from d4k_jax import lora
from d4k_jax.diffusion import flow, wavelet
from d4k_jax.models.vae import AutoencoderKL, normalize_latents
from d4k_jax.nn import linear


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
    latent_shift: bool = True  # False: the SD3 training script's quirk, z * scale without the shift


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# Parameters that are buffers in diffusers and never trained: SD3's sincos position table (mmdit.PatchEmbed).
FROZEN = (("pos_embed", "pos_embed"),)


def trainable_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True for what training updates, False for the FROZEN buffers."""
    return traverse_util.path_aware_map(lambda path, _: tuple(path[-2:]) not in FROZEN, params)


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """(selected, rest): `tree` twice, with None in place of the leaves that belong to the other part."""
    return (
        jax.tree.map(lambda x, m: x if m else None, tree, mask),
        jax.tree.map(lambda x, m: None if m else x, tree, mask),
    )


def combine(a: Any, b: Any) -> Any:
    """The inverse of `partition`: a's leaves where it has them, b's where a has None."""
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda x: x is None)


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
    bools (or a function of params, e.g. `trainable_mask`) selecting what is trained: the rest gets no
    moments. Give `train_step` the same mask (its default is `trainable_mask`)."""
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


@flax.struct.dataclass
class Frozen:
    """The frozen base of LoRA training (d4k_jax/lora.py), an input of the step as the VAE's params are: the
    transformer's params (stored in the compute dtype: no gradient, no optimizer state, no float32 copy) and the
    adapters' fixed scales; the train state's params are then the adapters alone."""

    params: Any
    scales: Any


def loss_from_noise(
    model: nn.Module,
    params,
    batch: dict,
    noise: jax.Array,
    sigma: jax.Array,
    cfg: LossConfig,
    base: Frozen | None = None,
    dropout: tuple[float, jax.Array] | None = None,
):
    """The loss for given noise and sigma (what the parity test drives). With a `base`, `params` are LoRA adapters
    on it; `dropout` (rate, key): the adapters' dropout (nn.linear.lora_dropout)."""
    x0 = batch["x0"]
    f = jnp.promote_types(x0.dtype, jnp.float32)  # float64 in the float64 parity test
    x_t = flow.add_noise(x0.astype(f), noise.astype(f), sigma).astype(model.dtype)
    variables = {"params": params} if base is None else lora.variables(base.params, params, base.scales)
    rate, key = dropout or (0.0, None)
    apply = functools.partial(model.apply, variables, rngs={"dropout": key} if rate else None)
    with linear.lora_dropout(rate):
        if cfg.model == "flux":
            guidance = jnp.full(sigma.shape, cfg.guidance) if model.config.guidance_embeds else None
            v = apply(x_t, sigma, batch["text"], batch["pooled"], guidance)
        else:
            v = apply(x_t, sigma * 1000, batch["text"], batch["pooled"])
    if cfg.loss == "wlf":
        return wavelet.wlf_loss(
            v, x0, noise, sigma, wavelet=cfg.wavelet, level=cfg.level, subband_weights=cfg.subband_weights
        )
    if cfg.loss == "flow":
        return wavelet.flow_matching_loss(v, x0, noise)
    raise ValueError(f"loss must be 'wlf' or 'flow', got {cfg.loss!r}")


def loss_and_grads(
    model: nn.Module, params, frozen, inputs: dict, cfg: LossConfig, base: Frozen | None = None, dropout=None
) -> tuple[jax.Array, Any]:
    """The loss of `inputs` (x0, text, pooled, noise, sigma) and its gradient in `params`, the trainable part
    of `partition(all params, mask)`; `frozen`, the other part, enters as constants: its entries in the
    gradient tree are None, and no cotangent of theirs is ever computed. `base`, `dropout`: as loss_from_noise."""
    fn = lambda p: loss_from_noise(
        model, combine(p, frozen), inputs, inputs["noise"], inputs["sigma"], cfg, base, dropout
    )
    return jax.value_and_grad(fn)(params)


# x / 127.5 - 1 for every uint8 value, computed in float32 on the host: XLA turns a division by a constant
# into a multiplication by its reciprocal, which rounds differently for some values; a table lookup is exact.
_UNIT_RANGE = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1)


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1], x / 127.5 - 1 as the host computes it (REFERENCE.md §3);
    floating images are taken as already in [-1, 1]."""
    if images.dtype == jnp.uint8:
        return jnp.asarray(_UNIT_RANGE)[images]
    return images


def encode_images(
    vae: AutoencoderKL, vae_params: Any, images: jax.Array, key: jax.Array, *, passes: int = 1, use_shift: bool = True
) -> jax.Array:
    """Frozen VAE: images [B, H, W, 3] (uint8, or in [-1, 1]) -> normalised posterior-sample latents [B, h, w, C].

    `passes` > 1 encodes the batch in that many sequential passes (pass j takes images j, j + passes, ...,
    so a data-sharded batch stays balanced over the devices): at 4096² the encoder's activations, not the
    transformer's, set the peak, and this bounds them by B / passes images.
    """
    b = images.shape[0]
    if b % passes:
        raise ValueError(f"batch {b} must divide into {passes} encode passes")
    f = vae.config.downsample_factor
    shape = (b, images.shape[1] // f, images.shape[2] // f, vae.config.latent_channels)
    eps = jax.random.normal(key, shape, jnp.float32)  # drawn whole: the sample does not depend on `passes`

    def encode(x, e):
        x = to_unit_range(x).astype(vae.dtype)  # per pass: only one pass's images are ever floats
        mean, logvar = vae.apply({"params": vae_params}, x, method="encode")
        z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * e
        return normalize_latents(z, vae.config, use_shift=use_shift)

    x0 = encode(images, eps) if passes == 1 else _strided_map(encode, passes, images, eps)
    return jax.lax.stop_gradient(x0)


def _strided(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B / n, ...], slice j holding rows j, j + n, ... (balanced over a sharded batch)."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def _strided_map(fn, n: int, *xs: jax.Array) -> jax.Array:
    """fn over the n strided slices of the batch in sequence (lax.map), reassembled in batch order."""
    out = jax.lax.map(lambda a: fn(*a), tuple(_strided(x, n) for x in xs))
    return out.swapaxes(0, 1).reshape(-1, *out.shape[2:])


# One function, so that the order of the step's randomness, encode, microbatches and update reads in one place.
def train_step(
    state: TrainState,
    batch: dict,
    key: jax.Array,
    vae_params: Any = None,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: LossConfig,
    vae: AutoencoderKL | None = None,
    microbatches: int = 1,
    encode_passes: int = 1,
    trainable: Any = None,
    param_sharding: Any = None,
    base: Frozen | None = None,
    lora_dropout: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer step. `key` is the run's key; the step's randomness is fold_in(key, step).

    `trainable` (a pytree of bools like the params, a function of the params, or None: `trainable_mask`)
    selects the differentiated parameters; the others are kept as they are, whatever `tx` does with their
    (zero) gradients. `microbatches` > 1 accumulates the gradient over that many strided slices of the
    batch in sequence (fp32 sums), for global batches whose activations do not fit at once; the result
    equals one pass. `param_sharding` (NamedShardings like the params) keeps that fp32 accumulator
    sharded like the parameters: left unconstrained, XLA may hold it whole on every device. `base` (LoRA
    training): the state's params are adapters on this frozen transformer, with `lora_dropout` on their inputs.
    """
    k_sigma, k_noise, k_vae = jax.random.split(jax.random.fold_in(key, state.step), 3)
    if "image" in batch:
        if vae is None:
            raise ValueError("the batch holds images: pass the frozen `vae` (and vae_params) to encode them")
        x0 = encode_images(vae, vae_params, batch["image"], k_vae, passes=encode_passes, use_shift=cfg.latent_shift)
    else:
        x0 = batch["x0"]
    b = x0.shape[0]
    if b % microbatches:
        raise ValueError(f"batch {b} must divide into {microbatches} microbatches")
    sigma = sample_sigmas(k_sigma, b, cfg)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    inputs = {"x0": x0, "text": batch["text"], "pooled": batch["pooled"], "noise": noise, "sigma": sigma}
    mask = trainable_mask(state.params) if trainable is None else trainable
    mask = mask(state.params) if callable(mask) else mask
    params, frozen = partition(state.params, mask)
    # the adapters' dropout key, per microbatch; the step's other keys are as without it
    k_drop = jax.random.fold_in(jax.random.fold_in(key, state.step), microbatches)
    dropout = lambda i: (lora_dropout, jax.random.fold_in(k_drop, i)) if lora_dropout else None
    if microbatches == 1:
        loss, grads = loss_and_grads(model, params, frozen, inputs, cfg, base, dropout(0))
    else:
        shardings = None if param_sharding is None else partition(param_sharding, mask)[0]
        hold = lambda t: t if shardings is None else jax.tree.map(jax.lax.with_sharding_constraint, t, shardings)

        def accumulate(carry, indexed):
            i, micro = indexed
            loss, grads = loss_and_grads(model, params, frozen, micro, cfg, base, dropout(i))
            return (carry[0] + loss, hold(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry[1], grads))), None

        zeros = (jnp.zeros(()), hold(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)))
        strided = jax.tree.map(lambda x: _strided(x, microbatches), inputs)
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), strided))
        loss = loss / microbatches
        grads = jax.tree.map(lambda g, p: (g / microbatches).astype(p.dtype), grads, params)
    # the optimizer state covers every parameter (as tx.init(params) made it): zeros stand for the frozen ones
    updates, opt_state = tx.update(combine(grads, jax.tree.map(jnp.zeros_like, frozen)), state.opt_state, state.params)
    params = combine(optax.apply_updates(params, partition(updates, mask)[0]), frozen)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "sigma_mean": sigma.mean()}
    return TrainState(state.step + 1, params, opt_state), metrics
