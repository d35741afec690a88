"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind d4k_jax's attention layout.

`splash_attention(q, k, v, scale)` takes q [B, L, N, K], k and v [B, S, N, K] like `dot_product_attention` and
returns [B, L, N, K]. What it does around the kernel, and why:
  - layout: splash takes one batch element as [N, L, K]; the heads go first and the kernel is vmapped over B;
  - scale: splash does not scale the scores, so q is multiplied by `scale` (in float32, then cast back) first;
  - lengths: the kernel tiles L and S in blocks that are multiples of 128 and needs the lengths to be multiples
    of its blocks. L and S are zero-padded up to them, and the padded keys are masked with segment ids: real keys
    get id 1, padded keys id 0, and every query (padded ones too) id 1. So every query row, padded or not, sees at
    least one real key and is a valid softmax; a padded query row's output is sliced off, its cotangent is zero
    and it adds nothing to dk or dv. (Ids "pad q = pad kv = 0" would leave the padded queries with no key when
    only L needs padding.) When S needs no padding no segment ids are passed at all;
  - blocks: one block per sequence when the padded length fits in `max_block` (so short sequences pay at most
    127 padded rows), otherwise blocks of `max_block` (512; 256 for head dims above 256, to keep a block's
    q, k, v and accumulators inside TPU VMEM); the backward kernels use the same blocks;
  - interpret mode: on any backend but TPU the Pallas kernel runs in the Pallas interpreter, so the CPU tests
    execute the very kernel a TPU compiles (slowly: seconds per call);
  - dtypes: float32 and bfloat16 (the kernel accumulates in float32 and returns q's dtype).

Head dim. The JAX 0.10.2 kernel has no head-dim check left: jax#26676 let q/k head dims be any size (Mosaic pads
the VMEM tiles) and the per-lane `tile(...)[..., :head_dim_v]` in `flash_attention_kernel` replaced the former
"head_dim_v should be a multiple of 128" error that jax#30861 reports. Forward and backward lower to Mosaic for TPU with
D=64 unpadded (tests/test_splash.py lowers them on the CPU), but libtpu's compile and a run of D=64 on a real
TPU are not verified (no TPU here). On TPU K is therefore zero-padded up to a multiple of 128 by default, as
MaxDiffusion does for D<128: it is exact (zero columns add nothing to q·k, and v's zero columns give output
columns that are sliced off); it at most doubles the kernel's matmul work (not at all if Mosaic already fills a
64-deep contraction up to the 128-wide MXU; not measured), and the padded q, k, v, o copies cost O(L·K) HBM
traffic against the kernel's O(L·S·K) compute.
`pad_head_dim=False` turns it off once D=64 is measured on hardware. The CPU interpreter needs no padding; the
tests run both ways.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LANES = 128  # the kernel's NUM_LANES: every block size is a multiple of it
DTYPES = (jnp.float32, jnp.bfloat16)
_MAX_BLOCK = 512
_WIDE_HEAD_MAX_BLOCK = 256  # head dims above 256 (the VAE's 512-wide single head)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_and_padded_length(length: int, max_block: int) -> tuple[int, int]:
    """(block size, padded length) for a sequence of `length`: one block if it fits in `max_block`."""
    if max_block % LANES or max_block <= 0:
        raise ValueError(f"max_block must be a positive multiple of {LANES}; got {max_block}")
    padded = _round_up(length, LANES)
    if padded <= max_block:
        return padded, padded
    return max_block, _round_up(length, max_block)


def _make_kernel(
    heads: int, shape: tuple[int, int], blocks: tuple[int, int], interpret: bool, residual_name: str | None = None
):
    """The splash kernel for `heads` heads over a full [padded L, padded S] mask, with the same blocks forward
    and backward, its backward's residuals O and logsumexp named `residual_name` (for a remat policy)."""
    # Imported here: Pallas' TPU ops add a quarter second to every process that imports the attention dispatch.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    block_q, block_kv = blocks
    block_sizes = kernel_lib.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask(shape)] * heads)
    return kernel_lib.make_splash_mha(
        mask,
        head_shards=1,
        q_seq_shards=1,
        block_sizes=block_sizes,
        save_residuals=False,
        residual_checkpoint_name=residual_name,
        interpret=interpret,
    )


def _key_padding_ids(padded_q: int, kv_length: int, padded_kv: int):
    """Segment ids that mask the padded keys: every query id 1, real keys 1, padded keys 0."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    kv_ids = (jnp.arange(padded_kv) < kv_length).astype(jnp.int32)
    return SegmentIds(q=jnp.ones((padded_q,), jnp.int32), kv=kv_ids)


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    *,
    max_block: int | None = None,
    pad_head_dim: bool | None = None,
    interpret: bool | None = None,
    residual_name: str | None = None,
) -> jax.Array:
    """Softmax attention through the splash kernel. q [B, L, N, K], k and v [B, S, N, K] -> [B, L, N, K].

    `max_block` defaults to 512 (256 for K > 256); `pad_head_dim` (K up to a multiple of 128) and `interpret`
    (the Pallas interpreter) default to "on TPU" and "not on TPU". `residual_name` names the kernel's residuals for
    the backward (O and the logsumexp, padded [B, N, L', K'] and [B, N, L']) with `jax.ad_checkpoint.checkpoint_name`.
    """
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"splash attention takes float32 or bfloat16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    on_tpu = jax.default_backend() == "tpu"
    interpret = not on_tpu if interpret is None else interpret
    pad_head_dim = on_tpu if pad_head_dim is None else pad_head_dim
    head_dim = q.shape[-1]
    if max_block is None:
        max_block = _WIDE_HEAD_MAX_BLOCK if head_dim > 256 else _MAX_BLOCK
    length, kv_length = q.shape[1], k.shape[1]
    block_q, padded_q = block_and_padded_length(length, max_block)
    block_kv, padded_kv = block_and_padded_length(kv_length, max_block)
    padded_dim = _round_up(head_dim, LANES) if pad_head_dim else head_dim

    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    # [B, L, N, K] -> [B, N, L, K], then zero padding of the sequence and head axes.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    q = _pad(_pad(q, 2, padded_q), 3, padded_dim)
    k = _pad(_pad(k, 2, padded_kv), 3, padded_dim)
    v = _pad(_pad(v, 2, padded_kv), 3, padded_dim)

    kernel = _make_kernel(q.shape[1], (padded_q, padded_kv), (block_q, block_kv), interpret, residual_name)
    segment_ids = _key_padding_ids(padded_q, kv_length, padded_kv) if padded_kv != kv_length else None
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segment_ids)  # [B, N, L', K']
    return jnp.swapaxes(out[:, :, :length, :head_dim], 1, 2)
