"""Joint attention of the MMDiT family (Flux, SD3): image and context tokens with separate q/k/v
weights, attended together (context first), optional per-head RMS qk-norm and rotary embeddings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn import ulysses
from d4k_jax.nn.linear import Dense
from d4k_jax.nn.norms import RMSNorm
from d4k_jax.nn.rope import apply_rope


class JointAttention(nn.Module):
    """Names follow diffusers: to_q/k/v, norm_q/k, add_{q,k,v}_proj, norm_added_q/k, to_out_0, to_add_out.

    out=False is Flux's single-stream "pre_only" attention (no output projection), where the context tokens
    share the image tokens' projections (shared=True); context_out=False is SD3's last block
    ("context_pre_only": the context output is dropped). The streams stay apart (never concatenated outside
    the attention kernel), so that under sequence parallelism the image tokens stay sharded while a text of
    a length that does not divide the degree stays replicated (nn.ulysses).
    """

    heads: int
    head_dim: int
    qk_norm: bool = True
    eps: float = 1e-6
    out: bool = True
    context_out: bool = True
    shared: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _projection(self, proj: str, norm: str | None):  # [B, L, D] -> [B, L, N, K]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = Dense(self.heads * self.head_dim, axes=("embed", "heads"), name=proj, **kw)
        rms = RMSNorm(self.eps, axis_name="head_dim", name=norm, **kw) if norm and self.qk_norm else None

        def project(x: jax.Array) -> jax.Array:
            y = dense(x).reshape(*x.shape[:2], self.heads, self.head_dim)
            return y if rms is None else rms(y)

        return project

    def _merged(self, o: jax.Array) -> jax.Array:  # [B, L, N, K] -> [B, L, N * K]
        return o.reshape(*o.shape[:2], self.heads * self.head_dim)

    def _out(self, o: jax.Array, features: int, name: str) -> jax.Array:
        dense = Dense(features, axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense(self._merged(o))

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None):
        """x [B, L, D], context [B, T, D], rope cos/sin [T + L, K] (context positions first) -> x' [B, L, D]
        and context' [B, T, D] when a context is given (out=False: the attention outputs [B, *, N * K])."""
        names = (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None))
        image = [self._projection(*n) for n in names]
        image_qkv = [f(x) for f in image]
        text_qkv = None
        if context is not None:
            added = (("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"), ("add_v_proj", None))
            text = image if self.shared else [self._projection(*n) for n in added]
            text_qkv = [f(context) for f in text]
        if rope is not None:
            t = 0 if context is None else context.shape[1]
            # the tables' halves, replicated (small constants): split over `sequence` like the tokens, their rows
            # would be shifted between devices by the slices at the text/image boundary
            half = lambda a, rows: nn.with_logical_constraint(a[rows], (None, None))
            (cos, sin), text_rope = ((half(a, slice(t, None)) for a in rope), [half(a, slice(t)) for a in rope])
            image_qkv[:2] = (apply_rope(y, cos, sin) for y in image_qkv[:2])
            if text_qkv is not None:
                text_qkv[:2] = (apply_rope(y, *text_rope) for y in text_qkv[:2])
        o_text, o_image = ulysses.joint_attention(None if text_qkv is None else tuple(text_qkv), tuple(image_qkv))
        if not self.out:
            return self._merged(o_image) if context is None else (self._merged(o_image), self._merged(o_text))
        img = self._out(o_image, x.shape[-1], "to_out_0")
        if context is None:
            return img
        ctx = self._out(o_text, context.shape[-1], "to_add_out") if self.context_out else None
        return img, ctx
