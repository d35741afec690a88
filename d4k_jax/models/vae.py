"""The 16-channel AutoencoderKL of SD3 / FLUX.1, and its F16 variant from Diffusion-4K.

NHWC throughout. Parameter names follow diffusers' module tree (`down_blocks_0/resnets_1/conv1`), so the
key map in `vae_keys.py` is a naming rule, not a table.

F16 (`stride=2`, REFERENCE.md §1): the encoder's conv_in runs with stride 2 on the same weights, and the
decoder ends GroupNorm -> SiLU -> nearest 2x -> conv_out, computed by `Conv2d(upsample=True)` without
materialising the 128-channel full-resolution tensor. `shifted_tail=True` reproduces the reference's
partitioned decode, whose output is shifted one pixel down-right (out[i, j] = full[i-1, j-1]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn import Conv2d, Dense, GroupNorm, dot_product_attention

_EPS = 1e-6  # every GroupNorm of the diffusers VAE
_ACT = ("batch", "height", "width", "channels")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 1.5305  # SD3; Flux: 0.3611
    shift_factor: float = 0.0609  # SD3; Flux: 0.1159
    stride: int = 1  # 2: the F16 VAE
    shifted_tail: bool = False  # (quirk) the reference's one-pixel shift of the F16 decode

    def __post_init__(self):
        if self.stride not in (1, 2):
            raise ValueError(f"VAE stride must be 1 (F8) or 2 (F16), got {self.stride}")
        if self.shifted_tail and self.stride != 2:
            raise ValueError("shifted_tail reproduces the F16 partitioned decode; it needs stride=2")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel: 8 for the stock VAE, 16 for F16."""
        return 2 ** (len(self.block_out_channels) - 1) * self.stride


class _Module(nn.Module):
    """Carries the config and dtypes every VAE submodule needs."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def conv(self, features: int, name: str, **kw) -> Conv2d:
        return Conv2d(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)

    def norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.config.norm_num_groups, _EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class ResnetBlock(_Module):
    features: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H, W, features]
        h = self.conv(self.features, "conv1")(nn.silu(self.norm("norm1")(x)))
        h = self.conv(self.features, "conv2")(nn.silu(self.norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = self.conv(self.features, "conv_shortcut", kernel_size=1, padding=0)(x)
        return nn.with_logical_constraint(x.astype(self.dtype) + h, _ACT)


class Attention(_Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.norm("group_norm")(x).reshape(b, hh * ww, c)  # [B, L, C]

        def proj(name):
            dense = Dense(c, axes=("embed", "heads"), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            return dense(h)[:, :, None, :]  # [B, L, 1, C]

        out = dot_product_attention(proj("to_q"), proj("to_k"), proj("to_v"))[:, :, 0]
        out = Dense(c, axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="to_out_0")(out)
        return x.astype(self.dtype) + out.reshape(b, hh, ww, c)


class Block(_Module):
    """diffusers' DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional 2x resample."""

    features: int = 0
    num_layers: int = 2
    resample: str | None = None  # "down", "up" or None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            h = ResnetBlock(features=self.features, name=f"resnets_{j}", **kw)(h)
        if self.resample is not None:
            h = Resample(
                features=self.features,
                down=self.resample == "down",
                name="downsamplers_0" if self.resample == "down" else "upsamplers_0",
                **kw,
            )(h)
        return h


class Resample(_Module):
    """Downsample2D (pad right/bottom by one, valid stride-2 conv) or Upsample2D (nearest 2x, conv)."""

    features: int = 0
    down: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.down:
            return self.conv(self.features, "conv", stride=2, padding=((0, 1), (0, 1)))(x)
        return self.conv(self.features, "conv")(x, upsample=True)


class MidBlock(_Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(features=c, name="resnets_0", **kw)(x)
        if self.config.mid_block_add_attention:
            x = Attention(name="attentions_0", **kw)(x)
        return ResnetBlock(features=c, name="resnets_1", **kw)(x)


class Encoder(_Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, 3] -> [B, h, w, 2 * latent]
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        h = self.conv(cfg.block_out_channels[0], "conv_in", stride=cfg.stride)(x)
        last = len(cfg.block_out_channels) - 1
        for i, features in enumerate(cfg.block_out_channels):
            resample = "down" if i < last else None
            h = Block(
                features=features,
                num_layers=cfg.layers_per_block,
                resample=resample,
                name=f"down_blocks_{i}",
                **kw,
            )(h)
        h = MidBlock(name="mid_block", **kw)(h)
        h = nn.silu(self.norm("conv_norm_out")(h))
        return self.conv(2 * cfg.latent_channels, "conv_out")(h)


class Decoder(_Module):
    """conv_in + mid-block at latent resolution, up-blocks, then the output tail."""

    def setup(self):
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        channels = cfg.block_out_channels[::-1]
        self.conv_in = self.conv(channels[0], "conv_in")
        self.mid_block = MidBlock(**kw)
        self.up_blocks = [
            Block(
                features=f,
                num_layers=cfg.layers_per_block + 1,
                resample="up" if i < len(channels) - 1 else None,
                name=f"up_blocks_{i}",
                **kw,
            )
            for i, f in enumerate(channels)
        ]
        self.conv_norm_out = self.norm("conv_norm_out")
        self.conv_out = self.conv(cfg.out_channels, "conv_out")

    def __call__(self, z: jax.Array) -> jax.Array:  # [B, h, w, latent] -> [B, H, W, 3]
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.tail(h)

    def tail(self, h: jax.Array) -> jax.Array:
        """GroupNorm -> SiLU -> conv_out; for F16 the conv reads the nearest-2x-upsampled input."""
        cfg = self.config
        h = nn.silu(self.conv_norm_out(h))
        if cfg.stride == 1:
            return self.conv_out(h)
        if not cfg.shifted_tail:
            return self.conv_out(h, upsample=True)
        # The reference's 2x2 partitioned tail equals the whole tail on a canvas grown by one zero pixel
        # at the top and left, read one (upsampled) pixel later: out[i, j] = full[i - 1, j - 1].
        hh, ww = h.shape[1:3]
        y = self.conv_out(jnp.pad(h, ((0, 0), (1, 0), (1, 0), (0, 0))), upsample=True)
        return y[:, 1 : 2 * hh + 1, 1 : 2 * ww + 1]


class AutoencoderKL(_Module):
    """`apply(v, x, method="encode") -> (mean, logvar)`; `apply(v, z, method="decode") -> x`.

    Images are in [-1, 1], latents raw (unnormalised); see `normalize_latents`.
    """

    def setup(self):
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        if cfg.use_quant_conv:
            self.quant_conv = self.conv(2 * cfg.latent_channels, "quant_conv", kernel_size=1, padding=0)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = self.conv(cfg.latent_channels, "post_quant_conv", kernel_size=1, padding=0)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, H, W, in_channels] -> mean, logvar [B, H/f, W/f, latent] (logvar clipped to [-30, 20])."""
        _check_channels("encode", x, self.config.in_channels)
        moments = self.encoder(nn.with_logical_constraint(x, _ACT))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, latent] (raw) -> x [B, h*f, w*f, out_channels]."""
        _check_channels("decode", z, self.config.latent_channels)
        z = nn.with_logical_constraint(z, _ACT)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Round trip through the posterior mean (used to initialise every parameter)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def _check_channels(what: str, x: jax.Array, channels: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"VAE {what} expects NHWC input with {channels} channels, got shape {x.shape}")


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z = mean + std * eps, as diffusers' DiagonalGaussianDistribution.sample (training encodes this). eps is
    drawn in float32 and cast to the mean's dtype, as torch.randn does: a bfloat16 draw has 128 values."""
    eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def normalize_latents(z: jax.Array, config: VAEConfig, *, use_shift: bool = True) -> jax.Array:
    """(z - shift) * scale. use_shift=False is the SD3 training script's quirk (z * scale)."""
    shift = config.shift_factor if use_shift else 0.0
    return (z - shift) * config.scaling_factor


def denormalize_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """z / scale + shift: what `decode` takes."""
    return z / config.scaling_factor + config.shift_factor


# The VAEs of the two base models (diffusers' vae/config.json); replace(stride=2) gives their F16 form.
SD3_VAE = VAEConfig(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = VAEConfig(scaling_factor=0.3611, shift_factor=0.1159)
