"""Joint attention of the MMDiT family (Flux, SD3): image and context tokens with separate q/k/v
weights, attended together (context first), optional per-head RMS qk-norm and rotary embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d4k_jax.nn import fp8, ulysses
from d4k_jax.nn.linear import Dense
from d4k_jax.nn.norms import RMSNorm
from d4k_jax.nn.rope import apply_rope

_IMAGE = (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None))
_TEXT = (("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"), ("add_v_proj", None))


def fused_kernel(
    weights: Sequence[tuple[jax.Array, jax.Array | None]], heads: int, dtype: Any
) -> tuple[jax.Array, jax.Array, list[int]]:
    """Several Dense layers' kernels [D, heads * C_i] (and biases [heads * C_i] or None) as one kernel
    [D, N, sum C_i] and bias [N, sum C_i] in `dtype`, and the widths C_i; see `fused_dense`.

    The kernels are regrouped per head, not concatenated whole ([D, sum N C_i]): a kernel split over its heads
    (the logical "heads" / "mlp" axis on `tensor`) keeps that split on N, so each shard holds its own heads'
    columns of every layer and nothing is resharded; one concatenated output axis would put all of q on the
    first shards and all of v on the last. The concatenation happens per call (params stay as they are
    stored): with fp32 params (training) XLA can fold it into the cast to the compute dtype; with params stored
    in the compute dtype (sampling) it is one more copy of these weights per step (unmeasured on a GPU).
    """
    d = weights[0][0].shape[0]
    widths = [kernel.shape[-1] // heads for kernel, _ in weights]
    for (kernel, _), width in zip(weights, widths, strict=True):
        if kernel.shape != (d, heads * width):
            raise ValueError(f"fused_kernel: kernel {kernel.shape} is not [{d}, {heads} heads x C]")
    kernel = jnp.concatenate(
        [k.astype(dtype).reshape(d, heads, c) for (k, _), c in zip(weights, widths, strict=True)], axis=-1
    )
    bias = lambda b, c: jnp.zeros((heads, c), dtype) if b is None else b.astype(dtype).reshape(heads, c)
    biases = [bias(b, c) for (_, b), c in zip(weights, widths, strict=True)]
    return kernel, jnp.concatenate(biases, axis=-1), widths


def fused_dense(x: jax.Array, fused: tuple[jax.Array, jax.Array, list[int]]) -> list[jax.Array]:
    """x [B, L, D] through the layers of a `fused_kernel` as ONE matmul -> [B, L, N, C_i] each, equal to the
    layers' own outputs [B, L, N * C_i] reshaped."""
    kernel, bias, widths = fused
    x = x.astype(kernel.dtype)
    y = (fp8.matmul(x, kernel) if fp8.applies(x) else jnp.einsum("bld,dnc->blnc", x, kernel)) + bias
    return jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=-1)


def _with_adapters(x: jax.Array, ys: list[jax.Array], layers: Sequence[Dense]) -> list[jax.Array]:
    """Each fused slice y [B, L, N, C] plus its Dense's LoRA adapter term (nn.linear), where it has one."""
    terms = [layer.adapter(x) for layer in layers]
    return [y if a is None else y + a.reshape(y.shape) for y, a in zip(ys, terms, strict=True)]


class JointAttention(nn.Module):
    """Names follow diffusers: to_q/k/v, norm_q/k, add_{q,k,v}_proj, norm_added_q/k, to_out_0, to_add_out.

    out=False is Flux's single-stream "pre_only" attention (no output projection), where the context tokens
    share the image tokens' projections (shared=True); context_out=False is SD3's last block
    ("context_pre_only": the context output is dropped). The streams stay apart (never concatenated outside
    the attention kernel), so that under sequence parallelism the image tokens stay sharded while a text of
    a length that does not divide the degree stays replicated (nn.ulysses).

    fused_qkv=True computes each stream's q, k and v projections as one matmul (`fused_dense`) with the same
    parameters (the tree does not change; the unfused path is the reference it is tested against). Off by
    default until a GPU measures it: it saves two reads of the activations and two launches per stream, and
    costs a per-step concatenation of the weights where they are stored in the compute dtype.
    """

    heads: int
    head_dim: int
    qk_norm: bool = True
    eps: float = 1e-6
    out: bool = True
    context_out: bool = True
    shared: bool = False
    fused_qkv: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _projections(self, names, extra: Dense | None):
        """[x [B, L, D], ...] (streams through the same weights) -> per stream ([q, k, v] each [B, L, N, K],
        extra(x) [B, L, F] or None); fused, the weights are concatenated once for all the streams."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        denses = [Dense(self.heads * self.head_dim, axes=("embed", "heads"), name=p, **kw) for p, _ in names]
        norms = [
            RMSNorm(self.eps, axis_name="head_dim", name=n, **kw) if n and self.qk_norm else None for _, n in names
        ]
        # an extra layer joins the fused matmul when its width splits over the heads (Flux's proj_mlp: 4 K each)
        joins = extra is not None and self.fused_qkv and extra.features % self.heads == 0

        def one(x: jax.Array, project) -> tuple[list[jax.Array], jax.Array | None]:
            ys = project(x)
            more = ys.pop().reshape(*x.shape[:2], extra.features) if joins else None
            if extra is not None and more is None:
                more = extra(x)
            return [y if norm is None else norm(y) for y, norm in zip(ys, norms, strict=True)], more

        def streams(xs: list[jax.Array]) -> list[tuple[list[jax.Array], jax.Array | None]]:
            if not self.fused_qkv:
                unfused = lambda x: [dense(x).reshape(*x.shape[:2], self.heads, self.head_dim) for dense in denses]
                return [one(x, unfused) for x in xs]
            layers = [*denses, extra] if joins else denses
            weights = [layer.weights(xs[0].shape[-1]) for layer in layers]
            fused = fused_kernel(weights, self.heads, self.dtype)  # once: XLA would gather it per stream (FSDP)
            return [one(x, lambda x: _with_adapters(x, fused_dense(x, fused), layers)) for x in xs]

        return streams

    def _merged(self, o: jax.Array) -> jax.Array:  # [B, L, N, K] -> [B, L, N * K]
        return o.reshape(*o.shape[:2], self.heads * self.head_dim)

    def _out(self, o: jax.Array, features: int, name: str) -> jax.Array:
        dense = Dense(features, axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense(self._merged(o))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
        extra: Dense | None = None,
    ):
        """x [B, L, D], context [B, T, D], rope cos/sin [T + L, K] (context positions first) -> x' [B, L, D]
        and context' [B, T, D] when a context is given (out=False: the attention outputs [B, *, N * K]).

        `extra`, a Dense of the caller's over the same inputs (Flux's single-block proj_mlp; BFL's `linear1` is
        [q, k, v, mlp] as one layer), joins the q/k/v matmul under fused_qkv; then the result is (the above,
        extra(x) [B, L, F] or (extra(x), extra(context)))."""
        image = self._projections(_IMAGE, extra)
        text_qkv = text_extra = None
        if context is None:
            [(image_qkv, image_extra)] = image([x])
        elif self.shared:
            (image_qkv, image_extra), (text_qkv, text_extra) = image([x, context])
        else:
            [(image_qkv, image_extra)] = image([x])
            [(text_qkv, text_extra)] = self._projections(_TEXT, extra)([context])
        if rope is not None:
            t = 0 if context is None else context.shape[1]
            # the tables' halves, replicated (small): split over `sequence` like the tokens, their rows would be
            # shifted between devices by the slices at the text/image boundary
            half = lambda a, rows: nn.with_logical_constraint(a[rows], (None, None))
            (cos, sin), text_rope = ((half(a, slice(t, None)) for a in rope), [half(a, slice(t)) for a in rope])
            image_qkv[:2] = (apply_rope(y, cos, sin) for y in image_qkv[:2])
            if text_qkv is not None:
                text_qkv[:2] = (apply_rope(y, *text_rope) for y in text_qkv[:2])
        o_text, o_image = ulysses.joint_attention(None if text_qkv is None else tuple(text_qkv), tuple(image_qkv))
        result = self._outputs(x, context, o_text, o_image)
        if extra is None:
            return result
        return result, (image_extra if context is None else (image_extra, text_extra))

    def _outputs(self, x, context, o_text, o_image):
        if not self.out:
            return self._merged(o_image) if context is None else (self._merged(o_image), self._merged(o_text))
        img = self._out(o_image, x.shape[-1], "to_out_0")
        if context is None:
            return img
        ctx = self._out(o_text, context.shape[-1], "to_add_out") if self.context_out else None
        return img, ctx
