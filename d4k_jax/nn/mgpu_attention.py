"""FlashAttention-3-style Pallas Mosaic-GPU attention (jax's `attention_mgpu`) for any length, [B, L, N, K] layout.

The kernel's contract, read from its source (jax 0.10.2, `jax/experimental/pallas/ops/gpu/attention_mgpu.py`):
  - forward (q, k, v) -> (out, lse): logits are q·k with NO scale and NO mask; lse [B, N, L] float32 is in log2
    units, lse = log2 Σ_j exp(q·k_j); Hopper (sm_90a) only;
  - float16 only in practice: its shared-memory buffers are declared float16, so bfloat16 inputs fail to lower
    ("Mixed input dtypes for matrix multiplication unsupported: lhs=bfloat16, rhs=float16");
  - q length a multiple of 2·block_q (forward) and of compute_wgs·block_q_dq and block_q_dkv (backward); kv
    length a multiple of block_kv, compute_wgs·block_kv_dkv and block_kv_dq; head dim a multiple of 64;
  - backward from residuals (q, k, v, out, lse, do) -> (dq, dk, dv): P = exp2(q·k·log2 e - lse),
    delta = Σ_K out·do, dS = P (do·v - delta), dq = dS k, dk = dSᵀ q, dv = Pᵀ do.

`attention` makes that kernel exact for any lengths and scale, with bf16 or fp16 inputs:
  - the scale is folded into q in float32 before the cast to float16 (an 11-bit significand, finer than bf16's q);
  - q is padded with zero rows (their outputs are dropped; their cotangents are zero, so they add nothing to dk/dv);
  - k is padded with copies of the mean real key k̄ (per batch and head) and v with zeros. Padded keys add
    n·exp(s̄_i) to each row's normaliser, where s̄_i = q_i·k̄ is the row's MEAN real logit, so by Jensen
    n·exp(s̄_i) <= (n / S)·Z_i (Z_i = Σ_real exp(s_ij)): the kernel's normaliser is Z_i (1 + r') with
    r' <= n / S (< 1 % at SD3's 16,717 tokens), whatever the logits. The correction
    O = O_pad / (1 - r), r = n·exp2(s̄_i·log2 e - lse_pad) <= n / (S + n), and lse = lse_pad + log2(1 - r)
    therefore never cancels. (Zero keys, logit 0, would give r = n / (Z_i + n): when every logit of a row is
    very negative, Z_i << n and 1 - r loses all its digits; the tests build such a row.)
  - the backward calls the kernel's backward with the true (O, lse): P is then the true probability for real
    keys, so dk, dv of real keys are exact; padded keys get P = exp(s̄_i)/Z_i and dS = -P·delta (v = 0), which
    adds -n·P·delta·k̄ to dq: added back exactly. Their own dk, dv are dropped;
  - the cotangent is scaled per (batch, head) by a power of two to a max |do| in [0.5, 1) before its cast to
    float16 (bf16 training cotangents can sit far below float16's 6e-8 least subnormal) and the gradients
    unscaled in float32. Headroom above: |dv_j| <= Σ_i P_ij·max|do| < L, far inside float16's 65,504 at 16k
    tokens; dq and dk carry a further factor of about |v|·|k| or |v|·|q| (fine unless activations are huge).
Inputs beyond float16's range (|q·scale|, |k|, |v| > 65,504) overflow to inf (and NaN outputs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

LOG2E = math.log2(math.e)
DTYPES = (jnp.bfloat16, jnp.float16)  # what `attention` takes with the Mosaic kernel (it computes in float16)
# TuningConfig fields per head dim: forward (block_q, block_kv, max_concurrent_steps), backward blocks as in jax's
# own backward tests. Both fit the 227 KB of shared memory (checked by lowering on the CPU, tests); not yet tuned
# on a GPU (tools/attention_bench.py --mgpu-config sweeps).
TUNING: dict[int, dict[str, int]] = {
    64: dict(block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dq=64, block_kv_dq=128, block_q_dkv=128,
             block_kv_dkv=64, compute_wgs_bwd=2),
    128: dict(block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dq=64, block_kv_dq=128, block_q_dkv=128,
              block_kv_dkv=64, compute_wgs_bwd=2),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An attention kernel with the Mosaic kernel's contract (module docstring): `forward(q, k, v) -> (out, lse)`,
    `backward(q, k, v, out, lse, do) -> (dq, dk, dv)`, on [B, L, N, K] arrays of `dtype` whose lengths are
    multiples of `q_multiple` (q) and `kv_multiple` (k, v)."""

    forward: Callable
    backward: Callable
    q_multiple: int
    kv_multiple: int
    dtype: jnp.dtype


def problems(q: jax.Array, *, has_bias: bool, has_mask: bool) -> list[str]:
    """Why the Mosaic kernel cannot take these inputs; [] when it can."""
    found = []
    if q.dtype not in DTYPES:
        found.append(f"dtype {q.dtype} (expected bfloat16 or float16)")
    if q.shape[-1] not in TUNING:
        found.append(f"head dim {q.shape[-1]} (expected one of {sorted(TUNING)})")
    if has_bias or has_mask:
        found.append("a bias or mask (the kernel takes none; use implementation='xla')")
    return found


@functools.cache
def mosaic_kernel(head_dim: int, config=None) -> Kernel:
    """jax's Mosaic-GPU FlashAttention-3 kernel with the TuningConfig for `head_dim` (or `config`). Lowers anywhere
    (ahead of time for CUDA); runs only on an sm_90a GPU."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    if not hasattr(mgpu, "_attention_bwd"):  # the backward from residuals is private: name the break if it moves
        raise NotImplementedError(f"jax {jax.__version__}'s attention_mgpu has no _attention_bwd(config, _, res, do)")
    config = config or mgpu.TuningConfig(**TUNING[head_dim])
    wgs = config.compute_wgs_bwd
    q_multiple = math.lcm(2 * config.block_q, wgs * config.block_q_dq, config.block_q_dkv)
    kv_multiple = math.lcm(config.block_kv, wgs * config.block_kv_dkv, config.block_kv_dq)

    def forward(q, k, v):
        out, (lse,) = mgpu.attention(q, k, v, config, save_residuals=True)
        return out, lse

    def backward(q, k, v, out, lse, do):
        return mgpu._attention_bwd(config, False, (q, k, v, out, lse), do)

    return Kernel(forward, backward, q_multiple, kv_multiple, jnp.dtype(jnp.float16))


def gpu_kernel(head_dim: int) -> Kernel:
    """The Mosaic kernel for this machine, or an error that says why it cannot run here."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability != "9.0":
        raise ValueError(
            f"the mgpu attention needs an sm_90 (Hopper) GPU; the device is {device.device_kind} "
            f"(platform {device.platform}, compute capability {capability}); use implementation='cudnn'"
        )
    return mosaic_kernel(head_dim)


def reference_kernel(q_multiple: int = 1, kv_multiple: int = 1, dtype=jnp.float32) -> Kernel:
    """The Mosaic kernel's contract in plain jnp (float32 arithmetic on `dtype` inputs): the stand-in that tests
    the padding and its corrections on the CPU, and that `tools/attention_bench.py --dry` runs."""

    def logits2(q, k):  # [B, N, L, S], log2 units
        return jnp.einsum("blnk,bsnk->bnls", q, k, preferred_element_type=jnp.float32) * LOG2E

    def check(q, k):
        if q.shape[1] % q_multiple or k.shape[1] % kv_multiple:
            raise ValueError(f"lengths {q.shape[1]}, {k.shape[1]} must be multiples of {q_multiple}, {kv_multiple}")

    def forward(q, k, v):
        check(q, k)
        s = logits2(q, k)
        m = s.max(-1, keepdims=True)
        lse = m[..., 0] + jnp.log2(jnp.exp2(s - m).sum(-1))
        p = jnp.exp2(s - lse[..., None])
        return jnp.einsum("bnls,bsnk->blnk", p, v.astype(jnp.float32)).astype(q.dtype), lse

    def backward(q, k, v, out, lse, do):
        check(q, k)
        f32 = lambda x: x.astype(jnp.float32)
        delta = jnp.einsum("blnk,blnk->bnl", f32(out), f32(do))
        p = jnp.exp2(logits2(q, k) - lse[..., None])
        ds = p * (jnp.einsum("blnk,bsnk->bnls", f32(do), f32(v)) - delta[..., None])
        dq = jnp.einsum("bnls,bsnk->blnk", ds, f32(k))
        dk = jnp.einsum("bnls,blnk->bsnk", ds, f32(q))
        dv = jnp.einsum("bnls,blnk->bsnk", p, f32(do))
        return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)

    return Kernel(forward, backward, q_multiple, kv_multiple, jnp.dtype(dtype))


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, kernel: Kernel, residual_name: str | None = None
) -> jax.Array:
    """Exact softmax attention through `kernel` at any lengths: q [B, L, N, K], k, v [B, S, N, K] -> [B, L, N, K]
    in q's dtype (module docstring: the padding and its corrections). `residual_name` names the kernel's
    output and log-sum-exp residuals for remat policies (nn/stack.py's "save_attention")."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"the mgpu attention expects q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    return _attention(kernel, float(scale), k.shape[1], residual_name, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attention(kernel, scale, kv_length, name, q, k, v):
    return _forward(kernel, scale, kv_length, name, q, k, v)[0]


def _forward(kernel: Kernel, scale: float, kv_length: int, name: str | None, q, k, v):
    length = q.shape[1]
    n_pad = -kv_length % kernel.kv_multiple
    f32 = lambda x: x.astype(jnp.float32)
    qp = _pad((f32(q) * scale).astype(kernel.dtype), -length % kernel.q_multiple)  # [B, Lp, N, K]
    kp, vp = k.astype(kernel.dtype), _pad(v.astype(kernel.dtype), n_pad)  # [B, Sp, N, K]
    k_mean = s_mean = None
    if n_pad:  # the mean of the keys the kernel sees, in its dtype (the bound holds for what it computes)
        k_mean = f32(kp).mean(axis=1, keepdims=True).astype(kernel.dtype)  # [B, 1, N, K]
        kp = jnp.concatenate([kp, jnp.broadcast_to(k_mean, (kp.shape[0], n_pad, *kp.shape[2:]))], axis=1)
        s_mean = jnp.einsum("blnk,bnk->bnl", f32(qp), f32(k_mean[:, 0])) * LOG2E  # [B, N, Lp], log2 units
    out, lse = kernel.forward(qp, kp, vp)  # [B, Lp, N, K], [B, N, Lp]
    out = f32(out)
    if n_pad:
        r = n_pad * jnp.exp2(s_mean - lse)  # the padded keys' share of the normaliser, <= n_pad / (S + n_pad)
        lse = lse + jnp.log1p(-r) / math.log(2)
        out = out / (1 - r).transpose(0, 2, 1)[..., None]
    out = out.astype(kernel.dtype)
    if name:  # what a remat policy saving `name` keeps: the backward then reruns only casts and pads
        out, lse = checkpoint_name(out, name), checkpoint_name(lse, name)
    return out[:, :length].astype(q.dtype), (qp, kp, vp, out, lse, k_mean, s_mean)


def _fwd(kernel, scale, kv_length, name, q, k, v):
    return _forward(kernel, scale, kv_length, name, q, k, v)


def _bwd(kernel, scale, kv_length, name, residuals, do):
    qp, kp, vp, out, lse, k_mean, s_mean = residuals
    do32 = do.astype(jnp.float32)
    # a power of two per (batch, head) that brings max |do| into [0.5, 1): exact to apply and to undo
    _, exponent = jnp.frexp(jnp.abs(do32).max(axis=(1, 3), keepdims=True))  # [B, 1, N, 1]
    gain = jnp.ldexp(jnp.float32(1), -exponent)
    dop = _pad((do32 * gain).astype(kernel.dtype), qp.shape[1] - do.shape[1])
    dq, dk, dv = (x.astype(jnp.float32) for x in kernel.backward(qp, kp, vp, out, lse, dop))
    if k_mean is not None:  # the padded keys' part of dq, -n·P·delta·k̄ per row, added back
        delta = jnp.einsum("blnk,blnk->bnl", out.astype(jnp.float32), dop.astype(jnp.float32))
        weight = (kp.shape[1] - kv_length) * jnp.exp2(s_mean - lse) * delta  # [B, N, Lp]
        dq = dq + weight.transpose(0, 2, 1)[..., None] * k_mean.astype(jnp.float32)
    length, dtype = do.shape[1], do.dtype
    dq = dq[:, :length] * (scale / gain)
    return dq.astype(dtype), (dk[:, :kv_length] / gain).astype(dtype), (dv[:, :kv_length] / gain).astype(dtype)


_attention.defvjp(_fwd, _bwd)


def _pad(x: jax.Array, rows: int) -> jax.Array:  # zero rows at the end of the token axis
    return jnp.pad(x, ((0, 0), (0, rows), (0, 0), (0, 0))) if rows else x
