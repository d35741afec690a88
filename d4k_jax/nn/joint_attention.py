"""Joint attention of the MMDiT family (Flux, SD3): image and context tokens with separate q/k/v
weights, attended together (context first), optional per-head RMS qk-norm and rotary embeddings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d4k_jax.nn.attention import dot_product_attention
from d4k_jax.nn.linear import Dense
from d4k_jax.nn.norms import RMSNorm
from d4k_jax.nn.rope import apply_rope


class JointAttention(nn.Module):
    """Names follow diffusers: to_q/k/v, norm_q/k, add_{q,k,v}_proj, norm_added_q/k, to_out_0, to_add_out.

    out=False is Flux's single-stream "pre_only" attention (no output projection); context_out=False is
    SD3's last block ("context_pre_only": the context output is dropped).
    """

    heads: int
    head_dim: int
    qk_norm: bool = True
    eps: float = 1e-6
    out: bool = True
    context_out: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _project(self, x: jax.Array, proj: str, norm: str | None) -> jax.Array:  # [B, L, D] -> [B, L, N, K]
        y = Dense(
            self.heads * self.head_dim,
            axes=("embed", "heads"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=proj,
        )(x)
        y = y.reshape(*x.shape[:2], self.heads, self.head_dim)
        if norm is None or not self.qk_norm:
            return y
        return RMSNorm(self.eps, axis_name="head_dim", dtype=self.dtype, param_dtype=self.param_dtype, name=norm)(y)

    def _out(self, o: jax.Array, features: int, name: str) -> jax.Array:
        return Dense(features, axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name=name)(o)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None):
        """x [B, L, D], context [B, T, D], rope cos/sin [T + L, K] -> x' (and context' when given)."""
        q, k, v = (self._project(x, p, n) for p, n in (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None)))
        if context is not None:
            names = (("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"), ("add_v_proj", None))
            cq, ck, cv = (self._project(context, p, n) for p, n in names)
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = dot_product_attention(q, k, v).reshape(*q.shape[:2], self.heads * self.head_dim)  # [B, T + L, N*K]
        d = x.shape[-1]
        if context is None:
            return self._out(o, d, "to_out_0") if self.out else o
        t = context.shape[1]
        img = self._out(o[:, t:], d, "to_out_0")
        ctx = self._out(o[:, :t], context.shape[-1], "to_add_out") if self.context_out else None
        return img, ctx
