"""SD3 / SD3.5 MMDiT (diffusers' SD3Transformer2DModel) over NHWC latents.

`mmdit.apply(v, latents, timestep, encoder_hidden_states, pooled_projections) -> velocity`, latents and
velocity [B, H, W, C], timestep [B] in [0, 1000] as the diffusers pipeline passes it.

Patches of p x p (a p-strided conv) get the centre crop of a fixed 2D sincos table of
pos_embed_max_size² positions (192² for SD3-medium: latents up to 384², i.e. 6144² pixels with the F16
VAE). Identical consecutive blocks are one `nn.scan` each; the last block differs ("context_pre_only":
no context output), and SD3.5's dual-attention blocks differ too, so the parameter tree holds one entry
per run of identical blocks, named after its first block: `transformer_blocks_0`, `transformer_blocks_23`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.nn import Conv2d, Dense, LayerNorm, fp8, stack
from d4k_jax.nn.embeddings import AdaLN, TimeTextEmbed, modulate
from d4k_jax.nn.feedforward import FeedForward
from d4k_jax.nn.joint_attention import JointAttention
from d4k_jax.nn.stack import rematerialize
from d4k_jax.nn.ulysses import token_axes

_TOKENS = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    sample_size: int = 128  # sets the sincos table's base size (sample_size / patch_size)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5: (0, ..., 12)
    qk_norm: str | None = None  # SD3.5: "rms_norm"
    remat: str = "none"
    # q/k/v as one matmul per stream, same params (nn.joint_attention); off until a GPU measures it
    fused_qkv: bool = False
    # the blocks' token-wise matmuls in FP8 (E4M3, dynamic scales; nn.fp8): sampling only
    fp8: bool = False

    def __post_init__(self):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported (None or 'rms_norm')")
        if self.caption_projection_dim != self.dim:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal the width {self.dim}")
        if self.num_layers - 1 in self.dual_attention_layers:
            raise ValueError("the last (context_pre_only) block cannot have dual attention")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def groups(self) -> list[tuple[int, int, bool]]:
        """Runs of identical blocks: (first block, count, dual attention); the last block alone."""
        runs: list[tuple[int, int, bool]] = []
        for i in range(self.num_layers - 1):
            dual = i in self.dual_attention_layers
            if runs and runs[-1][2] == dual:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, dual)
            else:
                runs.append((i, 1, dual))
        return [*runs, (self.num_layers - 1, 1, False)]


def sincos_table(dim: int, size: int, base_size: int) -> np.ndarray:
    """diffusers' get_2d_sincos_pos_embed(dim, size, base_size) -> [size * size, dim] float32."""
    grid = np.arange(size, dtype=np.float32) / np.float32(size / base_size)
    ww, hh = np.meshgrid(grid, grid, indexing="xy")  # (w first: the first half of dim encodes the column)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one(pos):
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(ww), one(hh)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """p x p patches -> tokens [B, h/p * w/p, D], plus the centre crop of the sincos table.

    The table is a parameter (`pos_embed/pos_embed`, as diffusers' buffer of that name) so that
    checkpoints load it bit-exactly; training keeps it frozen, as the reference does (train_step.FROZEN).
    It is sharded over "embed" like the other parameters (192² x 1536 fp32 is 226 MB for SD3-medium): the
    forward gathers it like any other parameter.
    """

    config: MMDiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        p, m, d = cfg.patch_size, cfg.pos_embed_max_size, cfg.dim
        table = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda *_: jnp.asarray(sincos_table(d, m, cfg.sample_size // p)[None], self.param_dtype),
                (None, None, "embed"),
            ),
        )  # [1, m * m, D]
        y = Conv2d(
            d,
            kernel_size=p,
            stride=p,
            padding=0,
            axes=(None, None, None, "embed"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)
        b, h, w, _ = y.shape
        top, left = (m - h) // 2, (m - w) // 2
        pos = table.reshape(m, m, d)[top : top + h, left : left + w].reshape(1, h * w, d)
        return y.reshape(b, h * w, d) + pos.astype(self.dtype)


class JointBlock(nn.Module):
    """diffusers' JointTransformerBlock: adaLN-zero per stream, joint attention, feed-forward per stream."""

    config: MMDiTConfig
    dual: bool = False  # SD3.5: a second, image-only self-attention
    last: bool = False  # context_pre_only: the context stream ends here
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, temb):  # carry: image [B, L, D], text [B, T, D]
        cfg = self.config
        img, txt = carry
        d = cfg.dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda x: LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(x)
        attention = lambda name, **a: JointAttention(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            qk_norm=cfg.qk_norm is not None,
            fused_qkv=cfg.fused_qkv,
            name=name,
            **a,
            **kw,
        )
        mods = AdaLN(9 if self.dual else 6, d, name="norm1", **kw)(temb)
        shift, scale, gate, shift2, scale2, gate2 = mods[:6]
        n = norm(img)
        if self.last:  # AdaLayerNormContinuous: (scale, shift)
            cscale, cshift = AdaLN(2, d, name="norm1_context", **kw)(temb)
        else:
            cshift, cscale, cgate, cshift2, cscale2, cgate2 = AdaLN(6, d, name="norm1_context", **kw)(temb)
        img_attn, txt_attn = attention("attn", context_out=not self.last)(
            modulate(n, shift, scale), modulate(norm(txt), cshift, cscale)
        )
        img = img + gate * img_attn
        if self.dual:
            shift_b, scale_b, gate_b = mods[6:]
            img = img + gate_b * attention("attn2")(modulate(n, shift_b, scale_b))
        hidden = 4 * d
        img = img + gate2 * FeedForward(hidden, name="ff", **kw)(modulate(norm(img), shift2, scale2))
        if self.last:
            return (nn.with_logical_constraint(img, _TOKENS), txt), None
        text_axes = token_axes(txt.shape[1])
        txt = txt + cgate * txt_attn
        txt = txt + cgate2 * FeedForward(hidden, name="ff_context", **kw)(modulate(norm(txt), cshift2, cscale2))
        return (nn.with_logical_constraint(img, _TOKENS), nn.with_logical_constraint(txt, text_axes)), None


class MMDiT(nn.Module):
    config: MMDiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, latents: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array
    ) -> jax.Array:
        """latents [B, H, W, C], timestep [B] in [0, 1000], encoder_hidden_states [B, T, joint_attention_dim],
        pooled_projections [B, pooled_projection_dim] -> velocity [B, H, W, out_channels]."""
        cfg = self.config
        _check_inputs(cfg, latents, encoder_hidden_states, pooled_projections)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, _ = latents.shape
        p, d = cfg.patch_size, cfg.dim
        img = PatchEmbed(cfg, name="pos_embed", **kw)(latents.astype(self.dtype))
        temb = TimeTextEmbed(d, name="time_text_embed", **kw)(timestep, pooled_projections.astype(self.dtype))
        txt = Dense(cfg.caption_projection_dim, axes=(None, "embed"), name="context_embedder", **kw)(
            encoder_hidden_states.astype(self.dtype)
        )
        img = nn.with_logical_constraint(img, _TOKENS)
        txt = nn.with_logical_constraint(txt, token_axes(txt.shape[1]))
        with fp8.matmuls(cfg.fp8):
            for first, count, dual in cfg.groups():
                name = f"transformer_blocks_{first}"
                if first == cfg.num_layers - 1:
                    block = rematerialize(JointBlock, cfg.remat)  # its activations are as large as any block's
                    (img, _), _ = block(cfg, dual=dual, last=True, name=name, **kw)((img, txt), temb)
                else:
                    blocks = stack(JointBlock, count, remat=cfg.remat, num_broadcast=1)
                    (img, txt), _ = blocks(cfg, dual=dual, name=name, **kw)((img, txt), temb)
        scale, shift = AdaLN(2, d, name="norm_out", **kw)(temb)
        img = modulate(LayerNorm(1e-6, use_scale=False, use_bias=False, dtype=self.dtype)(img), shift, scale)
        c = cfg.out_channels or cfg.in_channels
        out = Dense(p * p * c, axes=("embed", None), name="proj_out", **kw)(img)  # [B, L, p * p * C]
        out = out.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, c)


def _check_inputs(cfg: MMDiTConfig, latents, text, pooled) -> None:
    if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
        raise ValueError(f"MMDiT expects latents [B, H, W, {cfg.in_channels}], got {latents.shape}")
    b, h, w, _ = latents.shape
    p, m = cfg.patch_size, cfg.pos_embed_max_size
    if h % p or w % p:
        raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {h}x{w}")
    if max(h, w) > m * p:
        raise ValueError(
            f"latents of {h}x{w} exceed the position table: this checkpoint supports latents up to {m * p}x{m * p} "
            f"(pos_embed_max_size {m} x patch {p}), i.e. {m * p * 16}² pixels with the F16 VAE, {m * p * 8}² with F8"
        )
    if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.joint_attention_dim:
        raise ValueError(f"encoder_hidden_states must be [{b}, T, {cfg.joint_attention_dim}], got {text.shape}")
    if pooled.shape != (b, cfg.pooled_projection_dim):
        raise ValueError(f"pooled_projections must be [{b}, {cfg.pooled_projection_dim}], got {pooled.shape}")
