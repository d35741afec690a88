"""The Mosaic-GPU attention wrapper (nn/mgpu_attention.py): its padding and corrections are exact, checked on the
CPU through a plain-jnp stand-in with the kernel's contract; the real kernel lowers for CUDA at our tiles; the
dispatch refuses what the kernel cannot take and D4K_ATTENTION=mgpu selects it, inside Ulysses too."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER_TOL, rel_err

from d4k_jax import sharding
from d4k_jax.nn import attention, mgpu_attention, ulysses


def _qkv(lq, lk, n=3, d=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(2, length, n, d)), dtype) for length in (lq, lk, lk)]


def _value_and_grads(fn, q, k, v, cotangent):
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return jax.jit(run)(q, k, v, cotangent)


def _adversarial(lq, lk, d=16):
    """Every logit of every row far below zero (keys along u, queries against it; -21 to -35 after the 1/4 scale):
    the real keys' normaliser is ~1e-11, so keys padded with zeros (logit 0) would swamp it and leave nothing
    after the correction (rel. error 1.0 here; 1.5e-3 already at logits of -7)."""
    rng = np.random.default_rng(3)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    noise = lambda length: 0.3 * rng.normal(size=(2, length, 3, d))
    q = -30 * u + noise(lq)
    k = 4 * u + noise(lk)
    return [jnp.asarray(x, jnp.float32) for x in (q, k, rng.normal(size=(2, lk, 3, d)))]


# (q length, kv length, scale, adversarial): 77 + 64 pads both to the stand-in's 32-token tiles, 128 pads nothing
CASES = [(141, 141, None, False), (128, 128, None, False), (141, 96, 0.3, False), (64, 141, None, True)]


@pytest.mark.parametrize(("lq", "lk", "scale", "adversarial"), CASES)
def test_padded_kernel_equals_xla(lq, lk, scale, adversarial):
    q, k, v = _adversarial(lq, lk) if adversarial else _qkv(lq, lk)
    kernel = mgpu_attention.reference_kernel(q_multiple=32, kv_multiple=32)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    ours = _value_and_grads(lambda *a: mgpu_attention.attention(*a, s, kernel), q, k, v, cotangent)
    xla = lambda *a: attention.dot_product_attention(*a, scale=scale, implementation="xla")
    want = _value_and_grads(xla, q, k, v, cotangent)
    for got, ref in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        assert rel_err(got, ref) < LAYER_TOL


def test_small_cotangents_survive_float16():
    """bf16 training cotangents sit far below float16's range (6e-8 the least subnormal); the per-head power-of-two
    gain keeps the gradients (without it they are all 0). bf16 in and out and float16 inside, so bf16's tolerance."""
    q, k, v = _qkv(40, 40, d=64, dtype=jnp.bfloat16)
    kernel = mgpu_attention.reference_kernel(q_multiple=32, kv_multiple=32, dtype=jnp.float16)
    cotangent = 1e-9 * jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.bfloat16)
    _, grads = _value_and_grads(lambda *a: mgpu_attention.attention(*a, 0.125, kernel), q, k, v, cotangent)
    up = lambda x: x.astype(jnp.float32)
    xla = lambda *a: attention.dot_product_attention(*a, implementation="xla")
    _, want = _value_and_grads(xla, up(q), up(k), up(v), up(cotangent))
    for got, ref in zip(grads, want, strict=True):
        assert rel_err(got, ref) < 1e-2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_real_kernel_lowers_for_cuda_at_our_tiles(head_dim, monkeypatch):
    """Forward and gradients through the Mosaic kernel lower ahead of time for CUDA on the CPU: the padded lengths
    fit its tiles, its float16 dtype, and each kernel's shared memory fits the 227 KB it assumes without a GPU."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    stub = types.SimpleNamespace(cuda_runtime_get_version=lambda: 12090)  # no CUDA runtime here to ask
    monkeypatch.setattr(attention_mgpu, "cuda_versions", stub)
    kernel = mgpu_attention.mosaic_kernel(head_dim)
    assert (kernel.q_multiple, kernel.kv_multiple) == (128, 128)
    x = jax.ShapeDtypeStruct((1, 141, 2, head_dim), jnp.bfloat16)
    loss = lambda q, k, v: mgpu_attention.attention(q, k, v, 0.1, kernel).astype(jnp.float32).sum()
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",))


def test_the_dispatch_refuses_what_the_kernel_cannot_take():
    q, k, v = _qkv(8, 8, d=64)
    with pytest.raises(ValueError, match="dtype float32 \\(expected bfloat16 or float16\\)"):
        attention.dot_product_attention(q, k, v, implementation="mgpu")
    q80 = jnp.zeros((1, 8, 2, 80), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dim 80 \\(expected one of \\[64, 128\\]\\)"):
        attention.dot_product_attention(q80, q80, q80, implementation="mgpu")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="a bias or mask"):
        attention.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 1, 8), bool), implementation="mgpu")
    with pytest.raises(ValueError, match="needs an sm_90 \\(Hopper\\) GPU; the device is cpu"):
        attention.dot_product_attention(q, k, v, implementation="mgpu")


def test_the_environment_selects_mgpu_inside_ulysses_too(monkeypatch):
    """D4K_ATTENTION=mgpu on a (pretend) GPU: the dispatch picks the kernel where it applies and cuDNN elsewhere,
    and Ulysses' shard_map body (sequence 2: each device attends with half the heads) runs it."""
    calls = []
    stand_in = mgpu_attention.reference_kernel(q_multiple=32, kv_multiple=32)
    spy = dict(forward=lambda *a: calls.append(a[0].shape) or stand_in.forward(*a))
    monkeypatch.setattr(mgpu_attention, "gpu_kernel", lambda d: mgpu_attention.Kernel(**{**vars(stand_in), **spy}))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    choose = lambda q, **kw: attention.choose_implementation(q, q, **{"has_bias": False, "has_mask": False, **kw})
    bf16 = jax.ShapeDtypeStruct((1, 8, 4, 64), jnp.bfloat16)
    assert choose(bf16) == "cudnn"  # unset: cuDNN stays the default
    monkeypatch.setenv("D4K_ATTENTION", "mgpu")
    assert choose(bf16) == "mgpu"
    assert choose(bf16, has_mask=True) == "cudnn"  # the kernel takes no mask
    assert choose(jax.ShapeDtypeStruct((1, 8, 4, 96), jnp.bfloat16)) == "cudnn"  # nor head dim 96
    text, image = ([x.astype(jnp.bfloat16) for x in _qkv(length, length, n=4, d=64)] for length in (7, 16))
    with sharding.active(sharding.make_mesh({"sequence": 2}, jax.devices()[:2])):
        _, got = jax.jit(ulysses.joint_attention)(text, image)
    assert calls == [(2, 32, 2, 64)]  # 7 + 16 tokens padded to 32, 4 heads over 2 devices
    up = lambda xs: [x.astype(jnp.float32) for x in xs]
    joint = (jnp.concatenate(pair, 1) for pair in zip(up(text), up(image), strict=True))
    want = attention.dot_product_attention(*joint)[:, 7:]
    assert rel_err(got, want) < 2**-8  # the output is rounded to bfloat16: at most half an ulp, 2^-8 relative
    monkeypatch.setenv("D4K_ATTENTION", "flash")
    with pytest.raises(ValueError, match="D4K_ATTENTION='flash': expected 'cudnn' or 'mgpu'"):
        choose(bf16)


@pytest.mark.accelerator
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_real_kernel_equals_xla_on_a_gpu(head_dim):
    """On a Hopper GPU: the Mosaic kernel at a padded length equals XLA's attention of the same bf16 inputs."""
    device = jax.devices()[0]
    if getattr(device, "compute_capability", None) != "9.0":
        pytest.skip(f"needs an sm_90 GPU, not {device.device_kind}")
    q, k, v = _qkv(1000, 1000, n=2, d=head_dim, dtype=jnp.bfloat16)
    cotangent = _qkv(1000, 1000, n=2, d=head_dim, seed=1, dtype=jnp.bfloat16)[0]
    mgpu = lambda *a: attention.dot_product_attention(*a, implementation="mgpu")
    xla = lambda *a: attention.dot_product_attention(*(x.astype(jnp.float32) for x in a), implementation="xla")
    ours, want = (_value_and_grads(f, q, k, v, cotangent) for f in (mgpu, xla))
    for got, ref in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        assert rel_err(got, ref) < 2**-7  # bf16 inputs and outputs, float16 inside


def test_the_bench_dry_run_reports_every_case(tmp_path):
    """tools/attention_bench.py --dry on the CPU: one JSON line per case, the stand-in wrapper's output equal to
    XLA's, and a kernel that fails (the Mosaic one refuses float32) reported without stopping the others."""
    from tools import attention_bench

    out = tmp_path / "bench.jsonl"
    argv = ["--dry", "--head-dims=64", "--lengths=77", "--passes=fwd", "--impls=xla,mgpu,mgpu_ref", f"--out={out}"]
    attention_bench.main(argv)
    rows = {row["impl"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["xla", "mgpu", "mgpu_ref"]
    assert "dtype float32 (expected bfloat16 or float16)" in rows["mgpu"]["error"]
    assert rows["mgpu_ref"]["reference"] == "xla" and rows["mgpu_ref"]["ms"] > 0
    assert rows["mgpu_ref"]["max_abs_diff"] < LAYER_TOL * rows["mgpu_ref"]["ref_max_abs"]
