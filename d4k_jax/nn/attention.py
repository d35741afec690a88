"""The one attention entry point of d4k_jax: every model calls `dot_product_attention`.

It picks the kernel for the backend so that no model hard-codes one:
  - "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bf16/fp16,
    head dim <= 128, no bias); odd lengths are padded to even ones, exactly (`even_lengths`: jax refuses odd
    lengths under jax.grad);
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
from collections.abc import Callable, Iterator
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
        return even_lengths(functools.partial(_cudnn_attention, scale=scale), q, k, v, mask)
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


def _cudnn_attention(q, k, v, mask, key_value_seq_lengths, *, scale):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, key_value_seq_lengths=key_value_seq_lengths, implementation="cudnn"
    )


# jax's cuDNN attention (0.10.2) rejects an odd q or kv length when differentiated, at trace time
# ("NotImplementedError: Unsupported sequence length Q 16461, KV 16461."): its custom_vjp forward rule checks
# `bias is not None` where the missing bias is a size-0 placeholder, so the "even lengths with a bias in training"
# rule always applies. Flux at 77 T5 tokens (16,384 + 77 = 16,461) and SD3 at 77 + 256 (16,717) would not train.
# The padding is exact, and NaN-free in the backward:
#   - k and v get one zero row, masked out: by cuDNN's padding mask (key_value_seq_lengths = the real length;
#     queries stay unmasked), or, with a dense mask, by a False column (one mask path, not both at once);
#   - q gets one zero row that attends normally (uniform softmax over the real keys: finite O and statistics) and
#     whose output is sliced off. Its cotangent is exactly 0, so dP = do·vᵀ = 0, delta = Σ o·do = 0 and
#     dS = P (dP - delta) = 0: it adds exact zeros to dk, dv, and its dq row is dropped by the pad's transpose.
#     Masking that row with query_seq_lengths instead would rely on what cuDNN writes into the O and statistics of
#     rows past the length (undocumented: -inf or unwritten statistics make P inf/NaN, and NaN · 0 is NaN in dk/dv);
#     an edge copy of a real row would be exact too, but routes the pad row's dq (0) into a real row.
# Also applied without a gradient (the trace cannot tell): sampling at odd lengths costs one token and the padding
# mask. Inside the Ulysses shard_map each device pads its whole sequences (the lengths are the global ones). Under
# the "save_attention" remat policy cuDNN's saved outputs are the padded O [B, L+1, N, K] and statistics.
def even_lengths(
    kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """`kernel(q, k, v, mask, key_value_seq_lengths) -> out` (a dot_product_attention taking lengths [B] int32
    that mask keys at and past them, or None) run at even q and kv lengths: q [B, L, N, K], k and v [B, S, N, K],
    mask None or [..., L, S] (True = attend) -> [B, L, N, K], equal to the kernel at the unpadded lengths."""
    length, keys = q.shape[1], k.shape[1]
    pad_q, pad_kv = length % 2, keys % 2
    if not (pad_q or pad_kv):
        return kernel(q, k, v, mask, None)
    rows = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    q, k, v = rows(q, pad_q), rows(k, pad_kv), rows(v, pad_kv)
    lengths = None
    if mask is not None:
        if mask.shape[-2:] != (length, keys):
            raise ValueError(f"even_lengths expects a mask [..., {length}, {keys}] (True = attend); got {mask.shape}")
        edges = lambda axis, n: [(0, 0)] * (mask.ndim - 2 + axis) + [(0, n)] + [(0, 0)] * (1 - axis)
        mask = jnp.pad(mask, edges(0, pad_q), constant_values=True)
        mask = jnp.pad(mask, edges(1, pad_kv), constant_values=False)
    elif pad_kv:
        lengths = jnp.full((q.shape[0],), keys, jnp.int32)
    return kernel(q, k, v, mask, lengths)[:, :length]


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
