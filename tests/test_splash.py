"""TPU splash attention, run by the Pallas interpreter on the CPU: forward and gradients equal the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LAYER_TOL, rel_err

from d4k_jax.nn import attention, splash


def _inputs(lq, lk, b=1, n=2, d=64, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (rng.normal(size=(b, length, n, d)).astype(np.float32) for length in (lq, lk, lk, lq))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(w)


def _value_and_grads(fn, q, k, v, w):
    """The output and d(sum(out * w))/d(q, k, v), in one jit."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


# (L, S, batch, kernel options). L=300/S=200: both padded (384 and 256), one block each. L=200/S=300 with
# 128-blocks: 2 query and 3 key blocks, and the head dim zero-padded to 128 as on TPU. L=200/S=256: only the
# queries are padded, so no segment ids and the padded query rows attend to the real keys.
CASES = [
    (300, 200, 2, {}),
    (200, 300, 1, {"max_block": 128, "pad_head_dim": True}),
    (200, 256, 1, {"max_block": 128}),
]


@pytest.mark.parametrize(("lq", "lk", "b", "options"), CASES)
def test_splash_forward_and_gradients_equal_xla(lq, lk, b, options):
    q, k, v, w = _inputs(lq, lk, b)
    if options:
        ours = lambda q, k, v: splash.splash_attention(q, k, v, q.shape[-1] ** -0.5, **options)
    else:  # the dispatch's own route
        ours = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="splash")
    ref = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")
    (_, out), grads = _value_and_grads(ours, q, k, v, w)
    (_, out_ref), grads_ref = _value_and_grads(ref, q, k, v, w)
    assert rel_err(out, out_ref) <= LAYER_TOL
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= LAYER_TOL, name


def test_block_and_padded_length():
    assert splash.block_and_padded_length(300, 512) == (384, 384)
    assert splash.block_and_padded_length(4608, 512) == (512, 4608)
    assert splash.block_and_padded_length(65536 + 333, 512) == (512, 66048)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.block_and_padded_length(300, 200)


def test_tpu_dispatch_picks_splash_without_bias_or_mask(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    choose = attention.choose_implementation
    for shape, dtype in [((1, 4608, 24, 128), jnp.bfloat16), ((1, 77, 8, 64), jnp.float32)]:
        q = jax.ShapeDtypeStruct(shape, dtype)
        assert choose(q, q, has_bias=False, has_mask=False) == "splash"
        assert choose(q, q, has_bias=True, has_mask=False) != "splash"
        assert choose(q, q, has_bias=False, has_mask=True) != "splash"
    q64 = jax.ShapeDtypeStruct((1, 77, 8, 64), jnp.float64)
    assert choose(q64, q64, has_bias=False, has_mask=False) == "xla"
    with attention.forced("xla"):
        q = jax.ShapeDtypeStruct((1, 4608, 24, 128), jnp.bfloat16)
        assert choose(q, q, has_bias=False, has_mask=False) == "xla"
    q, k, v, _ = _inputs(8, 8)
    with pytest.raises(ValueError, match="no bias or mask"):
        attention.dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 8, 8)), implementation="splash")


@pytest.mark.parametrize(("head_dim", "pad_head_dim"), [(64, False), (64, True), (512, False)])
def test_tpu_lowering_of_forward_and_backward(head_dim, pad_head_dim):
    """The non-interpreted kernels lower to Mosaic for TPU on this CPU (libtpu's own compile is not run here):
    the forward, dq and dkv kernels, for SD3's D=64 with and without padding and the VAE's D=512."""
    q = jax.ShapeDtypeStruct((1, 300, 2, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 200, 2, head_dim), jnp.bfloat16)
    fn = lambda q, k, v: splash.splash_attention(q, k, v, 0.125, interpret=False, pad_head_dim=pad_head_dim)
    loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3
