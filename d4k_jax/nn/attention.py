"""The one attention entry point of d4k_jax: every model calls `dot_product_attention`.

It picks the kernel for the backend so that no model hard-codes one:
  - "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16,
    head dim <= 128, no bias);
  - "chunked": exact softmax attention over query chunks, so the score matrix never exceeds
    [B, N, chunk, S]; used for long sequences wherever cuDNN does not apply (the VAE mid-block
    attention has one head of width 512 and 65,536 tokens at 4096² with the F16 VAE);
  - "splash": TPU splash attention (`nn/splash.py`), on TPU for every float32/bfloat16 attention without a
    bias or mask; asked for explicitly it runs anywhere (in the Pallas interpreter off TPU);
  - "mgpu": jax's Pallas Mosaic-GPU FlashAttention-3 kernel (`nn/mgpu_attention.py`: padded to its tiles with
    exact corrections; Hopper, bf16/fp16, head dim 64 or 128, no bias or mask). Not the default: the environment
    variable D4K_ATTENTION=mgpu makes it the GPU's flash kernel wherever it takes the inputs ("cudnn" elsewhere),
    read when a program is traced, so it also holds inside the Ulysses shard_map and for any CLI or benchmark;
  - "xla": the plain XLA form, for short sequences (text encoders) and masks/biases.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from d4k_jax.nn import mgpu_attention, splash

Implementation = Literal["cudnn", "mgpu", "splash", "chunked", "xla"]

# Above this many score elements per (batch, head) the chunked form is used instead of "xla".
_CHUNK_THRESHOLD = 4096 * 4096
_CUDNN_MAX_HEAD_DIM = 128
_GPU_FLASH_ENV = "D4K_ATTENTION"  # which flash kernel the GPU default uses: "cudnn" (unset) or "mgpu"
# The checkpoint name of what the remat policy "save_attention" (nn/stack.py) keeps of each attention.
ATTENTION_OUT = "attention_out"
_FORCED: contextvars.ContextVar[Implementation | None] = contextvars.ContextVar("attention", default=None)


@contextlib.contextmanager
def forced(implementation: Implementation) -> Iterator[None]:
    """Every attention traced inside uses `implementation` (FLOP counting traces the plain "xla" form, whose
    matmuls are visible, where the backend would pick an opaque kernel)."""
    token = _FORCED.set(implementation)
    try:
        yield
    finally:
        _FORCED.reset(token)


def choose_implementation(q: jax.Array, k: jax.Array, *, has_bias: bool, has_mask: bool) -> Implementation:
    """Which kernel `dot_product_attention` uses for these shapes on the default backend."""
    if (impl := _FORCED.get()) is not None:
        return impl
    backend = jax.default_backend()
    head_dim = q.shape[-1]
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim <= _CUDNN_MAX_HEAD_DIM and not has_bias:
        if _gpu_flash() == "mgpu" and not mgpu_attention.problems(q, has_bias=has_bias, has_mask=has_mask):
            return "mgpu"
        return "cudnn"
    if backend == "tpu" and q.dtype in splash.DTYPES and not (has_bias or has_mask):
        return "splash"
    if not (has_bias or has_mask) and q.shape[1] * k.shape[1] > _CHUNK_THRESHOLD:
        return "chunked"
    return "xla"


def _gpu_flash() -> str:
    choice = os.environ.get(_GPU_FLASH_ENV) or "cudnn"
    if choice not in ("cudnn", "mgpu"):
        raise ValueError(f"{_GPU_FLASH_ENV}={choice!r}: expected 'cudnn' or 'mgpu' (or unset)")
    return choice


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: Implementation | None = None,
    chunk_size: int = 1024,
) -> jax.Array:
    """Softmax attention. q [B, L, N, K], k and v [B, S, N, K] -> [B, L, N, K].

    `bias` is added to the scores and `mask` (True = attend) selects keys; both broadcast to
    [B, N, L, S]. `scale` defaults to 1/sqrt(K). Softmax is computed in float32 (float64 for float64 inputs).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[::2] != k.shape[::2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q [B, L, N, K] and k, v [B, S, N, K]; got {q.shape}, {k.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = implementation or choose_implementation(q, k, has_bias=bias is not None, has_mask=mask is not None)
    # Each kernel exposes its residuals to "save_attention" once: cuDNN's are matched by their primitive (a name on
    # its O would save O twice), splash names its O and logsumexp itself; the XLA forms' O is named here.
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if impl == "mgpu":
        if found := mgpu_attention.problems(q, has_bias=bias is not None, has_mask=mask is not None):
            raise ValueError(f"the mgpu attention cannot take {'; '.join(found)}")
        return mgpu_attention.attention(q, k, v, scale, mgpu_attention.gpu_kernel(q.shape[-1]), ATTENTION_OUT)
    if impl == "splash":
        if bias is not None or mask is not None:
            raise ValueError("the splash attention takes no bias or mask; use implementation='xla'")
        return splash.splash_attention(q, k, v, scale, residual_name=ATTENTION_OUT)
    if impl == "chunked":
        if bias is not None or mask is not None:
            raise ValueError("the chunked attention takes no bias or mask; use implementation='xla'")
        return checkpoint_name(_chunked_attention(q, k, v, scale, chunk_size), ATTENTION_OUT)
    return checkpoint_name(_xla_attention(q, k, v, bias, mask, scale), ATTENTION_OUT)


def _xla_attention(q, k, v, bias, mask, scale):
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("blnk,bsnk->bnls", q, k, preferred_element_type=acc) * scale
    if bias is not None:
        scores = scores + bias.astype(acc)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnls,bsnk->blnk", probs, v)


def _chunked_attention(q, k, v, scale, chunk_size):
    b, length, n, d = q.shape
    chunk = min(chunk_size, length)
    pad = -length % chunk
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    chunks = q.reshape(b, -1, chunk, n, d).swapaxes(0, 1)  # [C, B, chunk, N, K]

    # Recomputed in the backward pass, so gradients also never hold more than one chunk of scores.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(q_chunk):
        return _xla_attention(q_chunk, k, v, None, None, scale)

    out = jax.lax.map(one, chunks)  # [C, B, chunk, N, K]
    return out.swapaxes(0, 1).reshape(b, -1, n, d)[:, :length]
