"""FP8 matmuls for sampling: E4M3 operands with dynamic scales, one per token and one per output channel.

    y = (e4m3(x / sx) @ e4m3(W / sw)) * sx * sw,   sx = amax over each token's features / 448  [..., 1]
                                                  sw = amax over each output column / 448    [out]

(torchao's "rowwise" dynamic W8A8.) Both scales factor out of the contraction, so the dot itself is a plain
E4M3 x E4M3 `dot_general` with fp32 accumulation and the result in the compute dtype, which XLA lowers to
cuBLASLt's FP8 GEMM on Hopper; the scaling is an elementwise epilogue that XLA fuses with the bias add. Not
Flax's QDQ pattern (`Fp8DotGeneralOp`: quantise, dequantise, bf16 dot, for XLA to match): on Hopper that GEMM
has been seen to fall back to bf16 silently (shared/notes/perf-anchors.md §4), and with one scale per tensor a
token more than about 2^15 below the largest (E4M3's normal range is 2^-6 to 448) would lose its precision. A
GPU profile must confirm that the FP8 kernel runs: tools/device_check.sh, parts sample_*_fp8.

The weights stay in the compute dtype in memory and are quantised in the program at each call, so a LoRA merged
into them, sharded parameters and the checkpoint format are all unaffected. The cost, estimated: FLUX.1-dev reads
24 GB of bf16 weights and writes 12 GB of E4M3 per step, about 11 ms at an H100's 3.35 TB/s (under 2 % of a
0.7 s step), unless XLA hoists the quantisation out of the sampling loop (then once, for 12 GB more memory).

Which matmuls: every `Dense` (and fused q/k/v projection) applied to tokens ([B, L, D]) while tracing inside
`matmuls()`. The models enter it around their transformer blocks only (config field `fp8`): the patch and
text embedders, the output projection, the modulation (one row per image) and attention stay in the compute
dtype, as FP8 inference recipes keep the first and last layers in higher precision.

Sampling only: a gradient through the E4M3 casts would round the cotangents with no scaling, so
differentiating an FP8 matmul is refused at trace time (`TypeError`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
_E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
_ON = contextvars.ContextVar("fp8_matmuls", default=False)


@contextlib.contextmanager
def matmuls(on: bool = True) -> Iterator[None]:
    """Token-wise Dense matmuls traced inside are FP8 (`on`), or not (False: a no-op)."""
    token = _ON.set(bool(on))
    try:
        yield
    finally:
        _ON.reset(token)


def applies(x: jax.Array) -> bool:
    """Whether a Dense over `x` computes in FP8 here: inside `matmuls()`, for token-wise inputs [B, L, D]."""
    return _ON.get() and x.ndim >= 3


def quantize(a: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(E4M3 values, float32 scales) with a = values * scales; one scale per slice along `axis` (kept as size 1)."""
    a = a.astype(jnp.float32)
    amax = jnp.max(jnp.abs(a), axis=axis, keepdims=True)
    # floored at the smallest normal float32 (XLA flushes subnormals to zero): an all-zero slice stays zero
    scale = jnp.maximum(amax / _E4M3_MAX, jnp.finfo(jnp.float32).tiny)
    return jnp.clip(a / scale, -_E4M3_MAX, _E4M3_MAX).astype(E4M3), scale


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., D] @ kernel [D, *out] -> [..., *out] in x's dtype, through E4M3 with per-token and per-output-
    channel scales (see the module docstring)."""
    d, out = kernel.shape[0], kernel.shape[1:]
    qx, sx = quantize(x, axis=-1)  # [..., D], [..., 1]
    qw, sw = quantize(kernel.reshape(d, math.prod(out)), axis=0)  # [D, O], [1, O]
    y = jax.lax.dot_general(qx, qw, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=x.dtype)
    y = (y.astype(jnp.float32) * sx * sw).astype(x.dtype)
    return y.reshape(*x.shape[:-1], *out)


def _forward(x, kernel):
    return matmul(x, kernel), None


def _backward(_, g):
    raise TypeError(
        "FP8 matmuls are for sampling: a gradient through them would round the cotangents to E4M3 unscaled. "
        "Train with the model config's fp8=False."
    )


matmul.defvjp(_forward, _backward)
