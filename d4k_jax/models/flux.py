"""FLUX.1 transformer (diffusers' FluxTransformer2DModel) over unpacked NHWC latents.

`flux.apply(v, latents, timestep, encoder_hidden_states, pooled_projections, guidance=None) -> velocity`
with latents and velocity [B, H, W, C] (C = in_channels / 4), timestep [B] in [0, 1] and guidance [B]
as the diffusers pipeline passes them (both are multiplied by 1000 inside). The module packs 2x2 patches
(channel order c*4 + dy*2 + dx), uses img_ids (0, row, col) and txt_ids 0, and unpacks the output.

Parameter names mirror diffusers (`transformer_blocks/attn/to_q`); the 19 double-stream and 38
single-stream blocks are each one `nn.scan` with a leading "layers" axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn import Dense, LayerNorm, fp8, stack
from d4k_jax.nn.embeddings import AdaLN, TimeTextEmbed, modulate
from d4k_jax.nn.feedforward import FeedForward
from d4k_jax.nn.joint_attention import JointAttention
from d4k_jax.nn.rope import rope_tables
from d4k_jax.nn.ulysses import token_axes

_TOKENS = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # packed: 4 x the latent channels
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    mlp_ratio: float = 4.0
    remat: str = "none"  # d4k_jax.nn.stack.REMAT_POLICIES; "full" / "dots" for training
    # q/k/v (and the single blocks' proj_mlp) as one matmul per stream, same params (nn.joint_attention);
    # off until a GPU measures it
    fused_qkv: bool = False
    # the blocks' token-wise matmuls in FP8 (E4M3, dynamic scales; nn.fp8): sampling only
    fp8: bool = False

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if self.in_channels % 4:
            raise ValueError(f"in_channels {self.in_channels} must be 4 x the latent channels (2x2 packing)")

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4


def pack(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2 * W/2, 4C], channel index c*4 + dy*2 + dx (diffusers' _pack_latents)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: jax.Array, h: int, w: int) -> jax.Array:
    """The inverse of `pack`: [B, H/2 * W/2, 4C] -> [B, H, W, C]."""
    b, _, c4 = x.shape
    x = x.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c4 // 4)


def position_ids(h: int, w: int, text_len: int) -> jax.Array:
    """[T + L, 3] int32: txt_ids (zeros) then img_ids (0, row, col) over the packed H/2 x W/2 grid; from iota
    under jit (computed in the program, not a constant of the program)."""
    grid = (h // 2, w // 2)
    rows, cols = (jax.lax.broadcasted_iota(jnp.int32, grid, axis).reshape(-1) for axis in (0, 1))
    img = jnp.stack([jnp.zeros_like(rows), rows, cols], -1)
    return jnp.concatenate([jnp.zeros((text_len, 3), jnp.int32), img])


class _Block(nn.Module):
    config: FluxConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def attention(self, **kw) -> JointAttention:
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        return JointAttention(heads, head_dim, fused_qkv=cfg.fused_qkv, name="attn", **kw, **self.kw())

    def norm(self, x: jax.Array) -> jax.Array:  # the affine-free LayerNorm of the adaLN blocks
        return LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(x)


class DoubleBlock(_Block):
    """Double-stream block (diffusers' FluxTransformerBlock): separate weights per stream, joint attention."""

    @nn.compact
    def __call__(self, carry, temb, cos, sin):  # carry: image [B, L, D], text [B, T, D]
        img, txt = carry
        d = self.config.dim
        shift, scale, gate, shift2, scale2, gate2 = AdaLN(6, d, name="norm1", **self.kw())(temb)
        cshift, cscale, cgate, cshift2, cscale2, cgate2 = AdaLN(6, d, name="norm1_context", **self.kw())(temb)
        img_attn, txt_attn = self.attention()(
            modulate(self.norm(img), shift, scale), modulate(self.norm(txt), cshift, cscale), rope=(cos, sin)
        )
        hidden = int(d * self.config.mlp_ratio)
        img = img + gate * img_attn
        img = img + gate2 * FeedForward(hidden, name="ff", **self.kw())(modulate(self.norm(img), shift2, scale2))
        txt = txt + cgate * txt_attn
        txt = txt + cgate2 * FeedForward(hidden, name="ff_context", **self.kw())(
            modulate(self.norm(txt), cshift2, cscale2)
        )
        txt = nn.with_logical_constraint(txt, token_axes(txt.shape[1]))
        return (nn.with_logical_constraint(img, _TOKENS), txt), None


class SingleBlock(_Block):
    """Single-stream block (diffusers' FluxSingleTransformerBlock): attention and MLP in parallel.

    diffusers runs it on concat([text, image]); every layer but the attention is per token, so here the two
    streams keep their own arrays through the same weights (the same numbers), and a sequence-sharded image
    never meets a replicated text in one array (nn.ulysses)."""

    @nn.compact
    def __call__(self, carry, temb, cos, sin):  # carry: image [B, L, D], text [B, T, D]
        d = self.config.dim
        shift, scale, gate = AdaLN(3, d, name="norm", **self.kw())(temb)
        h_img, h_txt = (modulate(self.norm(x), shift, scale) for x in carry)
        mlp = Dense(self.config.mlp_dim, axes=("embed", "mlp"), name="proj_mlp", **self.kw())
        # proj_mlp's matmul joins q/k/v's under fused_qkv (BFL's linear1); its outputs come back beside them
        attn, mlp_in = self.attention(out=False, shared=True)(h_img, h_txt, rope=(cos, sin), extra=mlp)
        # diffusers' proj_out acts on concat([attn, gelu(mlp)]): here two matmuls whose outputs add (the key
        # maps split its kernel's columns), so that a head-sharded attn and an mlp-sharded MLP each contract
        # where they are, with no [B, L, 5D] concatenation resharded between them under tensor parallelism
        proj_attn = Dense(d, axes=("heads", "embed"), use_bias=False, name="proj_out_attn", **self.kw())
        proj_mlp = Dense(d, axes=("mlp", "embed"), name="proj_out_mlp", **self.kw())
        out = [
            x + gate * (proj_attn(a) + proj_mlp(nn.gelu(m, approximate=True)))
            for x, a, m in zip(carry, attn, mlp_in, strict=True)
        ]
        return tuple(nn.with_logical_constraint(x, token_axes(x.shape[1])) for x in out), None


class Flux(nn.Module):
    config: FluxConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        """latents [B, H, W, C], timestep [B] in [0, 1], encoder_hidden_states [B, T, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim], guidance [B] -> velocity [B, H, W, out_channels / 4]."""
        cfg = self.config
        _, h, w, _ = _check_inputs(cfg, latents, encoder_hidden_states, pooled_projections, guidance)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = cfg.dim
        # diffusers rounds t and g to the compute dtype, then scales by 1000 in that dtype
        scaled = lambda t: None if t is None else t.astype(self.dtype) * 1000
        temb = TimeTextEmbed(d, guidance=cfg.guidance_embeds, name="time_text_embed", **kw)(
            scaled(timestep), pooled_projections.astype(self.dtype), scaled(guidance)
        )
        img = Dense(d, axes=(None, "embed"), name="x_embedder", **kw)(pack(latents.astype(self.dtype)))
        txt = Dense(d, axes=(None, "embed"), name="context_embedder", **kw)(encoder_hidden_states.astype(self.dtype))
        img = nn.with_logical_constraint(img, _TOKENS)
        txt = nn.with_logical_constraint(txt, token_axes(txt.shape[1]))
        t = txt.shape[1]
        sizes = (1, h // 2, w // 2)  # the ids' bounds per axis: index 0, rows, columns
        cos, sin = rope_tables(position_ids(h, w, t), cfg.axes_dims_rope, cfg.theta, sizes)

        block_kw = dict(config=cfg, **kw)
        with fp8.matmuls(cfg.fp8):
            double = stack(DoubleBlock, cfg.num_layers, remat=cfg.remat, num_broadcast=3)
            (img, txt), _ = double(name="transformer_blocks", **block_kw)((img, txt), temb, cos, sin)
            single = stack(SingleBlock, cfg.num_single_layers, remat=cfg.remat, num_broadcast=3)
            (img, _), _ = single(name="single_transformer_blocks", **block_kw)((img, txt), temb, cos, sin)

        scale, shift = AdaLN(2, d, name="norm_out", **kw)(temb)  # AdaLayerNormContinuous: (scale, shift)
        img = modulate(LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(img), shift, scale)
        out = Dense(
            cfg.in_channels if cfg.out_channels is None else cfg.out_channels,
            axes=("embed", None),
            name="proj_out",
            **kw,
        )(img)
        return unpack(out, h, w)


def _check_inputs(cfg: FluxConfig, latents, text, pooled, guidance) -> tuple[int, int, int, int]:
    if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
        raise ValueError(f"Flux expects latents [B, H, W, {cfg.latent_channels}], got {latents.shape}")
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 patches: latent height and width must be even, got {h}x{w}")
    if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.joint_attention_dim:
        raise ValueError(f"encoder_hidden_states must be [{b}, T, {cfg.joint_attention_dim}], got {text.shape}")
    if pooled.shape != (b, cfg.pooled_projection_dim):
        raise ValueError(f"pooled_projections must be [{b}, {cfg.pooled_projection_dim}], got {pooled.shape}")
    if cfg.guidance_embeds and guidance is None:
        raise ValueError("this Flux model has a guidance embedding: pass guidance [B] (e.g. 3.5)")
    if not cfg.guidance_embeds and guidance is not None:
        raise ValueError("this Flux model has no guidance embedding (schnell-style); pass guidance=None")
    return b, h, w, c
